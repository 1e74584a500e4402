"""Generate images from a checkpoint of train.py or a released model (released.py): PNG grids,
per-image PNGs and an .npz for metrics.

    python sample.py --ckpt runs/demo --per-class 10                 # grid: one row per class
    torchrun --nproc_per_node=8 sample.py --ckpt runs/in1k --per-class 50 --guidance 1.5,2.0,3.0

Sampler: DPM-Solver++ 2M, 50 steps (the paper's protocol, App. B.7) by default; DDIM (LDM's check:
250 steps, eta 0) and DDPM on request. Guidance (Eq. 2): eps = eps(null) + s (eps(y) - eps(null)).
Sample i always starts from the noise of seed (seed, i), so the same index gives the same image
whatever the batch size or the number of processes. One folder per guidance scale:
OUT/s{scale}/samples.npz (arr_0 uint8 NHWC, labels or captions, index, seed), grid.png, images/.
Every finished batch is kept in OUT/s{scale}/partial until the scale is written, so a stopped run
(Ctrl-C, SIGTERM, a job limit) continues where it stopped when the same command is run again, and
a scale whose samples.npz already holds these samples is kept.
"""
import argparse
import contextlib
import functools
import glob
import math
import os
import shutil
import signal
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from tqdm import tqdm

import diffusion
from support import checkpoints, data, released, system, weights


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    rank, world, device = system.setup_distributed()
    system.set_threads(args.threads)
    tf32 = args.precision == "auto" and device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:  # the user's checkpoint and autoencoder: one-line errors
        model, config, step = checkpoints.load(args.ckpt, args.weights, device,
                                               args.text_encoder, args.unsafe_pickle)
        autoencoder = load_autoencoder(args, config, device)
        abar, timesteps = sampling_schedule(args, config)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"sample.py: {e}") from None
    if args.clip_denoised is None:  # clip pixels, never latents
        args.clip_denoised = config["space"] == "pixel"
    elif args.clip_denoised and config["space"] == "latent":
        raise SystemExit("sample.py: --clip-denoised applies to pixel-space models; latents are "
                         "not bounded")
    cads = None
    if args.cads:  # (tau1, tau2, scale, psi)
        cads = (*(float(v) for v in args.cads_tau.split(",")), args.cads_scale, args.cads_psi)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    how = dict(sampler=args.sampler, steps=args.steps, ddim_eta=args.ddim_eta,
               clip=args.clip_denoised, cads=cads, seed=args.seed, bf16=bf16)
    conds = conditions_to_sample(args, config)
    mine = list(range(rank, len(conds), world))  # this process's sample indices
    run_dir = args.ckpt if os.path.isdir(args.ckpt) else os.path.dirname(os.path.abspath(args.ckpt))
    out_root = args.out or os.path.join(run_dir, "samples")
    shape = (config["channels"], config["size"], config["size"])
    key = condition_key(config)
    lock = system.folder_lock(out_root, "sample") if rank == 0 else contextlib.nullcontext()
    # one sample.py per output folder; Ctrl-C / SIGTERM: keep the finished batches
    with lock, system.stop_on_signals() as received:
        for scale in [float(s) for s in args.guidance.split(",")]:
            out = os.path.join(out_root, f"s{scale:g}")
            settings = sample_settings(args, config, scale, step)
            if already_written(out, settings, key, conds):
                if rank == 0:
                    print(f"{out}/samples.npz already holds these {len(conds)} samples (same "
                          "checkpoint and settings): kept; delete it to draw them again")
                continue
            partial = os.path.join(out, "partial")
            draw = functools.partial(sample_batch, model, scale=scale, abar=abar,
                                     timesteps=timesteps, autoencoder=autoencoder, **how)
            done = draw_scale(draw, conds, key, mine, settings, args, shape, partial, received)
            images = system.gather_rows(np.stack([done[i][0] for i in mine]) if mine else
                                        np.zeros((0,), np.uint8), np.asarray(mine, np.int64))
            shares = system.gather_rows(np.stack([done[i][1] for i in mine]) if mine else
                                        np.zeros((0, 2)))  # rank 0: every sample's shares
            if rank == 0:
                write_outputs(out, images, conds, settings, config, args)
                shutil.rmtree(partial, ignore_errors=True)  # the shards are in samples.npz now
                print(f"wrote {len(images)} samples to {out}")
                warning = range_warning(*shares.mean(0), epochs_seen(config, step))
                if warning:
                    print(warning)
    if world > 1:
        dist.destroy_process_group()


def conditions_to_sample(args, config):
    """The list of conditions, one per sample index (class-major, as the paper's 50 per class)."""
    if config["text"]:
        if not args.prompts:
            raise SystemExit("text model: give --prompts FILE (one prompt per line)")
        try:
            with open(args.prompts, encoding="utf-8-sig") as f:
                lines = [line.rstrip("\n") for line in f]
        except UnicodeDecodeError as e:
            raise SystemExit(f"sample.py: {args.prompts} is not UTF-8 ({e.reason} at byte "
                             f"{e.start}): save it as UTF-8") from None
        prompts = [line for line in lines if line.strip()]
        if not prompts:
            raise SystemExit(f"sample.py: {args.prompts} holds no prompts (one per line)")
        if len(prompts) < len(lines):
            print(f"note: {len(lines) - len(prompts)} blank lines of {args.prompts} skipped")
        if args.per_class is not None or args.classes is not None:
            print("note: --per-class and --classes apply to class models; one sample per prompt")
        return prompts
    n = config["num_classes"]
    classes = [int(c) for c in args.classes.split(",")] if args.classes else range(n)
    if any(not 0 <= c < n for c in classes):
        raise SystemExit(f"--classes must lie in [0, {n - 1}] for this {n}-class model")
    if args.per_class is not None and args.per_class < 1:
        raise SystemExit(f"--per-class must be >= 1, got {args.per_class}")
    return [c for c in classes for _ in range(args.per_class or 10)]


def condition_key(config):
    """The name samples.npz gives the conditions: captions for a text model, else labels."""
    return "captions" if config["text"] else "labels"


def epochs_seen(config, step):
    """Passes over the training set a train.py run made by `step` (None: a released model)."""
    if not config.get("num_examples") or not config.get("global_batch"):
        return None
    return step * config["global_batch"] / config["num_examples"]


def initial_noise(indices, seed, shape):
    """x_T and a generator per sample, both from the seed (seed, index)."""
    gens = [torch.Generator().manual_seed(system.seed_of(seed, i)) for i in indices]
    return torch.stack([torch.randn(shape, generator=g) for g in gens]), gens


OUT_OF_RANGE = 3.0  # |value| beyond this is far outside the data range [-1, 1]
SATURATED = 0.95  # a sample set with more of its values at -1 or +1 is all black / white / noise


def range_warning(outside, saturated=0.0, epochs=None):
    """A sample set with more than 1 % of its values far outside [-1, 1] (unclipped), or almost
    all of them at the ends of the range (clipped, or a diverged model's black images), comes
    from a model that is not ready: say so, with the epochs it saw. Trained pixel models
    overshoot saturated backgrounds a little (digits: 0.25 % of values beyond 3)."""
    seen = f"this run saw {epochs:.3g} epochs; " if epochs else ""
    advice = f"the model is not ready: {seen}train longer (README, 'Your own data')."
    if outside > 0.01:
        return (f"warning: {100 * outside:.1f} % of the sample values lie outside "
                f"[-{OUT_OF_RANGE}, {OUT_OF_RANGE}] (the data lies in [-1, 1]): {advice}")
    if saturated > SATURATED:
        return (f"warning: {100 * saturated:.1f} % of the sample values sit at -1 or +1 (all "
                f"black, all white or clipped noise): {advice}")
    return None


@torch.no_grad()
def sample_batch(model, conds, indices, noise, gens, scale, abar, timesteps, autoencoder,
                 sampler, steps, ddim_eta=0.0, clip=False, cads=None, seed=0, bf16=False):
    """Images of one batch: `sampler` (diffusion.sample) for `steps` from x_T = noise with
    classifier-free guidance at `scale` (Eq. 2) on c_theta(y), which gets no CEP delta at
    sampling (Sec. 5.1); cads = (tau1, tau2, scale, psi) re-noises the condition (never the
    null one) from per-sample generators; clip keeps x0 predictions in the data range (pixel
    models); decoded by the autoencoder. -> (uint8 NHWC, the shares far outside / at an end of
    the range per image [N, 2])."""
    device = next(model.parameters()).device
    c = torch.as_tensor(conds, device=device) if not isinstance(conds[0], str) else list(conds)
    context = model.embedder(c)  # c_theta(y): [B, L, D]
    null_context = model.embedder(model.null_conditions(len(conds)))
    cads_gens = [torch.Generator().manual_seed(system.seed_of(seed, i, 1)) for i in indices]

    def eps(x, t):
        condition = context
        if cads is not None:
            draws = [torch.randn(context.shape[1:], generator=g) for g in cads_gens]
            condition = diffusion.cads_context(context, t, torch.stack(draws).to(device),
                                               len(abar), *cads)
        return diffusion.guided_eps(model.unet, x, t, condition, null_context, scale)

    if clip:  # x0 predictions inside the data range (pixel models, by default)
        eps = diffusion.clip_denoised(eps, abar)
    # bf16 for the U-Net's matmuls and convolutions; the sampler's arithmetic stays fp32
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        x = diffusion.sample(eps, noise.to(device), sampler, steps, abar, eta=ddim_eta,
                             generators=gens, timesteps=timesteps)
    if autoencoder is not None:
        x = autoencoder.decode(x)
    shares = torch.stack([(x.abs() > OUT_OF_RANGE).float().mean((1, 2, 3)),  # data: [-1, 1]
                          (x.abs() >= 1 - 1 / 255).float().mean((1, 2, 3))], 1)  # at an end
    return data.to_uint8(x).permute(0, 2, 3, 1).cpu().numpy(), shares.cpu().numpy()  # NHWC, [N, 2]


def save_grid(images, rows, path, row_labels=None, min_cell=64, gap=2):
    """rows x cols grid with a gap between cells; small images enlarged (nearest) to be seen;
    row_labels (one string per row) are written in a white margin on the left."""
    zoom = max(1, min_cell // images.shape[1])
    images = images.repeat(zoom, axis=1).repeat(zoom, axis=2)
    n, h, w, c = images.shape
    cols = math.ceil(n / rows)
    grid = np.full((rows * (h + gap) + gap, cols * (w + gap) + gap, c), 128, np.uint8)
    for k, img in enumerate(images):
        r, q = divmod(k, cols)
        y, x = gap + r * (h + gap), gap + q * (w + gap)
        grid[y:y + h, x:x + w] = img
    picture = Image.fromarray(grid.squeeze(-1) if c == 1 else grid)
    if row_labels:
        draw = ImageDraw.Draw(picture)
        margin = 8 + int(max(draw.textlength(label) for label in row_labels))
        labelled = Image.new(picture.mode, (picture.width + margin, picture.height), "white")
        labelled.paste(picture, (margin, 0))
        draw = ImageDraw.Draw(labelled)
        for r, label in enumerate(row_labels):
            draw.text((4, gap + r * (h + gap) + h // 2 - 5), label, fill="black")
        picture = labelled
    picture.save(path)


def sample_settings(args, config, scale, step):
    """What decides the images of one scale besides the conditions: stored in samples.npz and in
    every shard, and compared before either is reused."""
    cads = f"tau={args.cads_tau},s={args.cads_scale},psi={args.cads_psi}" if args.cads else "off"
    return dict(ckpt=os.path.abspath(args.ckpt), ckpt_step=step,
                ckpt_file=checkpoint_stamp(args.ckpt), seed=args.seed, guidance=scale,
                sampler=f"{args.sampler}:{args.steps}", cads=cads,
                clip_denoised=args.clip_denoised, weights=args.weights,
                timesteps=args.timesteps if config.get("scheduler") else "paper")


def checkpoint_stamp(ckpt):
    """Size and modification time of the weights file: a run trained again to the same step is
    another model (a released directory: its U-Net's weights file)."""
    path = ckpt
    if os.path.isdir(ckpt):
        candidates = [os.path.join(ckpt, "ckpt.pt"),
                      os.path.join(ckpt, "unet", "diffusion_pytorch_model.safetensors")]
        path = next((c for c in candidates if os.path.exists(c)), ckpt)
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def drawn_with(f, settings, key, conds, index):
    """Whether the open npz `f` holds samples `index` of `conds` drawn with `settings`."""
    return (all(k in f.files and f[k].item() == v for k, v in settings.items())
            and key in f.files and np.array_equal(f[key], np.asarray(conds)[index]))


def already_written(out, settings, key, conds):
    """OUT/samples.npz holds every sample of this scale, drawn with these settings."""
    try:
        with np.load(os.path.join(out, "samples.npz")) as f:  # arrays are read when asked for
            return drawn_with(f, settings, key, conds, np.arange(len(conds)))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # absent, cut short or foreign
        return False


def finished_shards(partial, settings, key, conds, mine):
    """{index: (image, shares)} of this rank's samples in the shards of PARTIAL drawn with these
    settings (a stopped run's), and how many shards were drawn otherwise or are unreadable."""
    done, foreign, wanted = {}, 0, set(mine)
    for path in sorted(glob.glob(os.path.join(partial, "[0-9]*.npz"))):
        try:
            with np.load(path) as f:
                index = f["index"]
                if not drawn_with(f, settings, key, conds, index):
                    foreign += 1
                    continue
                for i, image, shares in zip(index.tolist(), f["arr_0"], f["shares"]):
                    if i in wanted:
                        done[i] = (image, shares)
        except (OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile):
            foreign += 1
    return done, foreign


def write_shard(partial, index, images, shares, key, conds, settings):
    """One finished batch: PARTIAL/{first index}.npz, written atomically."""
    os.makedirs(partial, exist_ok=True)
    path = os.path.join(partial, f"{index[0]:08d}.npz")
    system.write_atomic(path, lambda tmp: np.savez(
        tmp, arr_0=images, shares=shares, index=np.asarray(index),
        **{key: np.asarray(conds)[index]}, **settings))


def write_outputs(out, images, conds, settings, config, args):
    """samples.npz (sample i started from the seed (seed, i)), the grid, and one PNG per sample."""
    os.makedirs(out, exist_ok=True)
    key = condition_key(config)
    system.write_atomic(os.path.join(out, "samples.npz"), lambda tmp: np.savez(  # never truncated
        tmp, arr_0=images, **{key: np.asarray(conds)}, index=np.arange(len(images)), **settings))
    if config["text"]:  # up to 64 samples, row-major; their prompts in grid_prompts.txt
        shown = images[:64]
        rows = math.ceil(len(shown) / 8)
        cols = math.ceil(len(shown) / rows)  # as save_grid lays them out: 8 a row at most
        save_grid(shown, rows, os.path.join(out, "grid.png"))
        with open(os.path.join(out, "grid_prompts.txt"), "w") as f:  # row,column<TAB>prompt
            f.write("".join(f"{i // cols + 1},{i % cols + 1}\t{p}\n"
                            for i, p in enumerate(conds[:64])))
    else:  # one row per class, up to 10 samples each, labelled with the class names
        classes = sorted(set(conds))
        per = [np.flatnonzero(np.asarray(conds) == c)[:10] for c in classes]
        cols = min(len(p) for p in per)
        names = config.get("class_names") or [str(c) for c in range(config["num_classes"])]
        save_grid(np.concatenate([images[p[:cols]] for p in per]), len(classes),
                  os.path.join(out, "grid.png"), [names[c] for c in classes])
    if os.path.isdir(os.path.join(out, "images")):  # replaced whole: no PNG of an earlier run stays
        shutil.rmtree(os.path.join(out, "images"))
    if not args.no_images:
        os.makedirs(os.path.join(out, "images"), exist_ok=True)
        for i, img in enumerate(images):
            picture = Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img)
            picture.save(os.path.join(out, "images", f"{i:06d}.png"))


def load_autoencoder(args, config, device):
    """The autoencoder a latent model decodes with (--vae, or the one its run config names)."""
    vae_path = args.vae or (config.get("vae") if config["space"] == "latent" else None)
    if config["space"] == "latent" and not vae_path:
        raise ValueError("latent model: give --vae (the autoencoder the latents came from)")
    if not vae_path:
        return None
    autoencoder = weights.load_autoencoder(vae_path, config.get("vae_preset"),
                                       config.get("latent_scale"), args.unsafe_pickle)
    if config.get("vae_sha256") and weights.weights_hash(vae_path) != config["vae_sha256"]:
        raise ValueError(f"{vae_path} holds other weights than the autoencoder this model's "
                         f"latents came from (sha256 {config['vae_sha256']}): pass --vae with "
                         "those weights")
    return autoencoder.to(device).eval()


def sampling_schedule(args, config):
    """(alpha-bar, timesteps or None): LDM's schedule and the sampler's spacing, or a released
    model's stored scheduler config (released.py) unless --timesteps paper. Kept on the CPU:
    the step sizes are Python floats."""
    scheduler = config.get("scheduler")
    if scheduler is None:
        return diffusion.alphas_cumprod(diffusion.ldm_linear_betas()), None
    released.check_model_options(scheduler, args.sampler)  # whatever the timesteps
    timesteps = None
    if args.timesteps == "config":
        timesteps = released.timesteps(scheduler, args.sampler, args.steps)
    return released.alphas_cumprod(scheduler), timesteps


def draw_scale(draw, conds, key, mine, settings, args, shape, partial, received):
    """This rank's samples of one scale, {index: (image NHWC uint8, shares)}; draw(conditions,
    indices, noise, generators) samples a batch. Every finished batch is written to PARTIAL as a
    shard (its conditions under key) and the shards a stopped run left are used, so the same
    command continues where it stopped and gives the samples of an uninterrupted run."""
    rank, scale = system.rank_and_world()[0], settings["guidance"]
    if rank == 0:
        system.remove_stale_temporaries(partial)
    done, foreign = finished_shards(partial, settings, key, conds, mine)
    if rank == 0 and (done or foreign):
        print(f"s={scale:g}: {len(done)} samples of a stopped run found in {partial}"
              + (f"; {foreign} shards of other settings ignored" if foreign else ""))
    todo = [i for i in mine if i not in done]
    bar = tqdm(total=len(mine), initial=len(done), disable=rank != 0, desc=f"s={scale:g}")
    for b in range(0, len(todo), args.batch_size):
        idx = todo[b:b + args.batch_size]
        noise, gens = initial_noise(idx, args.seed, shape)
        images, shares = draw([conds[i] for i in idx], idx, noise, gens)
        write_shard(partial, idx, images, shares, key, conds, settings)
        done.update(zip(idx, zip(images, shares)))
        bar.update(len(idx))
        if received:
            raise SystemExit(f"sample.py: stopped by {signal.Signals(received[0]).name} after "
                             f"{len(done)} of {len(mine)} samples of s={scale:g}: they are kept "
                             f"in {partial}; the same command continues from there")
    bar.close()
    return done


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=system.HelpFormatter)
    p.add_argument("--ckpt", required=True,
                   help="checkpoint file or run directory of train.py (uses RUN/ckpt.pt), a "
                        "released pipeline directory or LDM's cin256-v2 model.ckpt (released.py)")
    p.add_argument("--out", default=None, help="output directory (default: RUN/samples)")
    p.add_argument("--guidance", default="2.0",
                   help="comma-separated guidance scales, one output folder each (1 = no guidance)")
    p.add_argument("--sampler", default="dpm", choices=["dpm", "ddim", "ddpm"],
                   help="DPM-Solver++ 2M (paper), DDIM or DDPM")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (DDPM: 1000)")
    p.add_argument("--timesteps", default="config", choices=["config", "paper"],
                   help="released models (released.py): the timesteps their stored scheduler "
                        "config gives, as the authors' scripts sample, or the paper's protocol "
                        "(DPM-Solver++ from t = 999, App. B.7); runs of train.py always use the "
                        "paper's")
    p.add_argument("--ddim-eta", type=float, default=0.0,
                   help="DDIM's eta, in [0, 1] (0 = deterministic; not the corruption ratio of "
                        "train.py)")
    p.add_argument("--clip-denoised", action=argparse.BooleanOptionalAction, default=None,
                   help="clip every step's x0 prediction to the data range [-1, 1], as DDPM, ADM "
                        "and diffusers' schedulers sample pixels (default: on for pixel-space "
                        "models, off for latent ones, whose latents are unbounded)")
    p.add_argument("--cads", action="store_true",
                   help="condition-annealed sampling (CADS, Sadat et al. 2024): noise on the "
                        "condition embedding, strong at high noise levels and gone at the end")
    p.add_argument("--cads-tau", default="0.6,0.9",
                   help="CADS tau1,tau2: clean condition below tau1, pure noise above tau2 (t/T)")
    p.add_argument("--cads-scale", type=float, default=0.25, help="CADS noise scale s")
    p.add_argument("--cads-psi", type=float, default=1.0,
                   help="CADS rescaling mix psi (1 = rescaled)")
    p.add_argument("--per-class", type=int, default=None,
                   help="class models: N samples of every class (paper: 50 per class)")
    p.add_argument("--classes", default=None,
                   help="class models: comma-separated classes to sample (default: all)")
    p.add_argument("--prompts", default=None, help="text models: a file with one prompt per line")
    p.add_argument("--batch-size", type=int, default=64,
                   help="samples per forward pass per process")
    p.add_argument("--seed", type=int, default=0,
                   help="base seed; sample i uses the seed (seed, i)")
    p.add_argument("--weights", default="ema", choices=["ema", "model"],
                   help="EMA weights (default) or raw weights")
    p.add_argument("--vae", default=None,
                   help="autoencoder checkpoint for latent models (default: the one in the run "
                        "config)")
    p.add_argument("--unsafe-pickle", action="store_true", help=system.UNSAFE_PICKLE_HELP)
    p.add_argument("--text-encoder", default=None,
                   help="text models: the encoder directory, if it moved since training")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="U-Net autocast dtype; auto = bf16 (and TF32) on CUDA, fp32 on the CPU; "
                        "guidance and the sampler's steps stay fp32")
    p.add_argument("--threads", type=int, default=0,
                   help=system.THREADS_HELP)
    p.add_argument("--no-images", action="store_true",
                   help="skip the per-image PNGs (the .npz and grid are always written)")
    return p.parse_args(argv)


def check_args(args):
    """One-line errors for flags out of range, before any work."""
    if args.steps < 1 or args.batch_size < 1:
        raise SystemExit("--steps and --batch-size must be >= 1")
    try:
        scales = [float(s) for s in args.guidance.split(",")]
    except ValueError:
        raise SystemExit("--guidance must be comma-separated numbers, got "
                         f"{args.guidance!r}") from None
    if any(s < 0 for s in scales):
        raise SystemExit(f"--guidance scales must be >= 0, got {args.guidance}")
    if not 0 <= args.ddim_eta <= 1:
        raise SystemExit(f"--ddim-eta must be in [0, 1], got {args.ddim_eta}")
    if args.ddim_eta and args.sampler != "ddim":
        raise SystemExit(f"--ddim-eta applies to --sampler ddim, not {args.sampler}")
    if args.cads:
        try:
            tau = [float(v) for v in args.cads_tau.split(",")]
        except ValueError:
            tau = []
        if len(tau) != 2 or not 0 <= tau[0] < tau[1] <= 1:
            raise SystemExit("--cads-tau must be tau1,tau2 with 0 <= tau1 < tau2 <= 1, got "
                             f"{args.cads_tau}")
        if args.cads_scale < 0 or not 0 <= args.cads_psi <= 1:
            raise SystemExit("--cads-scale must be >= 0 and --cads-psi in [0, 1]")


if __name__ == "__main__":
    main()
