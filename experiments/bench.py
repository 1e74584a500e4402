r"""Throughput of training, sampling and FID feature extraction, against diffusers / pytorch-fid.

    python -m experiments.bench                        # all three, ldm4-in1k, batch 64, one GPU
    python -m experiments.bench --only train --lines compile,diffusers \
        --out runs/bench-train-compile.json
    python -m experiments.bench --device cpu --preset tiny --batch-size 4   # CPU smoke check

What one line of the table times (median of --steps calls after --warmup untimed calls; on CUDA
each call is bracketed by CUDA events, so a line is GPU time with the launch gaps included):
  train     one optimizer step on a batch of latents: diffusion.training_loss forward + backward +
            AdamW step (lr 1e-4, the paper's App. B.3), one class token of context. The reference
            line is our eager U-Net with bf16 autocast, TF32 and fused AdamW on CUDA (fp32 and
            foreach AdamW on CPU); every other line changes ONE thing (an ablation).
  sample    --sample-steps DDIM steps with classifier-free guidance (Eq. 2) from noise to latents:
            diffusion.sample + guided_eps against a diffusers DDIMScheduler loop over diffusers'
            UNet2DConditionModel holding the same weights (loaded through weights.unet_key_map).
  features  FID Inception pool3 features of uint8 256x256 images: features.InceptionV3 against
            pytorch-fid's InceptionV3 holding the same (random) weights, fp32 as metrics.py uses.
Before timing, each compared pair is checked to compute the same function with the same random
weights (relative error printed: max |a - b| / max |b|); every training line also prints how far
its first loss is from the fp32 reference loss. FLOPs: FlopCounterMode on forward + backward,
counted once per model on the meta device (attention counted as its two matmuls).
diffusers and pytorch-fid are imported only inside the baseline functions: they are the anchors of
this benchmark, not dependencies of the product. Method and results: experiments/BENCHMARKS.md.
"""
import argparse
import dataclasses
import datetime
import os
import platform
import sys
import unittest.mock

import torch

import diffusion
import unet
import vae
from cep import ClassEmbedder
from experiments import gpu_check
from experiments.measure import (SDPA, Setup, build_unet, cpu_name, cpu_peaks,
                                  diffusers_autoencoder, forward_flops, free, header,
                                  line_threads, median_seconds, package_version, peak_memory_gib,
                                  print_row, random_unet_state, reference_setup, rel_err, running,
                                  step_flops, throughput, unet_loss)
from support import features, system, weights

# "no latent cache" line
AUTOENCODER = {"ldm4-in1k": "vq-f4", "ldm4-text": "vq-f4", "tiny": "tiny-vq"}
# feature extraction input (ImageNet 256x256 samples); the Inception resizes to 299
IMAGE_SIZE = 256



# ----------------------------------------------------------------------------- 1. training


def train_lines(ref, device, compile_, wide):
    """(label, model kind, setup) of every training line: reference, anchors, one change each."""
    r = dataclasses.replace
    lines = [("ours: reference", "ours", ref), ("diffusers (anchor)", "diffusers", ref)]
    if compile_:
        lines += [("ours + torch.compile", "ours", r(ref, compile=True)),
                  ("diffusers + torch.compile (anchor)", "diffusers", r(ref, compile=True))]
    if device.type == "cuda":
        lines += [("fp32, TF32 off", "ours", r(ref, bf16=False, tf32=False)),
                  ("fp32, TF32 on", "ours", r(ref, bf16=False, tf32=True)),
                  ("bf16, TF32 off", "ours", r(ref, tf32=False)),
                  ("cudnn.benchmark on", "ours", r(ref, cudnn_benchmark=True))]
    else:  # the CPU's own switches: bf16 autocast (AVX-512 BF16 / AMX) and the thread count
        lines += [("bf16 autocast", "ours", r(ref, bf16=True))]
        if torch.get_num_threads() > 1:
            lines += [("1 thread", "ours", r(ref, threads=1))]
    lines += [("channels-last", "ours", r(ref, channels_last=True))]
    lines += [(f"SDPA {name} only", "ours", r(ref, sdpa=name)) for name in SDPA]
    lines += [("AdamW foreach" if ref.fused_adamw else "AdamW fused", "ours",
               r(ref, fused_adamw=not ref.fused_adamw))]
    lines += [("no latent cache (encode each step)", "ours", r(ref, encode=True))]
    lines += [(f"{wide}-wide heads [DIFFERENT MODEL]", "ours", r(ref, head_channels=wide))]
    if compile_:
        lines += [(f"{wide}-wide heads + compile [DIFFERENT MODEL]", "ours",
                   r(ref, head_channels=wide, compile=True))]
    return lines


def train_line(kind, setup, config, state, batch, abar, autoencoder, args, device):
    """Time one training line -> (seconds per step, first loss, peak memory)."""
    x0, t, noise, context, images = batch
    model = build_unet(kind, config, state, device, setup).train()
    fused = {"fused": True} if setup.fused_adamw else {"foreach": True}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)
    if setup.channels_last:
        x0 = x0.to(memory_format=torch.channels_last)
        images = images.to(memory_format=torch.channels_last)

    def step():
        with line_threads(setup):
            with running(setup, device):
                if setup.encode:
                    with torch.no_grad():
                        latents = autoencoder.encode(images).float()
                loss = unet_loss(model, latents if setup.encode else x0, t, noise, context, abar)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss

    first_loss = step().item()  # the first warm-up step: weights not yet updated
    seconds = median_seconds(step, args.warmup - 1, args.steps, device)
    return seconds, first_loss, peak_memory_gib(device)


def check_train(config, state, batch, abar, device):
    """Ours vs diffusers with the same weights, fp32 (must agree) and in the reference setup.
    Returns the fp32 reference loss of the whole batch that every line's first loss is compared
    to."""
    x0, t, noise, context, _ = batch
    n = min(len(x0), 4)
    fp32, ref = Setup(bf16=False, tf32=False), reference_setup(device)
    out = {}
    with torch.no_grad():
        for kind in ("ours", "diffusers"):
            model = build_unet(kind, config, state, device).eval()
            for name, setup in (("fp32", fp32), ("ref", ref)):
                with running(setup, device):
                    out[kind, name] = model(x0[:n], t[:n], context[:n]).float()
            if kind == "ours":
                with running(fp32, device):
                    ref_loss = unet_loss(model, x0, t, noise, context, abar).item()
            del model
    free(device)
    err = rel_err(out["diffusers", "fp32"], out["ours", "fp32"])
    print(f"check: diffusers vs ours, fp32, same weights: rel err {err:.1e}")
    if not err <= 1e-3:
        raise SystemExit(f"ours and diffusers' U-Nets disagree (rel err {err:.1e}): fix unet.py "
                         "first")
    if ref.bf16:
        print(f"check: bf16 autocast vs fp32: ours rel err "
              f"{rel_err(out['ours', 'ref'], out['ours', 'fp32']):.1e}, "
              f"diffusers rel err {rel_err(out['diffusers', 'ref'], out['ours', 'fp32']):.1e}")
    print(f"check: fp32 reference loss {ref_loss:.6f}")
    return ref_loss


def bench_train(config, args, device, report):
    gen = torch.Generator().manual_seed(0)
    B, C, S = args.batch_size, config.in_channels, config.sample_size
    state = random_unet_state(config)
    name = AUTOENCODER.get(args.preset)
    autoencoder = None
    if name:
        autoencoder = system.randomise_(vae.Autoencoder(vae.PRESETS[name]), seed=2)
        autoencoder = autoencoder.to(device).eval()
    factor = 2 ** (len(autoencoder.config.ch_mult) - 1) if autoencoder else 4  # image / latent size
    batch = [torch.randn(B, C, S, S, generator=gen), torch.randint(0, 1000, (B,), generator=gen),
             torch.randn(B, C, S, S, generator=gen),
             torch.randn(B, 1, config.context_dim, generator=gen),
             torch.rand(B, 3, S * factor, S * factor, generator=gen) * 2 - 1]
    batch = [x.to(device) for x in batch]
    abar = diffusion.alphas_cumprod(diffusion.ldm_linear_betas()).to(device)
    ref_loss = check_train(config, state, batch, abar, device)

    ref = reference_setup(device)
    widths = [config.model_channels * m for m in config.channel_mult]
    wide = 64 if all(w % 64 == 0 for w in widths) else 32
    flops = {(kind, h): step_flops(kind, config, B, h) for kind in ("ours", "diffusers")
             for h in (None, wide)
             if kind == "ours" or h is None}
    print(f"FLOPs per training step (forward + backward, batch {B}): "
          + ", ".join(f"{k}{f' ({h}-wide heads)' if h else ''} {f / 1e12:.3g} TFLOP"
                      for (k, h), f in flops.items()))
    report["train_flops_per_step"] = {f"{k}, head_channels {h or config.head_channels}": f
                                      for (k, h), f in flops.items()}
    compile_ = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    header("train", device)
    rows, ref_seconds = [], None
    for label, kind, setup in selected(train_lines(ref, device, compile_, wide), args.lines):
        if setup.encode and autoencoder is None:
            continue  # no autoencoder preset for this U-Net preset
        free(device)
        row = {"name": label, "model": kind, "setup": dataclasses.asdict(setup)}
        try:
            seconds, loss, memory = train_line(kind, setup, config, state, batch, abar,
                                               autoencoder, args, device)
        except (RuntimeError, NotImplementedError) as e:  # e.g. a kernel that does not fit, or OOM
            row["failed"] = str(e).strip().splitlines()[0][:200]
            print(f"  {label:<44} failed: {row['failed']}")
        else:
            ref_seconds = ref_seconds or seconds
            f = flops[kind, setup.head_channels]
            row.update(images_per_s=B / seconds, ms_per_step=1e3 * seconds,
                       **throughput(f, seconds, setup, args, device, report),
                       peak_memory_gib=memory, speedup_vs_reference=ref_seconds / seconds,
                       first_loss=loss, loss_rel_err=abs(loss - ref_loss) / ref_loss)
            note = f"loss rel err {row['loss_rel_err']:.1e}" + (" (different model)"
                                                                if setup.head_channels else "")
            if setup.encode:  # a slow-down line: what the latent cache saves
                row["loss_rel_err"], note = None, "latents from the autoencoder: loss not compared"
            print_row(row, note, device)
        rows.append(row)
        if setup.compile:
            torch._dynamo.reset()
    report["train"] = rows
    summary = anchor_ratios(rows)
    report["train_vs_anchor"] = summary
    for key, value in summary.items():
        print(f"  {key}: {value:.2f}x")


def selected(lines, patterns):
    """The first (reference) line, and the others whose label contains one of the --lines
    patterns."""
    if not patterns:
        return lines
    keep = [p.strip().lower() for p in patterns.split(",")]
    return lines[:1] + [line for line in lines[1:] if any(p in line[0].lower() for p in keep)]


def anchor_ratios(rows):
    """Speed of our lines relative to the diffusers anchor lines (same run, same setup)."""
    speed = {r["name"]: r["images_per_s"] for r in rows if "images_per_s" in r}
    pairs = {"ours eager / diffusers eager": ("ours: reference", "diffusers (anchor)"),
             "ours compiled / diffusers compiled": ("ours + torch.compile",
                                                    "diffusers + torch.compile (anchor)")}
    out = {k: speed[a] / speed[b] for k, (a, b) in pairs.items() if a in speed and b in speed}
    same_model = [r for r in rows if r["model"] == "ours" and r["setup"]["head_channels"] is None
                  and not r["setup"]["encode"] and r["name"] in speed]
    for anchor in ("diffusers (anchor)", "diffusers + torch.compile (anchor)"):
        if same_model and anchor in speed:
            best = max(same_model, key=lambda r: r["images_per_s"])
            ratio = best["images_per_s"] / speed[anchor]
            out[f"best one-head line ({best['name']}) / {anchor}"] = ratio
    return out


# ----------------------------------------------------------------------------- 2. sampling


def diffusers_ddim(model, x_T, context, null_context, scale, steps):
    """The denoising loop of diffusers' pipelines with DDIMScheduler at LDM's settings."""
    from diffusers import DDIMScheduler
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195,
                              beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False,
                              steps_offset=1)
    scheduler.set_timesteps(steps)
    x, cond = x_T, torch.cat([null_context, context])
    with torch.no_grad():
        for t in scheduler.timesteps:
            t_batch = t.expand(2 * len(x)).to(x.device)
            eps_null, eps_c = model(torch.cat([x, x]), t_batch, cond).chunk(2)
            x = scheduler.step((eps_null + scale
                                * (eps_c - eps_null)).float(), t, x, eta=0.0).prev_sample
    return x


def our_ddim(model, x_T, context, null_context, scale, steps, abar):
    def eps_fn(x, t):
        return diffusion.guided_eps(model, x, t, context, null_context, scale)  # fp32 already
    return diffusion.sample(eps_fn, x_T, "ddim", steps, abar)


def bench_sample(config, args, device, report):
    gen = torch.Generator().manual_seed(0)
    B = args.batch_size
    state = random_unet_state(config)
    torch.manual_seed(3)
    embedder = ClassEmbedder(1000, config.context_dim).to(device)
    with torch.no_grad():
        context = embedder(torch.randint(0, 1000, (B,), generator=gen).to(device))
        null_context = embedder(embedder.null_condition(B))
    shape = (B, config.in_channels, config.sample_size, config.sample_size)
    x_T = torch.randn(shape, generator=gen).to(device)
    # on the CPU, as sample.py: no sync per step
    abar = diffusion.alphas_cumprod(diffusion.ldm_linear_betas())
    samplers = {"ours": lambda m, x: our_ddim(m, x, context, null_context, args.guidance,
                                              args.sample_steps, abar),
                "diffusers": lambda m, x: diffusers_ddim(m, x, context, null_context,
                                                         args.guidance, args.sample_steps)}
    fp32, bf16 = Setup(bf16=False, tf32=False), Setup(bf16=True, tf32=True)
    flops = step_flops("ours", config, 2 * B, None, backward=False) * args.sample_steps
    lines = [(f"{k} fp32", k, fp32) for k in samplers]
    lines += [(f"{k} bf16 autocast", k, bf16) for k in samplers]
    if device.type == "cpu":
        lines += [("ours channels-last", "ours", dataclasses.replace(fp32, channels_last=True))]
        if torch.get_num_threads() > 1:
            lines += [("ours 1 thread", "ours", dataclasses.replace(fp32, threads=1))]
    if args.compile == "on" or (args.compile == "auto" and device.type == "cuda"):
        compiled = dataclasses.replace(bf16 if device.type == "cuda" else fp32, compile=True)
        lines += [(f"{k} + torch.compile", k, compiled) for k in samplers]
    header(f"sample ({args.sample_steps} DDIM steps, guidance {args.guidance:g}, U-Net batch "
           f"{2 * B})", device)
    rows, reference, ref_seconds = [], None, None
    for label, kind, setup in selected(lines, args.lines):
        free(device)
        row = {"name": label, "model": kind, "setup": dataclasses.asdict(setup)}
        try:
            model = build_unet(kind, config, state, device, setup).eval()
            x = x_T.to(memory_format=torch.channels_last) if setup.channels_last else x_T
            with line_threads(setup), running(setup, device):
                out = samplers[kind](model, x)  # the warm-up run (it compiles), checked first
                reference = out if reference is None else reference  # the first line: ours fp32
                err = rel_err(out, reference)
                if label == "diffusers fp32":
                    print("check: diffusers DDIM loop vs ours, fp32, same weights: rel err "
                          f"{err:.1e}")
                    if not err <= 1e-3:
                        raise SystemExit("our DDIM sampler and diffusers' disagree (rel err "
                                         f"{err:.1e})")
                seconds = median_seconds(lambda: samplers[kind](model, x), 0,
                                         args.sample_repeats, device)
        except (RuntimeError, NotImplementedError) as e:
            row["failed"] = str(e).strip().splitlines()[0][:200]
            print(f"  {label:<44} failed: {row['failed']}")
        else:
            ref_seconds = ref_seconds or seconds
            row.update(images_per_s=B / seconds, ms_per_batch=1e3 * seconds,
                       **throughput(flops, seconds, setup, args, device, report),
                       peak_memory_gib=peak_memory_gib(device),
                       speedup_vs_reference=ref_seconds / seconds, rel_err_vs_ours_fp32=err)
            print_row(row, f"rel err vs ours fp32 {err:.1e}", device)
        rows.append(row)
        if setup.compile:
            torch._dynamo.reset()
    report["sample"] = rows


# ----------------------------------------------------------------------------- 3. features


def pytorch_fid_inception(state):
    """pytorch-fid's InceptionV3 (pool3 only) holding the weights `state` instead of its
    download."""
    import pytorch_fid.inception
    with unittest.mock.patch.object(pytorch_fid.inception, "load_state_dict_from_url",
                                    lambda *a, **k: state):
        return pytorch_fid.inception.InceptionV3([3]).eval()


def bench_features(args, device, report):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 3, IMAGE_SIZE, IMAGE_SIZE), generator=gen,
                           dtype=torch.uint8).to(device)
    ours = system.randomise_(features.InceptionV3(), seed=4).eval()
    theirs = pytorch_fid_inception(ours.state_dict()).to(device)
    ours = ours.to(device)
    networks = {"ours (features.InceptionV3)": lambda x: ours(x)["features"],
                # pytorch-fid's data loader hands the network floats in [0, 1]
                "pytorch-fid InceptionV3": lambda x: theirs(x.float() / 255)[0].flatten(1)}
    setup = Setup(bf16=False, tf32=False)  # metrics.py extracts exact fp32 features
    with torch.no_grad(), running(setup, device):
        outputs = {label: net(images) for label, net in networks.items()}
        err = rel_err(outputs["pytorch-fid InceptionV3"], outputs["ours (features.InceptionV3)"])
        print(f"check: pytorch-fid vs ours, same weights: rel err {err:.1e}")
        if not err <= 1e-4:
            raise SystemExit(f"features.InceptionV3 and pytorch-fid's disagree (rel err {err:.1e})")
        header(f"features (uint8 {IMAGE_SIZE}x{IMAGE_SIZE} -> 2048-d pool3, fp32, TF32 off)",
               device)
        rows, ref_seconds = [], None
        for label, net in networks.items():
            free(device)
            # 1: the check
            seconds = median_seconds(lambda: net(images), args.warmup - 1, args.steps, device)
            ref_seconds = ref_seconds or seconds
            row = {"name": label, "images_per_s": args.batch_size / seconds,
                   "ms_per_batch": 1e3 * seconds,
                   "peak_memory_gib": peak_memory_gib(device),
                   "speedup_vs_reference": ref_seconds / seconds}
            print_row(row, "", device)
            rows.append(row)
    report["features"] = rows
    report["features_rel_err"] = err


# ----------------------------------------------------------------------------- 4. autoencoder


def autoencoder_pair(config, device):
    """Ours (random weights, latent scale 1) and diffusers' model holding the same weights."""
    ours = system.randomise_(vae.Autoencoder(config, scale=1.0), seed=5).eval()
    theirs = diffusers_autoencoder(config)
    shapes, mapping = theirs.state_dict(), weights.autoencoder_key_map(config)
    theirs.load_state_dict({mapping[k]: v.reshape(shapes[mapping[k]].shape)
                            for k, v in ours.state_dict().items()})
    return ours.to(device), theirs.to(device)


def bench_autoencoder(config, args, device, report):
    """Encode (the posterior's mode) and decode of a KL first stage whose latents have the
    U-Net preset's size, ours against diffusers' AutoencoderKL with the same weights, fp32."""
    ae = vae.PRESETS[args.autoencoder]
    size = config.sample_size * 2 ** (len(ae.ch_mult) - 1)
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(args.batch_size, ae.in_channels, size, size, generator=gen) * 2 - 1)
    ours, theirs = autoencoder_pair(ae, device)
    with torch.no_grad():
        latents = ours.encode(images.to(device))
    calls = {("encode", "ours"): ours.encode,
             ("encode", "diffusers"): lambda x: theirs.encode(x).latent_dist.mode(),
             ("decode", "ours"): ours.decode,
             ("decode", "diffusers"): lambda z: theirs.decode(z).sample}
    fp32 = Setup(bf16=False, tf32=False)
    lines = [("ours fp32", "ours", fp32), ("diffusers fp32", "diffusers", fp32),
             ("ours bf16 autocast", "ours", dataclasses.replace(fp32, bf16=True))]
    if device.type == "cpu":
        lines += [("ours channels-last", "ours", dataclasses.replace(fp32, channels_last=True))]
        if torch.get_num_threads() > 1:
            lines += [("ours 1 thread", "ours", dataclasses.replace(fp32, threads=1))]
    rows = []
    for op, x in (("encode", images.to(device)), ("decode", latents)):
        flops = forward_flops(calls[op, "ours"], x[:1]) * args.batch_size  # linear in the batch
        header(f"autoencoder {op} ({args.autoencoder}, {size}x{size} images, "
               f"{config.sample_size}x{config.sample_size} latents)", device)
        first = None
        for label, kind, setup in lines:
            model = {"ours": ours, "diffusers": theirs}[kind]
            seconds, out = time_call(calls[op, kind], x, model, setup, args, device)
            first = first or (seconds, out)
            err = rel_err(out, first[1])
            if kind == "diffusers" and not err <= 1e-4:
                raise SystemExit(f"vae.py's {op} and diffusers' disagree (rel err {err:.1e})")
            row = {"name": f"{op}: {label}", "model": kind, "setup": dataclasses.asdict(setup),
                   "images_per_s": args.batch_size / seconds, "ms_per_batch": 1e3 * seconds,
                   **throughput(flops, seconds, setup, args, device, report),
                   "peak_memory_gib": peak_memory_gib(device),
                   "speedup_vs_reference": first[0] / seconds, "rel_err_vs_ours_fp32": err}
            print_row(row, f"rel err vs ours fp32 {err:.1e}", device)
            rows.append(row)
    report["autoencoder"] = rows


def time_call(call, x, model, setup, args, device):
    """(median seconds, fp32 output) of call(x) under `setup`, without gradients."""
    layout = torch.channels_last if setup.channels_last else torch.contiguous_format
    model.to(memory_format=layout)
    x = x.contiguous(memory_format=layout)
    with torch.no_grad(), line_threads(setup), running(setup, device):
        out = call(x).float()
        seconds = median_seconds(lambda: call(x), args.warmup - 1, args.steps, device)
    model.to(memory_format=torch.contiguous_format)
    return seconds, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to run on (default: cuda when available, else cpu)")
    parser.add_argument("--preset", default="ldm4-in1k", choices=sorted(unet.PRESETS),
                        help="U-Net preset of unet.py (default: the paper's ldm4-in1k)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images per training step / sampled batch / feature batch (paper: 64 "
                             "per GPU)")
    parser.add_argument("--steps", type=int,
                        help="timed iterations per line, the median is reported "
                        "(default: 20 on CUDA, 3 on CPU)")
    parser.add_argument("--warmup", type=int,
                        help="untimed iterations before timing, >= 1; the first also "
                        "compiles (default: 5 on CUDA, 1 on CPU)")
    parser.add_argument("--only", choices=["train", "sample", "features", "autoencoder"],
                        help="run one section only")
    parser.add_argument("--lines",
                        help="comma-separated substrings: run only the lines whose label contains "
                        "one (plus the reference line), e.g. 'compile' or 'diffusers,SDPA'")
    parser.add_argument("--out", default="runs/bench.json", help="JSON file for all figures")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="peak dense bf16 TFLOP/s of the GPU for MFU (default 989: H100 SXM "
                             "datasheet; ~790 is a measured figure; H100 PCIe: 756, A100: 312)")
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                        help="torch.compile lines (auto: on CUDA only; compiling takes minutes)")
    parser.add_argument("--sample-steps", type=int, default=50, help="DDIM steps per sampled batch")
    parser.add_argument("--sample-repeats", type=int,
                        help="timed sampling runs per line, after one "
                        "untimed run (default: 2 on CUDA, 1 on CPU)")
    parser.add_argument("--autoencoder", default="small-kl",
                        choices=[k for k, c in vae.PRESETS.items() if c.kind == "kl"],
                        help="KL first stage of the autoencoder section (vae.py; its images are "
                             "the U-Net preset's latent size times its downsampling)")
    parser.add_argument("--guidance", type=float, default=2.0,
                        help="guidance scale s (Eq. 2; Table 1: 2.0)")
    parser.add_argument("--gpu-check", action="store_true",
                        help="first prove the GPU paths (bf16, compile, torchrun stop/resume, bf16 "
                             "sampling, SDPA kernels; BENCHMARKS.md), then time as usual; under "
                             "10 minutes on one H100")
    args = parser.parse_args()
    cuda = torch.device(args.device).type == "cuda"
    for name, on_cuda, on_cpu in (("steps", 20, 3), ("warmup", 5, 1), ("sample_repeats", 2, 1)):
        if getattr(args, name) is None:
            setattr(args, name, on_cuda if cuda else on_cpu)
    if args.warmup < 1 or args.steps < 1 or args.sample_repeats < 1 or args.batch_size < 1:
        parser.error("--warmup, --steps, --sample-repeats and --batch-size must be >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no GPU is visible; use --device cpu")

    config = unet.PRESETS[args.preset]
    report = {"command": "python " + " ".join(sys.argv), "date": datetime.date.today().isoformat(),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
              "torch": torch.__version__, "python": platform.python_version(), "args": vars(args)}
    report.update({name: package_version(name) for name in ("diffusers", "pytorch-fid")})
    print(f"bench: {report['device']}, torch {torch.__version__}, preset {args.preset}, batch "
          f"{args.batch_size}"
          + (f", MFU against {args.peak_tflops:g} TFLOP/s bf16" if device.type == "cuda" else ""))
    if args.gpu_check:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            passed = gpu_check.gpu_check(device, report, tmp, compile_=args.compile != "off")
        if not passed:
            print("GPU check FAILED: see the lines above; timing anyway")
    if device.type == "cpu":
        report["cpu_peak_gflops"] = cpu_peaks()
        print("measured peak (2048^3 matmul): " + ", ".join(
            f"{k} {v:.0f} GFLOP/s" for k, v in report["cpu_peak_gflops"].items()))
    if args.only in (None, "train"):
        bench_train(config, args, device, report)
    if args.only in (None, "sample"):
        bench_sample(config, args, device, report)
    if args.only in (None, "features"):
        bench_features(args, device, report)
    if args.only in (None, "autoencoder"):
        bench_autoencoder(config, args, device, report)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    system.write_json(args.out, report)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
