r"""Train a small autoencoder of vae.py for data where LDM's f4 weights do not fit (one-channel
32x32 Fashion-MNIST, digits, a small colour folder): LDM's first-stage losses without LPIPS and
the discriminator, held-out reconstruction error (the test split; for a folder a seeded 10 % it
does not train on), and the KL latent scale measured at the end.

    python -m experiments.train_vae --dataset fashion-mnist --pad --preset small-kl \
        --steps 600 --batch-size 16 --eval-images 10000 --out runs/vae-fmnist
    python -m experiments.train_vae --dataset folder --data-root data/emoji --image-size 32 \
        --preset small-kl-rgb --steps 2000 --batch-size 16 --out runs/vae-emoji32
"""
import argparse
import dataclasses
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import vae
from support import checkpoints, data, system


def training_loss(model, x, kl_weight=1e-6, beta=0.25):
    """LDM's first-stage losses without LPIPS and the discriminator (they need downloaded weights).
    KL: sum over pixels of |x - x_rec| + kl_weight * KL(q(z|x) || N(0, I)), both per image (LDM).
    VQ: mean |x - x_rec| + codebook loss ||sg[z] - e||^2 + beta ||z - sg[e]||^2 (VQ-VAE; LDM's
    legacy code swaps which term beta weighs), straight-through gradient to the encoder."""
    h = model.moments(x)
    if model.config.kind == "kl":
        mean, logvar = h.chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        rec = (x - model.decoder(model.post_quant_conv(z))).abs().flatten(1).sum(1).mean()
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean()
        return rec + kl_weight * kl
    e = model.quantize(h)
    codebook = F.mse_loss(e, h.detach()) + beta * F.mse_loss(h, e.detach())
    zq = h + (e - h).detach()
    return (x - model.decoder(model.post_quant_conv(zq))).abs().mean() + codebook


@torch.no_grad()
def reconstruction_error(model, images, batch_size=256):
    """MSE on pixels in [0, 1] and PSNR = 10 log10(1 / MSE), pooled over all pixels of `images`."""
    sq = sum(((model.decode_latent(model.latent(b)).clamp(-1, 1) - b) / 2).pow(2).sum().item()
             for b in images.split(batch_size))
    mse = sq / images.numel()
    return mse, 10 * math.log10(1.0 / mse)


def save_recon_grid(model, images, path, upscale=3):
    """Row 1: originals; row 2: their reconstructions."""
    import torchvision
    with torch.no_grad():
        rec = model.decode_latent(model.latent(images)).clamp(-1, 1)
    grid = torchvision.utils.make_grid(torch.cat([images, rec]), nrow=len(images), padding=2,
                                       value_range=(-1, 1))
    grid = F.interpolate(((grid + 1) / 2)[None], scale_factor=upscale, mode="nearest")[0]
    torchvision.utils.save_image(grid, path)


def held_out_from(dataset):
    if dataset in data.FILE_DATASETS:
        return "a seeded 10 % of the folder, not trained on"
    return "the test split"


def train(args):
    torch.manual_seed(args.seed)
    system.set_threads(args.threads)
    if os.path.exists(os.path.join(args.out, "ckpt.pt")) and not args.resume:
        raise SystemExit(f"{args.out} already holds an autoencoder (latent runs may depend on it): "
                         f"pass --resume to continue it, or choose another --out")
    cfg = vae.PRESETS[args.preset]
    train_set, test_set = data.train_test_split(args.dataset, args.data_root, args.image_size,
                                                args.pad, args.seed)
    channels = train_set[0][0].shape[0]
    if channels != cfg.in_channels:
        raise SystemExit(f"--preset {args.preset} takes {cfg.in_channels}-channel images; "
                         f"{args.dataset} has {channels} (presets: " + ", ".join(
                             f"{k} ({c.in_channels})" for k, c in vae.PRESETS.items()) + ")")
    model = vae.Autoencoder(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.5, 0.9))  # LDM's betas
    system.out_folder(args.out)
    system.remove_stale_temporaries(args.out)  # what a killed save left
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    step = 0
    if args.resume:
        if not os.path.exists(ckpt_path) and not os.path.exists(
                system.previous_checkpoint(ckpt_path)):
            raise SystemExit(f"--resume: no autoencoder checkpoint at {ckpt_path} to continue")
        try:  # a damaged ckpt.pt: the previous one, with a message
            ckpt = checkpoints.readable_checkpoint(ckpt_path)
        except ValueError as e:
            raise SystemExit(f"--resume: {e}") from None
        model.load_state_dict(ckpt["model"]), opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
    # a resumed run draws new batches
    g = torch.Generator().manual_seed(args.seed + 1_000_003 * step)
    # codebook from encoder outputs: avoids dead codes at the start
    if cfg.kind == "vq" and step == 0:
        with torch.no_grad():
            x = torch.stack([train_set[int(i)][0] for i in torch.randint(len(train_set), (256,),
                                                                         generator=g)])
            h = model.moments(x).permute(0, 2, 3, 1).reshape(-1, cfg.embed_dim)
            model.quantize.embedding.weight.copy_(h[torch.randint(len(h), (cfg.n_embed,),
                                                                  generator=g)])

    def checkpoint():
        state = {"config": dataclasses.asdict(cfg), "preset": args.preset,
                 "model": model.state_dict(),
                 "scale": model.scale, "optimizer": opt.state_dict(), "step": step,
                 "args": vars(args)}
        system.save_checkpoint(ckpt_path, state)  # atomic; the previous one kept beside it

    t0 = time.time()
    bar = tqdm(total=args.steps, initial=step, desc="train vae", dynamic_ncols=True)
    while step < args.steps:
        idx = torch.randint(len(train_set), (args.batch_size,), generator=g)
        x = torch.stack([train_set[int(i)][0] for i in idx])
        # flips, as cached
        x = torch.where(torch.rand(len(x), 1, 1, 1, generator=g) < 0.5, x.flip(-1), x)
        loss = training_loss(model, x, args.kl_weight, args.beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.update()
        if step % args.save_every == 0:
            checkpoint()
    bar.close()
    model.eval()
    if cfg.kind == "kl":
        model.scale = vae.measure_scale(model, data.spread_images(train_set))
    n = min(args.eval_images, len(test_set))
    held_out = torch.stack([test_set[i][0] for i in range(n)])
    mse, psnr = reconstruction_error(model, held_out)
    save_recon_grid(model, held_out[:16], os.path.join(args.out, "recon.png"))
    checkpoint()
    report = {"held_out_images": n, "held_out_from": held_out_from(args.dataset),
              "mse_01": mse, "psnr": psnr, "scale": model.scale,
              "train_seconds": time.time() - t0, "steps": step}
    system.write_json(os.path.join(args.out, "report.json"), report)
    print(json.dumps(report))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=system.HelpFormatter)
    data.add_dataset_arguments(p)
    p.add_argument("--preset", required=True, choices=sorted(vae.PRESETS),
                   help="autoencoder architecture (vae.py)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=64, help="images per step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--kl-weight", type=float, default=1e-6, help="KL weight (LDM kl-f4: 1e-6)")
    p.add_argument("--beta", type=float, default=0.25, help="VQ commitment weight (LDM: 0.25)")
    p.add_argument("--eval-images", type=int, default=2000,
                   help="first N held-out images (the test split; a folder's held-out 10 %%) "
                        "for MSE/PSNR")
    p.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (atomic)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    p.add_argument("--seed", type=int, default=0, help="seed for init, batches and flips")
    p.add_argument("--threads", type=int, default=0, help=system.THREADS_HELP)
    return p.parse_args(argv)


def main(argv=None):
    try:
        train(parse_args(argv))
    except FileNotFoundError as e:  # a missing dataset: one line
        raise SystemExit(f"train_vae.py: {e}") from None


if __name__ == "__main__":
    main()
