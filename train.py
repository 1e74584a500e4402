"""Train a class- or text-conditional (latent) diffusion model on slightly corrupted conditions
(Chen et al. 2024, Sec. 3), with CEP (Sec. 5, Eq. 8) or the IP baseline (Table 1).

    python train.py                                  # CPU demo: 8x8 digits, pixel space, minutes
    torchrun --nproc_per_node=8 train.py --preset ldm4-in1k --latents cache/in1k --eta 0.025 ...

One file from laptop to GPU node: DDP (NCCL on CUDA, gloo on CPU), bf16 autocast on CUDA. Every
random draw of a step is made for the whole global batch from a generator seeded by (seed, step)
and each rank takes its slice, so the result does not depend on the number of processes and a
resumed run continues exactly (text models: BERT's dropout is seeded per (seed, step, rank)).
The run's files, the resume contract and the loop's bookkeeping are in support/runs.py.
"""
import argparse
import contextlib
import math

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import cep
import corrupt
import diffusion
import unet
from support import data, runs, system


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = system.setup_distributed()
    system.set_threads(args.threads)
    # one train.py per run folder: a second one stops at once, naming the first
    with system.folder_lock(args.out, "train") if rank == 0 else contextlib.nullcontext():
        train(args, rank, world, device)


def train(args, rank, world, device):
    """The run: data and corruption, model, then the loop of Eq. 8's steps."""
    cuda = device.type == "cuda"
    tf32 = cuda and not args.no_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    bf16 = args.precision == "bf16" or (args.precision == "auto" and cuda)
    amp_dtype = torch.bfloat16 if bf16 else None
    images, clean, config, autoencoder = runs.prepare_data(args, device)
    try:  # fixed once (Sec. 3.1); a bad --eta, --corrupt-classes or captions file: one line
        conditions = corrupt_conditions(args, clean, config["num_classes"])
    except ValueError as e:
        raise SystemExit(f"train.py: {e}") from None
    B, accum = args.batch_size, args.grad_accum
    G, mine = B * world * accum, slice(rank * accum * B, (rank + 1) * accum * B)  # this rank's
    config["global_batch"] = G  # a resume keeps it
    model, ema, opt, step, lowest_loss = runs.build_model(args, config, device)
    if config["text"] and args.freeze_text_encoder:  # fixed states: each caption's once
        model.embedder.remember(conditions)
    if rank == 0:
        runs.write_run_files(args, config, clean, conditions, model, step)
    ddp = DDP(model, device_ids=[device.index] if cuda else None) if world > 1 else model
    train_model = torch.compile(ddp) if args.compile else ddp
    abar = diffusion.alphas_cumprod(diffusion.ldm_linear_betas()).to(device)
    text = isinstance(conditions, list)
    if not text:  # class labels and their prior live on the device
        prior = torch.bincount(torch.as_tensor(clean), minlength=config["num_classes"])
        prior = prior.float().to(device)
        conditions = torch.as_tensor(conditions, dtype=torch.int64).to(device)
    loader = runs.batches(args, images, step, world, rank, len(conditions), cuda)
    books = runs.Bookkeeping(args, config, step, G, rank, world, device, autoencoder,
                             captions=clean if text else None, lowest_loss=lowest_loss)
    # Ctrl-C / SIGTERM: save, then stop; closing the loader ends its DataLoader workers
    with system.stop_on_signals() as received, contextlib.closing(loader):
        while step < args.steps:
            # one step: every draw for the global batch of G from the (seed, step) generator
            try:
                x0 = torch.cat([next(loader) for _ in range(accum)]).to(device, non_blocking=True)
            except data.UnreadableImage as e:
                books.stop_on_unreadable(e, step, model, ema, opt)
            g = torch.Generator(device).manual_seed(system.seed_of(args.seed, step))
            if text:  # BERT's dropout draws from the global RNG: per (step, rank)
                torch.manual_seed(system.seed_of(args.seed, step, rank))
            drop = torch.rand(G, generator=g, device=device) < args.cond_drop  # guidance (Eq. 2)
            y = take(conditions, data.global_indices(step, G, len(conditions), args.seed))
            if args.corruption == "resample" and args.eta > 0:  # Table 7: re-drawn every step
                y = corrupt.resample_corruption(y, args.eta, prior, g)
            y = take(model.drop_conditions(y, drop), mine)
            x0 = runs.first_stage(x0, images, autoencoder, args.flip, g, G, mine)  # this rank's
            t = torch.randint(0, len(abar), (G,), generator=g, device=device)[mine]
            noise = torch.randn((G, *x0.shape[1:]), generator=g, device=device)[mine]
            ip = delta = mask = None
            if args.input_perturbation > 0:  # IP (Table 1): x_t from noise + lambda xi
                ip = torch.randn((G, *x0.shape[1:]), generator=g, device=device)[mine]
                ip = args.input_perturbation * ip
            if args.cep != "none":  # CEP (Eq. 8): delta for every sample, afresh every step
                delta = cep.cep_delta(args.cep, args.gamma, (G, *model.context_shape),
                                      generator=g, device=device)[mine]
            if args.embedding_dropout > 0:  # Table 6: dropout on c_theta(y), training only
                shape = (G, *model.context_shape)
                mask = cep.embedding_dropout_mask(args.embedding_dropout, shape, generator=g,
                                                  device=device)[mine]
            opt.zero_grad(set_to_none=True)
            for m in range(accum):  # micro-batches; DDP all-reduces after the last one
                part = slice(m * B, (m + 1) * B)
                sync = ddp.no_sync() if world > 1 and m < accum - 1 else contextlib.nullcontext()
                with sync, torch.autocast(device.type, dtype=amp_dtype, enabled=bool(amp_dtype)):
                    loss = diffusion.training_loss(train_model, x0[part], t[part], noise[part],
                                                   take(y, part), take(delta, part), abar,
                                                   input_noise=take(ip, part),
                                                   embedding_mask=take(mask, part))
                    (loss / accum).backward()
                books.loss_sum += loss.detach().float() / accum
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            update_ema(ema, model, min(args.ema_decay, (1 + step) / (10 + step)))  # LitEma
            step += 1
            books.after_step(step, model, ema, opt, received)
    books.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def take(values, index):
    """values[index] for a tensor (labels, on its device), a list (captions) or None."""
    if values is None or isinstance(index, slice):
        return None if values is None else values[index]
    if isinstance(values, list):
        return [values[j] for j in index.tolist()]
    return values[index.to(values.device, non_blocking=True)]


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
    try:
        subset = [int(c) for c in args.corrupt_classes.split(",")] if args.corrupt_classes else None
    except ValueError:
        raise SystemExit("--corrupt-classes takes comma-separated class indices, e.g. 0,2,4,6; "
                         f"got {args.corrupt_classes!r}") from None
    if args.corruption == "asymmetric" and not subset:
        raise SystemExit("--corruption asymmetric needs --corrupt-classes, e.g. 0,2,4,6")
    return corrupt.corrupt_labels(conditions, args.eta, args.corruption_seed, num_classes,
                                  mode=args.corruption, subset=subset)


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- ema + (1 - decay) (model - ema), one fused call over all tensors (fp32 weights)."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()],
                         1 - decay)


# ----------------------------------------------------------------------------- command line

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
                   help="latent cache dir written by `python -m support.encode` (the paper's "
                        "LDM setting)")
    d.add_argument("--vae", default=None,
                   help="autoencoder checkpoint: encode images on the fly (small datasets)")
    d.add_argument("--flip", action="store_true",
                   help="train on each image or its horizontal mirror, drawn per sample and step "
                        "(LDM flips ImageNet; a --latents cache must be encoded with --flip); off "
                        "by default: mirrored shoes or glyphs are other images")
    d.add_argument("--unsafe-pickle", action="store_true", help=system.UNSAFE_PICKLE_HELP)
    d.add_argument("--check-images", action="store_true",
                   help="folder / captions: read every image before training and list the "
                        "unreadable ones (without it, training stops at the first one it meets, "
                        "with a checkpoint)")
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
                        "attended), as the released CC3M models do (support/export.py)")
    m.add_argument("--text-length", type=int, default=77,
                   help="captions: tokens per caption (paper: 77; shorter is cheaper for short "
                        "captions)")
    m.add_argument("--freeze-text-encoder", action="store_true",
                   help="captions: keep the encoder fixed (the paper trains it; cheaper on a CPU: "
                        "each caption's token states are computed once, not at every step)")
    m.add_argument("--cep", default="none", choices=["none", "uniform", "gaussian"],
                   help="condition embedding perturbation (Sec. 5.1)")
    m.add_argument("--gamma", type=float, default=1.0, help="CEP strength (paper: 1)")
    m.add_argument("--embedding-dropout", type=float, default=0.0,
                   help="Table 6's alternative to CEP: dropout with this probability on the "
                        "condition embedding, in training only (paper: 0.1)")
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
                   help="AdamW learning rate (paper: 1e-4; the default suits the small CPU "
                        "models); a --resume may lower it, as advised after a blown-up loss "
                        "(recorded)")
    o.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    o.add_argument("--grad-clip", type=float, default=0.0,
                   help="max gradient norm; 0 = off (LDM trains without clipping)")
    o.add_argument("--ema-decay", type=float, default=0.9999,
                   help="EMA decay, warmed up as min(decay, (1+n)/(10+n)) with n from 0: one "
                        "update behind LDM's LitEma, which counts n from 1")
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
    s.add_argument("--sample-every", type=int, default=0,
                   help="write OUT/preview/stepN.png every N steps: the EMA model from fixed "
                        "noise (0 = never); the end of a run writes OUT/loss.png")
    s.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="autocast dtype; auto = bf16 on CUDA, fp32 on CPU")
    s.add_argument("--no-tf32", action="store_true", help="disable TF32 matmuls on CUDA")
    s.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    s.add_argument("--num-workers", type=int, default=2,
                   help="data loader workers for image-folder datasets")
    s.add_argument("--threads", type=int, default=0,
                   help=system.THREADS_HELP)
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    """One-line errors for flags out of range, before any work."""
    inf = math.inf
    ranges = [("--eta", args.eta, 0, 1), ("--cond-drop", args.cond_drop, 0, 1),
              ("--gamma", args.gamma, 0, inf),
              ("--embedding-dropout", args.embedding_dropout, 0, 0.99),
              ("--input-perturbation", args.input_perturbation, 0, inf),
              ("--steps", args.steps, 1, inf), ("--batch-size", args.batch_size, 1, inf),
              ("--grad-accum", args.grad_accum, 1, inf),
              ("--ckpt-every", args.ckpt_every, 1, inf), ("--log-every", args.log_every, 1, inf),
              ("--sample-every", args.sample_every, 0, inf),
              ("--text-length", args.text_length, 1, inf), ("--lr", args.lr, 0, inf),
              ("--ema-decay", args.ema_decay, 0, 1),
              ("--context-dim", 1 if args.context_dim is None else args.context_dim, 1, inf)]
    for flag, value, lo, hi in ranges:
        if not lo <= value <= hi:
            raise SystemExit(f"{flag} must be in [{lo}, {hi}], got {value}")
    if args.corrupt_classes and args.corruption != "asymmetric":
        raise SystemExit("--corrupt-classes applies to --corruption asymmetric")
    if args.latents and args.train_per_class is not None:
        raise SystemExit("--train-per-class draws from digits / fashion-mnist images; a --latents "
                         "cache holds the images it was encoded from: encode the subset instead")
    if args.latents and args.vae:
        raise SystemExit("--latents holds the latents of the autoencoder its cache names; --vae "
                         "encodes images on the fly: give one of the two")
    if args.dataset == "captions" and not (args.text_encoder or args.init):
        raise SystemExit("--dataset captions needs --text-encoder DIR (a local BERT-family model)")


if __name__ == "__main__":
    main()
