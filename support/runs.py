"""Runs of train.py: their files, the resume contract, --init, and the loop's bookkeeping.

What train.py needs around the model but a reader of the paper need not open first: the training
data as a run sees it (images or cached latents, the run config), which flags a resume may
change, the checks of --init, and the end of every step (log, non-finite checks, checkpoint,
stop on a signal). Reading a checkpoint or a released model as a Denoiser is checkpoints.py.
"""
import dataclasses
import functools
import json
import math
import os
import re
import signal
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import corrupt
import diffusion
import unet
from support import checkpoints, data, released, system, weights


# ----------------------------------------------------------------------------- presets


def choose_preset(name, size):
    """The --preset, checked against the input size; by default the preset made for that size."""
    made_for = [k for k, c in unet.PRESETS.items() if c.sample_size == size]
    listing = ", ".join(f"{k} ({c.sample_size})" for k, c in unet.PRESETS.items())
    if name is None:
        if not made_for:
            raise ValueError(f"no U-Net preset is made for {size}x{size} inputs (presets: "
                             f"{listing}); choose --image-size (folders and caption files "
                             "default to 256; on a CPU 16 or 32: experiments/README.md, section "
                             "7, gives their cost per step), or train on latents")
        return made_for[0]
    if name not in unet.PRESETS:
        raise ValueError(f"unknown --preset {name!r}; presets: {listing}")
    try:
        dataclasses.replace(unet.PRESETS[name], sample_size=size)
    except ValueError as e:
        raise ValueError(f"--preset {name} does not fit {size}x{size} inputs ({e}); presets made "
                         f"for this size: {', '.join(made_for) or 'none'}") from None
    return name


# ----------------------------------------------------------------------------- the run's data


def load_training_data(args):
    """Returns (images: an indexable of CHW tensors or a uint8 tensor, conditions, info dict)."""
    if args.latents:
        cache = data.LatentCache(args.latents)
        if args.flip and not cache.flip:
            raise ValueError(f"--flip: the latent cache {args.latents} holds no mirrored images; "
                             "encode it again with `python -m support.encode ... --flip`")
        conditions = cache.captions if cache.captions is not None else cache.labels
        info = dict(space="latent", latent_scale=cache.scale, vae=cache.meta.get("weights"),
                    vae_sha256=cache.meta.get("weights_sha256"),
                    vae_preset=cache.meta.get("preset"),
                    num_classes=cache.num_classes, class_names=cache.class_names)
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
            "preset": None if args.init else choose_preset(args.preset, x.shape[-1])}


def prepare_data(args, device):
    """The data (images, latents), its clean conditions, the run config and the frozen
    autoencoder (when images are encoded on the fly)."""
    try:  # the user's data and weights: one-line errors that name the file
        images, clean, info = load_training_data(args)
        autoencoder = None
        if args.vae:
            scale = released.latent_scale(args.init) if args.init else None  # text pipelines
            autoencoder = weights.load_autoencoder(args.vae, scale=scale,
                                               unsafe_pickle=args.unsafe_pickle)
            autoencoder = autoencoder.to(device).eval()
            info["latent_scale"] = autoencoder.scale
            info["vae_sha256"] = weights.weights_hash(args.vae)
        config = build_config(args, images, clean, info, autoencoder)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise SystemExit(f"train.py: {e}") from None
    return images, clean, config, autoencoder


def batches(args, images, step, world, rank, n, cuda):
    """This rank's micro-batches of images (or cached latent pairs) in the run's fixed order
    (support/data.py: one seeded permutation per epoch), from `step` on."""
    sampler = data.StepBatches(step, args.steps, args.batch_size, world, rank, n, args.seed,
                               args.grad_accum)
    workers = 0 if isinstance(images, data.InMemoryDataset) else args.num_workers
    loader = iter(torch.utils.data.DataLoader(data.ImagesOnly(images), num_workers=workers,
                                              batch_sampler=sampler, pin_memory=cuda,
                                              worker_init_fn=system.ignore_stop_signals))
    try:
        yield from loader
    except RuntimeError as e:  # a worker's (or the loop's own) read error: an unreadable file
        reasons = re.findall(r"cannot read (?:image file|latent) [^\n]*", str(e))  # last: the one,
        if not reasons:  # not the source line a worker's traceback quotes
            raise
        # end the workers now: they ignore the SIGTERM with which Python's exit would end them,
        # and the exception's traceback keeps this iterator (and them) alive: a run that never
        # exits
        getattr(loader, "_shutdown_workers", lambda: None)()
        raise data.UnreadableImage(reasons[-1]) from None
    finally:  # close() ends the workers (as above) when the run is done or stopped
        del loader


def first_stage(x0, images, autoencoder, flip, g, G, mine):
    """What the U-Net diffuses: cached latents, images encoded on the fly, or pixels; with
    --flip, each sample or its horizontal mirror, drawn from the step's generator g."""
    mirror = torch.randint(0, 2, (G,), generator=g, device=x0.device)[mine] if flip else None
    if isinstance(images, data.LatentCache):  # cached [B, views, C, h, w]; view 1: the mirror
        view = mirror if flip else torch.zeros(len(x0), dtype=torch.int64, device=x0.device)
        x0 = x0[torch.arange(len(x0), device=x0.device), view]
    elif flip:
        x0 = torch.where(mirror.bool()[:, None, None, None], x0.flip(-1), x0)
    if autoencoder is not None:
        with torch.no_grad():
            x0 = autoencoder.encode(x0)
    return x0


# ----------------------------------------------------------------------------- resuming and --init


# Flags that may change when resuming; every other flag must match the checkpoint's config.
# --batch-size (per process) may change when the number of processes does: the global batch is
# checked.


RESUMABLE = {"steps", "resume", "ckpt_every", "log_every", "sample_every", "num_workers",
             "compile", "out", "threads", "batch_size", "grad_accum", "class_names",
             "unsafe_pickle", "check_images", "data_changed_ok",
             "train_indices"}  # follows from --train-per-class and --split-seed, compared


# flags added after runs were made: a checkpoint without one was trained with its default
ADDED_LATER = {"context_dim": None, "no_attention_mask": False, "attention_mask": True,
               "embedding_dropout": 0.0}


def check_resumable(saved, config):
    """Refuse a resume whose flags differ from the checkpoint's (saved: its config and step),
    but for RESUMABLE ones and a lower --lr, the advice after a blow-up, which is recorded in
    config["lr_changes"] as [step, old, new]."""
    # before --flip, latent caches held both flips and runs on them always drew one
    saved = {**ADDED_LATER, "flip": bool(saved.get("latents")), **saved}
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
    lower_lr = {"lr"} if config["lr"] < saved["lr"] else set()
    config["lr_changes"] = saved.get("lr_changes", []) + (
        [[saved["step"], saved["lr"], config["lr"]]] if lower_lr else [])
    diff = {k: (saved.get(k), v) for k, v in config.items()
            if k not in RESUMABLE | data_keys | lower_lr | {"lr_changes"} and saved.get(k) != v}
    if diff:
        lines = "\n".join(f"  --{k.replace('_', '-')}: checkpoint {a!r}, now {b!r}"
                          for k, (a, b) in diff.items())
        raise SystemExit("the checkpoint was trained with another config; refusing to "
                         f"resume:\n{lines}")


def build_model(args, config, device):
    """Model, EMA and optimizer, fresh (seeded) or restored from the run's checkpoint, its step
    and the lowest loss it logged."""
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    if os.path.exists(ckpt_path) and not args.resume:
        raise SystemExit(f"{ckpt_path} exists: pass --resume to continue it, or choose another "
                         "--out")
    start = init_weights(args, config) if args.init else None  # sets config's U-Net and classes
    torch.manual_seed(args.seed)  # the initial weights
    try:  # a U-Net the flags cannot build (--head-channels 7), no text encoder: one line
        model = checkpoints.build_denoiser(config).to(device)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"train.py: {e}") from None
    if start is not None:
        model.load_state_dict(start)
    ema = checkpoints.build_denoiser(config).to(device).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    if not args.resume:
        return model, ema, opt, 0, None
    try:
        ckpt = checkpoints.readable_checkpoint(ckpt_path)
    except ValueError as e:
        raise SystemExit(f"--resume: {e}") from None
    check_resumable({**ckpt["config"], "step": ckpt["step"]}, config)
    if ckpt["step"] > args.steps:
        raise SystemExit(f"{ckpt_path} is at step {ckpt['step']}, past --steps {args.steps}: "
                         "nothing to do (raise --steps to train on)")
    print(f"resuming at step {ckpt['step']}")
    model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    opt.load_state_dict(ckpt["optimizer"])
    for group in opt.param_groups:  # a lowered --lr applies from here on
        group["lr"] = args.lr
    if config["lr_changes"] and config["lr_changes"][-1][0] == ckpt["step"]:
        print(f"learning rate lowered from {config['lr_changes'][-1][1]:g} to {args.lr:g} at "
              f"step {ckpt['step']} (recorded in config.json)")
    return model, ema, opt, ckpt["step"], ckpt.get("lowest_loss")  # the loss history


def init_weights(args, config):
    """--init: the weights of a released or earlier model (load); its U-Net and class
    table go into the run config, after checking that the data fits them."""
    try:
        start, start_config, _ = checkpoints.load(args.init, "ema", "cpu", args.text_encoder,
                                                  args.unsafe_pickle)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"train.py: --init: {e}") from None
    ucfg = checkpoints.unet_config(start_config)
    data = f"{config['channels']}x{config['size']}x{config['size']}"
    takes = f"{ucfg.in_channels}x{ucfg.sample_size}x{ucfg.sample_size}"
    if data != takes:
        raise SystemExit(f"--init: the data's {config['space']} inputs are {data}; the model "
                         f"takes {takes} (encode the data with the model's autoencoder: --vae "
                         f"DIR/vqvae, or python -m support.encode --weights DIR/vqvae)")
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


# ----------------------------------------------------------------------------- run files


def write_run_files(args, config, clean, corrupted, model, step):
    """The full config and the corruption manifest (which samples, which new condition); a
    fresh run (step 0) starts a new log."""
    os.makedirs(args.out, exist_ok=True)
    system.remove_stale_temporaries(args.out)
    if step == 0 and os.path.exists(os.path.join(args.out, "log.jsonl")):
        os.remove(os.path.join(args.out, "log.jsonl"))  # no lines of a crashed run
    system.write_json(os.path.join(args.out, "config.json"),
                      {**config, "parameters": sum(p.numel() for p in model.parameters())})
    mode = "swap" if config["text"] else args.corruption
    rate = corrupt.write_manifest(os.path.join(args.out, "corruption.tsv"), clean, corrupted,
                                  eta=args.eta, seed=args.corruption_seed, mode=mode)
    print(f"condition corruption: {mode}, eta {args.eta}, realised rate {rate:.4f}")
    print(summary(args, config, model, step))


def summary(args, config, model, step):
    """One line before the progress bar: the data, the space, the model and the budget."""
    n, size = config["num_examples"], config["size"]
    conditions = "captions" if config["text"] else f"{config['num_classes']} classes"
    epochs = args.steps * config["global_batch"] / n
    unet_name = config["preset"] or "the --init model's U-Net"
    start = f", from step {step}" if step else ""
    return (f"run {args.out}: {n:,} training examples ({conditions}), diffusing "
            f"{config['channels']}x{size}x{size} {config['space']}s, {unet_name} "
            f"({sum(p.numel() for p in model.parameters()):,} parameters), {args.steps:,} steps "
            f"of {config['global_batch']} = {epochs:.1f} epochs{start}, "
            f"{torch.get_num_threads()} CPU thread(s)")


class Bookkeeping:
    """The end of every training step: the progress bar, the log line, the checks of the loss
    and weights, the checkpoint (atomic, the previous one kept) and the stop on Ctrl-C / SIGTERM.
    A loss is refused as blown up when its mean over the last JUDGED samples or more (the
    logged intervals that make them up) exceeds BLOWN_UP times the lowest such mean so far in
    the run (kept in the checkpoint; a single small batch's loss varies far more than 10x with
    t), when a logged mean exceeds BLOWN_UP times the loss of predicting zero noise, or when it
    is not finite. The loss of a step measures the weights before it, so a checkpoint saved at or
    after the step before the bad interval holds the weights that went wrong: it is set aside as
    ckpt.bad.pt and the previous one, if it predates them, becomes ckpt.pt again; ckpt.pt is then
    always the last good checkpoint."""
    BLOWN_UP = 10.0
    JUDGED = 256  # samples in the mean a blow-up is judged on
    ZERO_PREDICTION = 1.0  # Eq. 8's loss of predicting eps = 0, eps ~ N(0, I): any mean 10x it

    def __init__(self, args, config, step, global_batch, rank, world, device, autoencoder,
                 captions=None, lowest_loss=None):
        self.args, self.config, self.G = args, config, global_batch
        self.autoencoder, self.captions = autoencoder, captions  # for the previews
        self.rank, self.world, self.device = rank, world, device
        self.ckpt_path = os.path.join(args.out, "ckpt.pt")
        self.bar = tqdm(total=args.steps, initial=step, disable=rank != 0, desc="train",
                        dynamic_ncols=True)
        self.loss_sum = torch.zeros((), device=device)  # read at log steps only: no host sync
        self.t0, self.steps_timed = time.time(), 0
        self.first_step, self.clock = step, None  # the wall-time estimate after a few steps
        self.lowest, self.saved = lowest_loss, [step] if step else []  # ckpt.pt, ckpt.prev.pt
        self.recent = []  # (first step, mean loss, samples) of the last logged intervals

    def after_step(self, step, model, ema, opt, received):
        """Log, check, save and stop as due after `step` (raises SystemExit to stop)."""
        args = self.args
        self.steps_timed += 1
        self.bar.update(1)
        if self.rank == 0:
            self.estimate(step)
        if self.rank == 0 and args.sample_every and step % args.sample_every == 0:
            preview(ema, self.config, self.autoencoder, step, args.out, self.captions)
        stopping = system.stop_requested(received, self.world, self.device)
        save_now = step % args.ckpt_every == 0 or step == args.steps or stopping
        logging = step % args.log_every == 0 or step == args.steps
        if logging or save_now:  # never save weights after a bad loss
            mean_loss = self.checked_loss(step, logging)
        if logging:
            if self.rank == 0:
                rate = self.steps_timed * self.G / (time.time() - self.t0)
                log_line(args.out, step, self.G, mean_loss, rate, self.device, self.bar)
            self.loss_sum.zero_()
            self.t0, self.steps_timed = time.time(), 0
        if save_now:
            self.save(step, model, ema, opt)
            # a signal during the save: stop now, on the checkpoint just written
            stopping = stopping or system.stop_requested(received, self.world, self.device)
        if stopping:
            if self.world > 1:
                dist.barrier()
            name = signal.Signals(received[0]).name if received else "a signal to another rank"
            raise SystemExit(f"stopped by {name} after step {step}: checkpoint written; "
                             f"continue with the same command and --resume")

    def checked_loss(self, step, logging):
        """The mean loss since the last log, refused when non-finite or when the mean over the
        newest JUDGED samples or more is blown up; a logged interval joins self.recent."""
        mean_loss = system.all_reduce_mean(self.loss_sum.clone(), self.world) / self.steps_timed
        first = step - self.steps_timed + 1
        steps = f"steps {first} to {step}"
        if not math.isfinite(mean_loss):
            raise SystemExit(f"non-finite loss ({mean_loss}) in {steps}; {self.last_good(first)}")
        intervals = [*self.recent, (first, mean_loss, self.steps_timed * self.G)]
        while sum(n for _, _, n in intervals[1:]) >= self.JUDGED:
            intervals.pop(0)  # keep the newest intervals that hold JUDGED samples or more
        if logging:
            self.recent = intervals
        samples = sum(n for _, _, n in intervals)
        window = sum(m * n for _, m, n in intervals) / samples if samples >= self.JUDGED else None
        bound = self.BLOWN_UP * min(self.ZERO_PREDICTION, self.lowest or self.ZERO_PREDICTION)
        if mean_loss > self.BLOWN_UP * self.ZERO_PREDICTION or (
                window is not None and self.lowest is not None and window > bound):
            # from the first interval over the bound on its own, else the whole window
            over = [f for f, m, _ in intervals if m > bound]
            first = over[0] if over else intervals[0][0]
            lowest = "none yet" if self.lowest is None else f"{self.lowest:.4g}"
            raise SystemExit(f"the loss blew up in steps {first} to {step}: {mean_loss:.4g} in "
                             f"the last logged steps, over {self.BLOWN_UP:g}x the lowest mean of "
                             f"{self.JUDGED} samples so far ({lowest}) or {self.BLOWN_UP:g}x "
                             "the loss of predicting zero noise (1); not saved (resume with a "
                             f"lower --lr?); {self.last_good(first)}")
        if window is not None:
            self.lowest = window if self.lowest is None else min(self.lowest, window)
        return mean_loss

    def last_good(self, first_bad):
        """Set aside the checkpoints whose weights gave the bad steps (saved at step
        first_bad - 1 or later); say which one is good."""
        bad = [s for s in self.saved if s >= first_bad - 1]
        good = [s for s in self.saved if s < first_bad - 1]
        if bad and self.rank == 0:
            os.replace(self.ckpt_path, self.ckpt_path[:-3] + ".bad.pt")
            if good:
                os.replace(system.previous_checkpoint(self.ckpt_path), self.ckpt_path)
        if not good:
            moved = " (its weights, now ckpt.bad.pt, gave these steps)" if bad else ""
            return f"no good checkpoint was written{moved}"
        moved = f"; ckpt.pt of step {bad[0]} gave these steps: now ckpt.bad.pt" if bad else ""
        return f"last good checkpoint: {self.ckpt_path} (step {good[0]}){moved}"

    def stop_on_unreadable(self, error, step, model, ema, opt):
        """An image (or cached latent) that cannot be read: save the steps done (one process;
        with several, the last checkpoint stays) and stop with one line naming it."""
        parts = [f"train.py: {error} (at step {step})"]
        if self.world == 1 and step not in self.saved and step > 0:
            self.save(step, model, ema, opt)
            parts.append(f"checkpoint of step {step} written")
        if "cannot read image file" in str(error):  # a damaged cache says what to do itself
            parts.append("replace the file and continue with --resume (--check-images lists "
                         "every unreadable file; removing it changes the data: "
                         "--data-changed-ok)")
        self.bar.close()  # the message is the last line
        raise SystemExit("; ".join(parts))

    def save(self, step, model, ema, opt):
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise SystemExit(f"non-finite weights at step {step}; not saved. Last good "
                             f"checkpoint: {self.ckpt_path}")
        if self.rank == 0:
            system.save_checkpoint(self.ckpt_path, {
                "config": self.config, "model": model.state_dict(), "ema": ema.state_dict(),
                "optimizer": opt.state_dict(), "step": step, "images_seen": step * self.G,
                "lowest_loss": self.lowest})
        self.saved = [step] + self.saved[:1]

    def estimate(self, step):
        """Once, after three steps past the first (compile and warm-up excluded): the wall time
        the run will take, and a word when that is over an hour on a CPU."""
        if step == self.first_step + 1:
            self.clock = time.time()
        elif self.clock and step == self.first_step + 4:
            per_step = (time.time() - self.clock) / 3
            minutes = per_step * (self.args.steps - step) / 60
            self.bar.write(f"about {minutes:.1f} min for the {self.args.steps - step:,} steps "
                           f"left ({per_step:.2f} s per step)")
            if minutes > 60 and self.device.type == "cpu":
                cheaper = (" (captions: --freeze-text-encoder --text-length 16 cost about 8x "
                           "less)" if self.config["text"] else "")
                self.bar.write(f"note: over an hour on this CPU; fewer --steps, a smaller "
                               f"--image-size or a GPU{cheaper}")

    def close(self):
        self.bar.close()
        if self.rank == 0:
            plot_loss(self.args.out)


@torch.no_grad()
def preview(ema, config, autoencoder, step, out, captions=None):
    """OUT/preview/stepN.png: the EMA model's samples from fixed noise (DPM-Solver++, 20 steps,
    guidance 2; pixels clipped as sample.py does): up to 10 classes x 4, or 8 captions x 2."""
    import torchvision  # imported when a preview is due
    device = next(ema.parameters()).device
    if config["text"]:
        conditions = list(dict.fromkeys(captions))[:8] * 2  # the first distinct captions
    else:
        conditions = torch.arange(min(config["num_classes"], 10), device=device).repeat(4)
    g = torch.Generator().manual_seed(0)
    shape = (len(conditions), config["channels"], config["size"], config["size"])
    x_T = torch.randn(shape, generator=g).to(device)
    abar = diffusion.alphas_cumprod(diffusion.ldm_linear_betas())
    context, null = ema.embedder(conditions), ema.embedder(ema.null_conditions(len(conditions)))
    eps = functools.partial(diffusion.guided_eps, ema.unet, context=context, null_context=null,
                            scale=2.0)
    if config["space"] == "pixel":
        eps = diffusion.clip_denoised(eps, abar)
    x = diffusion.sample(eps, x_T, "dpm", 20, abar)
    x = autoencoder.decode(x) if autoencoder is not None else x
    zoom = max(1, 32 // x.shape[-1])  # small images enlarged (nearest) to be seen
    x = x.repeat_interleave(zoom, dim=-2).repeat_interleave(zoom, dim=-1)
    os.makedirs(os.path.join(out, "preview"), exist_ok=True)
    rows = 4 if not config["text"] else 2
    torchvision.utils.save_image((x.clamp(-1, 1) + 1) / 2, os.path.join(
        out, "preview", f"step{step:07d}.png"), nrow=len(conditions) // rows, padding=1)


def plot_loss(out):
    """OUT/loss.png from OUT/log.jsonl: the training loss against images seen."""
    path = os.path.join(out, "log.jsonl")
    if not os.path.exists(path):
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["images_seen"] for r in lines], [r["loss"] for r in lines])
    ax.set(xlabel="images seen", ylabel="loss (mean over the log interval)", yscale="log",
           title=os.path.basename(os.path.normpath(out)))
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=100)
    plt.close(fig)


def log_line(out, step, global_batch, loss, rate, device, bar):
    mem = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    rec = {"step": step, "images_seen": step * global_batch, "loss": loss, "images_per_s": rate,
           "peak_mem_mb": mem}
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.0f}")
