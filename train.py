"""Train a class- or text-conditional (latent) diffusion model on slightly corrupted conditions
(Chen et al. 2024, Sec. 3), with CEP (Sec. 5, Eq. 8) or the IP baseline (Table 1).

    python train.py                                  # CPU demo: 8x8 digits, pixel space, minutes
    torchrun --nproc_per_node=8 train.py --preset ldm4-in1k --latents cache/in1k --eta 0.025 ...

One file from laptop to GPU node: DDP (NCCL on CUDA, gloo on CPU), bf16 autocast on CUDA.
Every random draw of a step (data order, t, noise, condition dropout, CEP, flips) is made for the
whole global batch from a generator seeded by (seed, step), and each rank takes its slice: the
result does not depend on the number of processes, and a resumed run continues exactly. Text
models are the exception: BERT's dropout draws from the global RNG, seeded by (seed, step, rank),
so a resume is exact but the result depends on the number of processes.
"""
import argparse
import dataclasses
import json
import math
import os
import signal
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import cep
import corrupt
import data
import denoiser
import diffusion
import released
import system
import unet
import vae

# Flags that may change when resuming; every other flag must match the checkpoint's config.
# --batch-size (per process) may change when the number of processes does: the global batch is
# checked.
RESUMABLE = {"steps", "resume", "ckpt_every", "log_every", "num_workers", "compile", "out",
             "threads",
             "batch_size", "grad_accum", "class_names", "unsafe_pickle", "check_images",
             "data_changed_ok",
             "train_indices"}  # follows from --train-per-class and --split-seed, compared


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=system.HelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="digits",
                   help="digits (embedded default) | fashion-mnist | folder | captions")
    d.add_argument("--data-root", default=None,
                   help="dataset location (folder, captions TSV, Fashion-MNIST idx dir)")
    d.add_argument("--image-size", type=int, default=None,
                   help="resize images to this size (folder, captions: centre crop; digits, "
                        "Fashion-MNIST: bilinear)")
    d.add_argument("--latents", default=None,
                   help="latent cache dir written by `python vae.py encode` (the paper's LDM "
                        "setting)")
    d.add_argument("--vae", default=None,
                   help="autoencoder checkpoint: encode images on the fly (small datasets)")
    d.add_argument("--unsafe-pickle", action="store_true", help=system.UNSAFE_PICKLE_HELP)
    d.add_argument("--check-images", action="store_true",
                   help="folder / captions: read every image before training and list the "
                        "unreadable ones (the first 100 are always read)")
    d.add_argument("--data-changed-ok", action="store_true",
                   help="--resume on a dataset whose size changed (e.g. bad files removed); the "
                        "data order after the resume then differs from an uninterrupted run")
    d.add_argument("--train-per-class", type=int, default=None,
                   help="digits, fashion-mnist: train on N images of each class only, drawn at "
                        "random by --split-seed (a small training set, where a clean model "
                        "starts to memorise)")
    d.add_argument("--split-seed", type=int, default=0,
                   help="seed of the --train-per-class draw (fixed across --seed: every seed "
                        "and arm of an experiment trains on the same images)")
    c = p.add_argument_group("condition corruption (Sec. 3.1, 3.3)")
    c.add_argument("--eta", type=float, default=0.0,
                   help="corruption ratio, e.g. 0.025 (paper: 0 to 0.20)")
    c.add_argument("--corruption", default="symmetric",
                   choices=["symmetric", "asymmetric", "resample"],
                   help="class labels: symmetric flips (fixed once), asymmetric within "
                        "--corrupt-classes, or resample = re-drawn every step (Table 7, 'random "
                        "data corruption'); captions are swapped")
    c.add_argument("--corrupt-classes", default=None,
                   help="asymmetric: comma-separated class indices, e.g. 0,2,4,6")
    c.add_argument("--rewritten-captions", default=None,
                   help="captions: a TSV index<TAB>caption of rewritten captions (Sec. 3.3)")
    c.add_argument("--corruption-seed", type=int, default=0,
                   help="seed that decides which samples are corrupted")
    m = p.add_argument_group("model and method")
    m.add_argument("--preset", default=None,
                   help="U-Net preset (default: the one made for the data's size): "
                        + ", ".join(f"{k} ({c.sample_size}x{c.sample_size})"
                                    for k, c in unet.PRESETS.items()))
    m.add_argument("--init", default=None,
                   help="fine-tune: start from the weights of a released pipeline directory, "
                        "LDM's cin256-v2 model.ckpt or a train.py run (its EMA weights); its "
                        "U-Net and class table replace the preset (released.py)")
    m.add_argument("--head-channels", type=int, default=None,
                   help="override the preset's head width (-1 = one head, the paper's model)")
    m.add_argument("--context-dim", type=int, default=None,
                   help="override the preset's condition width d (the class embedding's, for "
                        "CEP's gamma / sqrt(d); paper: 512)")
    m.add_argument("--text-encoder", default=None,
                   help="captions: local dir of a BERT-family encoder (paper: bert-base-uncased)")
    m.add_argument("--no-attention-mask", action="store_true",
                   help="captions: call the text encoder with the token ids only (padding "
                        "attended), as the released CC3M models do (released.py export)")
    m.add_argument("--text-length", type=int, default=77,
                   help="captions: tokens per caption (paper: 77; shorter is cheaper for short "
                        "captions)")
    m.add_argument("--freeze-text-encoder", action="store_true",
                   help="captions: keep the encoder fixed (the paper trains it; cheaper on a CPU)")
    m.add_argument("--cep", default="none", choices=["none", "uniform", "gaussian"],
                   help="condition embedding perturbation (Sec. 5.1)")
    m.add_argument("--gamma", type=float, default=1.0, help="CEP strength (paper: 1)")
    m.add_argument("--input-perturbation", type=float, default=0.0,
                   help="IP baseline lambda (Ning et al. 2023; paper: 0.1)")
    m.add_argument("--cond-drop", type=float, default=0.1,
                   help="probability of the null condition in training (guidance)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=1500, help="training steps (paper: 178K for IN-1K)")
    o.add_argument("--batch-size", type=int, default=64,
                   help="per-process batch (paper: 64 per GPU on 8 GPUs)")
    o.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per step: global batch = batch-size x processes x "
                        "grad-accum (paper: 512 = 64 x 8 x 1; one GPU: 64 x 1 x 8)")
    o.add_argument("--lr", type=float, default=1e-3,
                   help="AdamW learning rate (paper: 1e-4; the default suits the small CPU models)")
    o.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    o.add_argument("--grad-clip", type=float, default=0.0,
                   help="max gradient norm; 0 = off (LDM trains without clipping)")
    o.add_argument("--ema-decay", type=float, default=0.9999,
                   help="EMA decay, warmed up as LDM's LitEma: min(decay, (1+n)/(10+n))")
    s = p.add_argument_group("system")
    s.add_argument("--out", default="runs/demo",
                   help="run directory: config, log, manifest, checkpoint")
    s.add_argument("--resume", action="store_true",
                   help="continue from OUT/ckpt.pt exactly where it stopped")
    s.add_argument("--seed", type=int, default=0,
                   help="training seed (data order, noise, t, dropout, CEP)")
    s.add_argument("--ckpt-every", type=int, default=1000,
                   help="write the checkpoint every N steps and at the end; the previous one is "
                        "kept as ckpt.prev.pt, so saving needs room for three checkpoints")
    s.add_argument("--log-every", type=int, default=50, help="log a JSON line every N steps")
    s.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="autocast dtype; auto = bf16 on CUDA, fp32 on CPU")
    s.add_argument("--no-tf32", action="store_true", help="disable TF32 matmuls on CUDA")
    s.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    s.add_argument("--num-workers", type=int, default=2,
                   help="data loader workers for image-folder datasets")
    s.add_argument("--threads", type=int, default=0,
                   help=system.THREADS_HELP)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the data
def load_training_data(args):
    """Returns (images: an indexable of CHW tensors or a uint8 tensor, conditions, info dict)."""
    if args.latents:
        cache = data.LatentCache(args.latents)
        conditions = cache.captions if cache.captions is not None else cache.labels
        info = dict(space="latent", latent_scale=cache.scale, vae=cache.meta.get("weights"),
                    vae_sha256=cache.meta.get("weights_sha256"),
                    vae_preset=cache.meta.get("preset"),
                    num_classes=cache.num_classes)
        return cache, conditions, info
    ds = data.load_dataset(args.dataset, args.data_root, split="train", image_size=args.image_size)
    kept = None
    if args.train_per_class is not None:  # a seeded stratified draw, recorded in the config
        ds, kept = data.per_class_subset(ds, args.train_per_class, args.split_seed)
    if args.check_images and getattr(ds, "paths", None):
        bad = data.unreadable_images(ds.paths)
        if bad:
            listing = "; ".join(f"{p} ({e})" for p, e in bad[:5])
            raise SystemExit(f"{len(bad)} unreadable images: {listing}"
                             + (" ..." if len(bad) > 5 else ""))
    text = getattr(ds, "captions", None) is not None
    info = dict(space="latent" if args.vae else "pixel", vae=args.vae,
                num_classes=None if text else ds.num_classes,
                class_names=None if text else ds.class_names,  # labels of the sample grids
                train_indices=None if kept is None else kept.tolist())
    return ds, (ds.captions if text else ds.labels), info


def corrupt_conditions(args, conditions, num_classes):
    """Fixed corruption, decided once by --corruption-seed (Sec. 3.1); 'resample' is done per
    step."""
    if isinstance(conditions, list):
        if args.rewritten_captions:  # Sec. 3.3: LLM-rewritten captions, given as a file
            rewritten = corrupt.load_rewritten_captions(args.rewritten_captions, len(conditions))
            conditions = corrupt.apply_rewritten_captions(conditions, rewritten)
        if args.eta == 0:
            return conditions
        return corrupt.swap_captions(conditions, args.eta, args.corruption_seed)
    if args.eta == 0 or args.corruption == "resample":
        return conditions
    subset = [int(c) for c in args.corrupt_classes.split(",")] if args.corrupt_classes else None
    if args.corruption == "asymmetric" and not subset:
        raise SystemExit("--corruption asymmetric needs --corrupt-classes, e.g. 0,2,4,6")
    return corrupt.corrupt_labels(conditions, args.eta, args.corruption_seed, num_classes,
                                  mode=args.corruption, subset=subset)


def step_generator(seed, step, device):
    """The generator of every random draw of one step (same on all ranks)."""
    return torch.Generator(device).manual_seed(system.seed_of(seed, step))


# ----------------------------------------------------------------------------- resuming
# flags added after runs were made: a checkpoint without one was trained with its default
ADDED_LATER = {"context_dim": None, "no_attention_mask": False, "attention_mask": True}


def check_resumable(saved, config):
    saved = {**ADDED_LATER, **saved}
    saved_batch = saved.get("global_batch", saved["batch_size"])
    if saved_batch != config["global_batch"]:
        per_step = config["global_batch"] // config["batch_size"]  # processes x grad-accum
        hint = max(1, saved_batch // per_step)
        raise SystemExit(f"the checkpoint's global batch is {saved_batch}, this run's "
                         f"{config['global_batch']} ({per_step} micro-batches of "
                         f"{config['batch_size']}): keep it with --batch-size and --grad-accum "
                         f"whose product with the number of processes is {saved_batch} "
                         f"(e.g. --batch-size {hint})")
    data_keys = {"num_examples"} if config["data_changed_ok"] else set()  # the user said so
    diff = {k: (saved.get(k), v) for k, v in config.items()
            if k not in RESUMABLE | data_keys and saved.get(k) != v}
    if diff:
        lines = "\n".join(f"  --{k.replace('_', '-')}: checkpoint {a!r}, now {b!r}"
                          for k, (a, b) in diff.items())
        raise SystemExit("the checkpoint was trained with another config; refusing to "
                         f"resume:\n{lines}")


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- ema + (1 - decay) (model - ema), one fused call over all tensors (fp32 weights)."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()],
                         1 - decay)


# ----------------------------------------------------------------------------- training
def build_config(args, images, conditions, info, autoencoder):
    """All flags plus what the data decides: the diffusion space's channels and size."""
    # one image (or latent)
    x = images[0][0][0] if isinstance(images, data.LatentCache) else images[0][0]
    if autoencoder is not None:
        with torch.no_grad():
            x = autoencoder.encode(x[None].to(next(autoencoder.parameters()).device))[0]
    return {**vars(args), **info, "text": isinstance(conditions, list), "channels": x.shape[0],
            "size": x.shape[-1], "num_examples": len(conditions),
            "attention_mask": not args.no_attention_mask,
            "preset": None if args.init else denoiser.choose_preset(args.preset, x.shape[-1])}


def prepare_data(args, device):
    """Data, its (possibly corrupted) conditions, the run config and the frozen autoencoder."""
    try:  # the user's data and weights: one-line errors that name the file
        images, clean, info = load_training_data(args)
        autoencoder = None
        if args.vae:
            scale = released.latent_scale(args.init) if args.init else None  # text pipelines
            autoencoder = vae.load_autoencoder(args.vae, scale=scale,
                                               unsafe_pickle=args.unsafe_pickle)
            autoencoder = autoencoder.to(device).eval()
            info["latent_scale"], info["vae_sha256"] = autoencoder.scale, vae.weights_hash(args.vae)
        config = build_config(args, images, clean, info, autoencoder)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"train.py: {e}") from None
    corrupted = corrupt_conditions(args, clean, config["num_classes"])
    return images, clean, corrupted, config, autoencoder


def build_model(args, config, device, ckpt_path):
    """Model, EMA and optimizer, fresh (seeded) or restored from the run's checkpoint."""
    if os.path.exists(ckpt_path) and not args.resume:
        raise SystemExit(f"{ckpt_path} exists: pass --resume to continue it, or choose another "
                         "--out")
    start = init_weights(args, config) if args.init else None  # sets config's U-Net and classes
    torch.manual_seed(args.seed)  # the initial weights
    model = denoiser.Denoiser(config).to(device)
    if start is not None:
        model.load_state_dict(start)
    ema = denoiser.Denoiser(config).to(device).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    if not args.resume:
        return model, ema, opt, 0
    ckpt = system.load_checkpoint(ckpt_path, device)
    check_resumable(ckpt["config"], config)
    print(f"resuming at step {ckpt['step']}")
    model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    opt.load_state_dict(ckpt["optimizer"])
    return model, ema, opt, ckpt["step"]


def init_weights(args, config):
    """--init: the weights of a released or earlier model (denoiser.load); its U-Net and class
    table go into the run config, after checking that the data fits them."""
    try:
        start, start_config, _ = denoiser.load(args.init, "ema", "cpu", args.text_encoder,
                                               args.unsafe_pickle)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"train.py: --init: {e}") from None
    ucfg = denoiser.unet_config(start_config)
    data = f"{config['channels']}x{config['size']}x{config['size']}"
    takes = f"{ucfg.in_channels}x{ucfg.sample_size}x{ucfg.sample_size}"
    if data != takes:
        raise SystemExit(f"--init: the data's {config['space']} inputs are {data}; the model "
                         f"takes {takes} (encode the data with the model's autoencoder: --vae "
                         f"DIR/vqvae, or vae.py encode --weights DIR/vqvae)")
    scale = start_config.get("latent_scale")
    if scale is not None and config.get("latent_scale") != scale:
        raise SystemExit(f"--init: the model works on latents x {scale}, the data's are x "
                         f"{config.get('latent_scale')} (encode with the model's autoencoder: "
                         "--vae DIR/vqvae)")
    if start_config["text"] != config["text"]:
        raise SystemExit("--init: a class model needs class labels, a text model captions")
    if not config["text"] and config["num_classes"] > start_config["num_classes"]:
        raise SystemExit(f"--init: the data has {config['num_classes']} classes, the model "
                         f"{start_config['num_classes']}")
    config.update(unet=dataclasses.asdict(ucfg), num_classes=start_config["num_classes"],
                  init=args.init)
    if config["text"]:  # the model's own text encoder, tokenizer and way of calling it
        config.update({k: start_config.get(k) for k in ("text_encoder", "tokenizer",
                                                        "attention_mask", "text_length")})
    return start.state_dict()


def draw_noise(args, g, G, mine, shape, context_shape, num_train_steps, device):
    """t, noise, IP noise and the CEP delta, drawn for the global batch; this rank's slice."""
    t = torch.randint(0, num_train_steps, (G,), generator=g, device=device)[mine]
    noise = torch.randn((G, *shape), generator=g, device=device)[mine]
    ip = delta = None
    if args.input_perturbation > 0:  # IP baseline: x_t from noise + lambda xi
        ip = args.input_perturbation * torch.randn((G, *shape), generator=g, device=device)[mine]
    if args.cep != "none":  # CEP, Eq. 8
        delta = cep.cep_delta(args.cep, args.gamma, (G, *context_shape), generator=g, device=device)
        delta = delta[mine]
    return t, noise, ip, delta


def check_args(args):
    """One-line errors for flags out of range, before any work."""
    inf = math.inf
    ranges = [("--eta", args.eta, 0, 1), ("--cond-drop", args.cond_drop, 0, 1),
              ("--gamma", args.gamma, 0, inf),
              ("--input-perturbation", args.input_perturbation, 0, inf),
              ("--steps", args.steps, 1, inf), ("--batch-size", args.batch_size, 1, inf),
              ("--grad-accum", args.grad_accum, 1, inf),
              ("--ckpt-every", args.ckpt_every, 1, inf), ("--log-every", args.log_every, 1, inf),
              ("--text-length", args.text_length, 1, inf), ("--lr", args.lr, 0, inf),
              ("--ema-decay", args.ema_decay, 0, 1),
              ("--context-dim", 1 if args.context_dim is None else args.context_dim, 1, inf)]
    for flag, value, lo, hi in ranges:
        if not lo <= value <= hi:
            raise SystemExit(f"{flag} must be in [{lo}, {hi}], got {value}")
    if args.corrupt_classes and args.corruption != "asymmetric":
        raise SystemExit("--corrupt-classes applies to --corruption asymmetric")
    if args.dataset == "captions" and not (args.text_encoder or args.init):
        raise SystemExit("--dataset captions needs --text-encoder DIR (a local BERT-family model)")


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    rank, world, device = system.setup_distributed()
    system.set_threads(args.threads)
    cuda = device.type == "cuda"
    tf32 = cuda and not args.no_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    bf16 = args.precision == "bf16" or (args.precision == "auto" and cuda)
    amp_dtype = torch.bfloat16 if bf16 else None
    images, clean, conditions, config, autoencoder = prepare_data(args, device)
    config["global_batch"] = args.batch_size * world * args.grad_accum  # a resume keeps it
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    model, ema, opt, step = build_model(args, config, device, ckpt_path)
    if rank == 0:
        write_run_files(args, config, clean, conditions, model)
        if step == 0 and os.path.exists(os.path.join(args.out, "log.jsonl")):
            os.remove(os.path.join(args.out, "log.jsonl"))  # a fresh run: no lines of a crashed one
    ddp = DDP(model, device_ids=[device.index] if cuda else None) if world > 1 else model
    train_model = torch.compile(ddp) if args.compile else ddp

    abar = diffusion.alphas_cumprod(diffusion.ldm_linear_betas()).to(device)
    if not config["text"]:  # class labels and their prior live on the device
        prior = torch.bincount(torch.as_tensor(clean), minlength=config["num_classes"])
        prior = prior.float().to(device)
        conditions = torch.as_tensor(conditions, dtype=torch.int64).to(device)
    else:
        prior = None
    B, accum = args.batch_size, args.grad_accum
    G, mine = B * world * accum, slice(rank * accum * B, (rank + 1) * accum * B)  # this rank's
    loader = iter(torch.utils.data.DataLoader(
        data.ImagesOnly(images),
        num_workers=0 if isinstance(images, data.InMemoryDataset) else args.num_workers,
        batch_sampler=data.StepBatches(step, args.steps, B, world, rank, len(conditions), args.seed,
                                  accum),
        pin_memory=cuda))
    bar = tqdm(total=args.steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)
    loss_sum, t0, steps_timed = torch.zeros((), device=device), time.time(), 0  # read at log steps
    with system.stop_on_signals() as received:  # Ctrl-C / SIGTERM: save, then stop
        while step < args.steps:
            x0, conds, g = step_batch(args, step, loader, images, conditions, prior, model,
                                      autoencoder, G, mine, rank)
            draws = draw_noise(args, g, G, mine, x0.shape[1:], model.context_shape, len(abar),
                               device)
            opt.zero_grad(set_to_none=True)
            accumulate_gradients(args, train_model, ddp, x0, conds, draws, abar, amp_dtype,
                                 world, loss_sum)
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            # LDM's LitEma warm-up
            update_ema(ema, model, min(args.ema_decay, (1 + step) / (10 + step)))
            step += 1
            steps_timed += 1
            bar.update(1)
            stopping = system.stop_requested(received, step, args.log_every, world, device)
            save_now = step % args.ckpt_every == 0 or step == args.steps or stopping
            if step % args.log_every == 0 or save_now:  # never save weights after a non-finite loss
                mean_loss = system.all_reduce_mean(loss_sum.clone(), world) / steps_timed
                if not math.isfinite(mean_loss):
                    raise SystemExit(f"non-finite loss ({mean_loss}) in steps "
                                     f"{step - steps_timed + 1} to {step}; last good checkpoint: "
                                     f"{ckpt_path}")
            if step % args.log_every == 0 or step == args.steps:
                if rank == 0:
                    log_line(args.out, step, G, mean_loss, steps_timed * G / (time.time() - t0),
                             device, bar)
                loss_sum.zero_()
                t0, steps_timed = time.time(), 0
            if save_now and not all(torch.isfinite(p).all() for p in model.parameters()):
                raise SystemExit(f"non-finite weights at step {step}; not saved. Last good "
                                 f"checkpoint: {ckpt_path}")
            if rank == 0 and save_now:
                system.save_checkpoint(ckpt_path, {"config": config, "model": model.state_dict(),
                                            "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                                            "step": step, "images_seen": step * G})
            if stopping:
                if world > 1:
                    dist.barrier()
                name = signal.Signals(received[0]).name if received else "a signal to another rank"
                raise SystemExit(f"stopped by {name} after step {step}: checkpoint written; "
                                 f"continue with the same command and --resume")
    bar.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def step_batch(args, step, loader, images, conditions, prior, model, autoencoder, G, mine, rank):
    """This rank's images (or latents) of the step (slice `mine` of the global batch of G) and
    their conditions, and the generator of the step's remaining draws (the same on all ranks)."""
    device = next(model.parameters()).device
    x0 = torch.cat([next(loader) for _ in range(args.grad_accum)]).to(device, non_blocking=True)
    g = step_generator(args.seed, step, device)
    if isinstance(conditions, list):  # BERT's dropout draws from the global RNG: per (step, rank)
        torch.manual_seed(system.seed_of(args.seed, step, rank))
    idx = data.global_indices(step, G, len(conditions), args.seed)
    conds = batch_conditions(args, model, conditions, prior, idx, mine, g, device)
    if isinstance(images, data.LatentCache):  # both horizontal flips are cached: one per sample
        flip = torch.randint(0, 2, (G,), generator=g, device=device)[mine]
        x0 = x0[torch.arange(len(x0), device=device), flip]
    if autoencoder is not None:
        with torch.no_grad():
            x0 = autoencoder.encode(x0)
    return x0, conds, g


def accumulate_gradients(args, train_model, ddp, x0, conds, draws, abar, amp_dtype, world,
                         loss_sum):
    """Forward and backward over the micro-batches of --batch-size (DDP all-reduces after the
    last one); their mean loss is added to loss_sum on the device (no host sync)."""
    t, noise, ip, delta = draws
    B, accum = args.batch_size, args.grad_accum
    for m in range(accum):
        part = slice(m * B, (m + 1) * B)
        sync = ddp.no_sync() if world > 1 and m < accum - 1 else nullcontext()
        with sync, torch.autocast(x0.device.type, dtype=amp_dtype, enabled=bool(amp_dtype)):
            d = delta[part] if delta is not None else None
            loss = diffusion.training_loss(lambda x, tt, c: train_model(x, tt, c, d), x0[part],
                                           t[part], noise[part], conds[part], abar,
                                           input_noise=ip[part] if ip is not None else None)
            (loss / accum).backward()
        loss_sum += loss.detach().float() / accum


def batch_conditions(args, model, conditions, prior, idx, mine, g, device):
    """This rank's (possibly corrupted) conditions, with condition dropout for guidance; class
    labels, the dropout mask and the resampled flips stay on the device (no host sync)."""
    drop = torch.rand(len(idx), generator=g, device=device) < args.cond_drop
    if isinstance(conditions, list):  # captions
        return model.drop_conditions([conditions[j] for j in idx.tolist()], drop)[mine]
    labels = conditions[idx.to(device, non_blocking=True)]  # conditions: int64 [N] on the device
    if args.corruption == "resample" and args.eta > 0:  # Table 7: re-drawn every step
        labels = corrupt.resample_corruption(labels, args.eta, prior, g)
    return model.drop_conditions(labels, drop)[mine]


def log_line(out, step, global_batch, loss, rate, device, bar):
    mem = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    rec = {"step": step, "images_seen": step * global_batch, "loss": loss, "images_per_s": rate,
           "peak_mem_mb": mem}
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.0f}")


def write_run_files(args, config, clean, corrupted, model):
    """The full config and the corruption manifest (which samples, which new condition)."""
    system.write_json(os.path.join(args.out, "config.json"),
                      {**config, "parameters": sum(p.numel() for p in model.parameters())})
    mode = "swap" if config["text"] else args.corruption
    rate = corrupt.write_manifest(os.path.join(args.out, "corruption.tsv"), clean, corrupted,
                                  eta=args.eta, seed=args.corruption_seed, mode=mode)
    print(f"condition corruption: {mode}, eta {args.eta}, realised rate {rate:.4f}")


if __name__ == "__main__":
    main()
