"""LDM's f4 autoencoders (Rombach et al. 2022) and their weights (small ones: train_vae.py).

The paper's LDM-4 models diffuse in the latent space of LDM's VQ-f4 autoencoder (App. B.3,
Table 3): 256x256x3 images -> 64x64x3 latents. Diffusion uses VQ's *pre-quantization* latents;
decoding quantizes first. Module names are LDM's own (ldm/modules/diffusionmodules/model.py), so a
CompVis checkpoint loads key for key; diffusers weights go through `diffusers_key_map`.
`python vae.py encode` fills the latent cache of data.py.

    python vae.py encode --dataset folder --data-root IN1K/train --preset vq-f4 \
        --weights vq-f4/model.ckpt --out latents/in1k --batch-size 64      # torchrun-able
"""
import argparse
import dataclasses
import hashlib
import json
import os
import pickle
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
import system

# ----------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class AutoencoderConfig:
    kind: str                  # "vq" (VQModel) or "kl" (AutoencoderKL)
    in_channels: int = 3       # image channels (out_ch == in_channels)
    ch: int = 128
    ch_mult: tuple = (1, 2, 4)  # len(ch_mult) - 1 stride-2 downsamplings: (1,2,4) -> f4
    num_res_blocks: int = 2
    z_channels: int = 3        # encoder output (KL: doubled for mean and log-variance)
    embed_dim: int = 3         # latent channels the diffusion model sees
    n_embed: int = 8192        # VQ codebook size (unused by KL)


PRESETS = {
    # LDM models/first_stage_models/vq-f4 and kl-f4 (55,322,782 params for VQ-f4)
    "vq-f4": AutoencoderConfig("vq"),
    "kl-f4": AutoencoderConfig("kl"),
    # one-channel 32x32 data (Fashion-MNIST padded to 32, digits resized): 8x8 latents
    "small-kl": AutoencoderConfig("kl", in_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                                  z_channels=4, embed_dim=4),
    "small-vq": AutoencoderConfig("vq", in_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                                  z_channels=3, embed_dim=3, n_embed=512),
    # tests
    "tiny-kl": AutoencoderConfig("kl", ch=32, ch_mult=(1, 2), num_res_blocks=1),
    "tiny-vq": AutoencoderConfig("vq", ch=32, ch_mult=(1, 2), num_res_blocks=1, n_embed=64),
}


# ----------------------------------------------------------------------------- building blocks
def Normalize(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = Normalize(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = Normalize(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions; q, k, v, proj_out are 1x1 convs (LDM)."""
    def __init__(self, c):
        super().__init__()
        self.norm = Normalize(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        # [B, 1, HW, C], contiguous: SDPA's fused kernels need a contiguous last dimension
        q, k, v = (m(h).flatten(2).transpose(1, 2).contiguous()[:, None] for m in (self.q, self.k,
                                                                                   self.v))
        h = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM's asymmetric padding (right and bottom only)


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def middle(c):
    """ResNet - attention - ResNet: the only attention in the autoencoder."""
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
    return mid


def run_middle(mid, h):
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg, out_channels):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = cfg.ch
        for i, cout in enumerate(widths):
            level = nn.Module()
            level.block = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout)
                                        for j in range(cfg.num_res_blocks))
            if i < len(widths) - 1:
                level.downsample = Downsample(cout)
            self.down.append(level)
            cin = cout
        self.mid = middle(cin)
        self.norm_out, self.conv_out = Normalize(cin), nn.Conv2d(cin, out_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(run_middle(self.mid, h))))


class Decoder(nn.Module):
    """up[i] works at the resolution of down[i]; it is built and run from the lowest resolution
    up."""
    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        cin = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = middle(cin)
        up = []
        for i in reversed(range(len(widths))):
            level = nn.Module()
            level.block = nn.ModuleList(ResnetBlock(cin if j == 0 else widths[i], widths[i])
                                        for j in range(cfg.num_res_blocks + 1))
            if i > 0:
                level.upsample = Upsample(widths[i])
            up.insert(0, level)
            cin = widths[i]
        self.up = nn.ModuleList(up)
        self.norm_out, self.conv_out = Normalize(cin), nn.Conv2d(cin, cfg.in_channels, 3, padding=1)

    def forward(self, z):
        h = run_middle(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, n_embed, dim):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, dim)

    def forward(self, z):
        """The nearest codebook entry (L2) for every latent vector of z [B,C,h,w]."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        # chunks bound the [vectors, n_embed] distance matrix (64 MiB per chunk for 8192 codes)
        idx = torch.cat([torch.cdist(c, self.embedding.weight).argmin(1) for c in flat.split(2048)])
        return self.embedding(idx).view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- the autoencoder
class Autoencoder(nn.Module):
    """encode(x) -> latent * scale; decode(z) -> image. These two are the only places `scale` is
    applied. VQ: the latent is the pre-quantization one (after quant_conv) and decode quantizes
    first; scale 1.0. KL: the latent is the posterior mean (mode); scale = 1/std measured on the
    data (`measure_scale`), None until measured or loaded from a checkpoint of ours."""

    def __init__(self, config, scale=None):
        super().__init__()
        self.config = config
        self.scale = 1.0 if config.kind == "vq" else scale
        kl = config.kind == "kl"
        self.encoder = Encoder(config, 2 * config.z_channels if kl else config.z_channels)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels if kl else config.z_channels,
                                    2 * config.embed_dim if kl else config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        if not kl:
            self.quantize = VectorQuantizer(config.n_embed, config.embed_dim)

    def moments(self, x):
        """encoder + quant_conv: VQ's pre-quantization latent, or KL's [mean, logvar] stacked on
        channels."""
        return self.quant_conv(self.encoder(x))

    def latent(self, x):
        """The unscaled latent: VQ pre-quantization, KL posterior mean."""
        h = self.moments(x)
        return h if self.config.kind == "vq" else h.chunk(2, dim=1)[0]

    def decode_latent(self, z):
        """Unscaled latent -> image; VQ quantizes to the nearest codebook entry first."""
        if self.config.kind == "vq":
            z = self.quantize(z)
        return self.decoder(self.post_quant_conv(z))

    def encode(self, x):
        return self.latent(x) * self.checked_scale()

    def decode(self, z):
        return self.decode_latent(z / self.checked_scale())

    def checked_scale(self):
        if self.scale is None:
            raise RuntimeError("KL latent scale not set: model.scale = vae.measure_scale(model, "
                               "images), or load_autoencoder(..., scale=cache.scale)")
        return self.scale


def config_from_dict(d):
    return AutoencoderConfig(**{**d, "ch_mult": tuple(d["ch_mult"])})


def from_our_checkpoint(ckpt):
    model = Autoencoder(config_from_dict(ckpt["config"]), scale=ckpt["scale"])
    model.load_state_dict(ckpt["model"])
    return model


@torch.no_grad()
def measure_scale(model, images, batch_size=64):
    """LDM's scale_by_std: 1/std of the unscaled latents over `images` (all elements pooled)."""
    z = torch.cat([model.latent(b.to(next(model.parameters()).device)).float().cpu()
                   for b in images.split(batch_size)])
    return 1.0 / z.flatten().std().item()


# ----------------------------------------------------------------------------- weights
DOWNLOAD_HINT = ("CompVis weights: the LDM repo's model zoo, "
                 "https://ommer-lab.com/files/latent-diffusion/vq-f4.zip (or kl-f4.zip), unzipped "
                 "to model.ckpt; diffusers weights: a VQModel / AutoencoderKL directory holding "
                 "diffusion_pytorch_model.safetensors (e.g. the `vqvae` folder of a DiffusionNoise "
                 "LDM pipeline)")


def weights_hash(path):
    """sha256 of the autoencoder's weights (a file, or a diffusers directory's weight files): a
    latent cache, the runs trained on it and their sampling must use the same weights."""
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, f) for root, _, names in os.walk(path) for f in names
        if f.endswith((".safetensors", ".bin", ".ckpt", ".pt")))
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def torch_load(path, unsafe_pickle=False):
    """Tensors and plain data only; a file that pickles more (a Lightning checkpoint) is read in
    full only when the user says so, since unpickling it can run any code it holds."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"autoencoder weights not found: {path}. {DOWNLOAD_HINT}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not unsafe_pickle:
            raise SystemExit(f"{path} holds pickled objects besides tensors (a Lightning "
                             f"checkpoint?); reading it can run code. If you trust the file, pass "
                             f"--unsafe-pickle ({str(e).splitlines()[0][:120]})") from None
        return torch.load(path, map_location="cpu", weights_only=False)


def is_our_checkpoint(ckpt):
    return isinstance(ckpt, dict) and {"config", "model", "scale"} <= ckpt.keys()


def load_exact(model, state_dict, source):
    """load_state_dict(strict), but a different model gives a readable list of what does not
    match."""
    ours = model.state_dict()
    missing = sorted(ours.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - ours.keys())
    shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(ours[k].shape)}"
              for k in ours.keys() & state_dict.keys() if state_dict[k].shape != ours[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{source} does not hold this autoencoder ({model.config}); is it a different model?\n "
            f" missing ({len(missing)}): {missing[:8]}\n  unexpected ({len(unexpected)}): "
            f"{unexpected[:8]}\n  shape mismatches ({len(shapes)}): {shapes[:8]}")
    model.load_state_dict(state_dict)


def compvis_state_dict(ckpt):
    """Our names are LDM's: keep the autoencoder's keys, drop loss.* (LPIPS and discriminator,
    training only). A full LDM checkpoint holds the autoencoder under first_stage_model.*: take
    that."""
    sd = ckpt.get("state_dict", ckpt)
    prefix = "first_stage_model."
    if any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return {k: v for k, v in sd.items() if not k.startswith("loss.")}


# our (LDM) name -> diffusers name; the decoder's up[i] is diffusers' up_blocks[L-1-i]
DIFFUSERS_RULES = [
    (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"\.mid\.block_1\.", ".mid_block.resnets.0."),
    (r"\.mid\.block_2\.", ".mid_block.resnets.1."),
    (r"\.mid\.attn_1\.", ".mid_block.attentions.0."),
    (r"\.attentions\.0\.norm\.", ".attentions.0.group_norm."),
    (r"\.attentions\.0\.(q|k|v)\.", r".attentions.0.to_\1."),
    (r"\.attentions\.0\.proj_out\.", ".attentions.0.to_out.0."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
    (r"\.norm_out\.", ".conv_norm_out."),
]
# diffusers' pre-0.14 attention names (its own loader renames them the same way)
DIFFUSERS_LEGACY = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.",
                    ".proj_attn.": ".to_out.0."}


def diffusers_key_map(config):
    """{our key: diffusers VQModel / AutoencoderKL key} for every tensor of Autoencoder(config)."""
    levels = len(config.ch_mult)
    def up(m):
        kind = "resnets" if m[2] == "block" else "upsamplers.0"
        return f"decoder.up_blocks.{levels - 1 - int(m[1])}.{kind}."
    mapping = {}
    for key in Autoencoder(config).to("meta").state_dict():
        name = re.sub(r"^decoder\.up\.(\d+)\.(block|upsample)\.", up, key)
        for pattern, repl in DIFFUSERS_RULES:
            name = re.sub(pattern, repl, name)
        mapping[key] = name
    return mapping


def diffusers_weights_file(path):
    """A VQModel / AutoencoderKL dir (or a pipeline dir with vqvae/ or vae/, or the file itself)."""
    for sub in ("", "vqvae", "vae"):
        for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
            f = os.path.join(path, sub, name)
            if os.path.isfile(f):
                return f
    if os.path.isfile(path):
        return path
    raise FileNotFoundError(f"no diffusion_pytorch_model.safetensors/.bin under {path}. "
                            f"{DOWNLOAD_HINT}")


def load_diffusers_weights(model, path):
    f = diffusers_weights_file(path)
    theirs = system.read_weights(f)
    for old, new in DIFFUSERS_LEGACY.items():
        theirs = {k.replace(old, new): v for k, v in theirs.items()}
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    sd = {}
    for ours, name in diffusers_key_map(model.config).items():
        if name in theirs:  # attention: diffusers' Linear [C,C] is LDM's 1x1 conv [C,C,1,1]
            v = theirs.pop(name)
            sd[ours] = v[:, :, None, None] if v.dim() == 2 and len(shapes[ours]) == 4 else v
    # left-overs are reported as unexpected
    sd.update({f"(diffusers) {k}": v for k, v in theirs.items()})
    load_exact(model, sd, f)


def diffusers_config(path):
    """The AutoencoderConfig of a diffusers VQModel / AutoencoderKL folder (its config.json), and
    the KL scaling_factor (VQ latents are not scaled: LDM's VQ models decode them as they are)."""
    folder = os.path.dirname(diffusers_weights_file(path))
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder} has no config.json: name the architecture with a "
                                f"preset (one of {sorted(PRESETS)})")
    with open(os.path.join(folder, "config.json")) as f:
        c = json.load(f)
    widths = c["block_out_channels"]
    kind = "vq" if "num_vq_embeddings" in c else "kl"
    config = AutoencoderConfig(kind, in_channels=c["in_channels"], ch=widths[0],
                               ch_mult=tuple(w // widths[0] for w in widths),
                               num_res_blocks=c["layers_per_block"],
                               z_channels=c["latent_channels"],
                               embed_dim=c.get("vq_embed_dim") or c["latent_channels"],
                               n_embed=c.get("num_vq_embeddings", 8192))
    return config, c.get("scaling_factor") if kind == "kl" else None


def load_autoencoder(weights, preset=None, scale=None, unsafe_pickle=False):
    """Our checkpoint (from `train_vae.py`: knows its config and scale), a CompVis model.ckpt, or a
    diffusers dir (its config.json names the architecture and the KL scale); a CompVis file needs
    `preset` (vq-f4 / kl-f4) and, for KL, `scale` (a latent cache's meta["scale"]) or a measured
    one (measure_scale)."""
    if os.path.isdir(weights):
        if preset:
            model = Autoencoder(preset_config(preset, weights))
        else:
            model = Autoencoder(*diffusers_config(weights))
        load_diffusers_weights(model, weights)
    else:
        ckpt = torch_load(weights, unsafe_pickle)
        if is_our_checkpoint(ckpt):
            model = from_our_checkpoint(ckpt)
        else:
            model = Autoencoder(preset_config(preset, weights))
            load_exact(model, compvis_state_dict(ckpt), weights)
    if scale is not None:
        model.scale = scale
    return model


def preset_config(preset, weights):
    if preset not in PRESETS:
        raise ValueError(f"{weights} is CompVis or diffusers weights: name the architecture with a "
                         f"preset (one of {sorted(PRESETS)}), got {preset!r}")
    return PRESETS[preset]


# ----------------------------------------------------------------------------- CLI
def encode(args):
    rank, world, device = system.setup_distributed()  # torchrun sets RANK
    system.set_threads(args.threads)
    dataset = data.load_dataset(args.dataset, args.data_root, args.split, args.image_size, args.pad)
    model = load_autoencoder(args.weights, args.preset, unsafe_pickle=args.unsafe_pickle)
    model = model.to(device).eval()
    if dataset[0][0].shape[0] != model.config.in_channels:
        raise SystemExit(f"{args.dataset} images have {dataset[0][0].shape[0]} channels, the "
                         f"autoencoder takes {model.config.in_channels}")
    preset = args.preset or next((k for k, v in PRESETS.items() if v == model.config), None)
    meta = {"preset": preset, "config": dataclasses.asdict(model.config),
            "weights": os.path.abspath(args.weights),
            "weights_sha256": weights_hash(args.weights),
            "dataset": args.dataset, "data_root": args.data_root, "split": args.split,
            "image_size": args.image_size,
            "pad": args.pad}
    if model.scale is None and not os.path.exists(data.cache_files(args.out)["meta"]):
        model.scale = measure_scale(model, data.spread_images(dataset))  # KL: LDM's scale_by_std
    data.encode_dataset(model, dataset, args.out, meta, args.batch_size, np.dtype(args.dtype),
                        args.num_workers,
                   rank, world, device)
    if dist.is_initialized():
        dist.destroy_process_group()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=system.HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("encode", formatter_class=system.HelpFormatter,
                       help="cache the latents of a dataset (data.py's latent cache)")
    data.add_dataset_arguments(e)
    e.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="autoencoder architecture: needed for CompVis weights (a diffusers "
                        "directory's config.json names its own)")
    e.add_argument("--weights", required=True,
                   help="our checkpoint (train_vae.py), a CompVis model.ckpt, "
                        "or a diffusers VQModel/AutoencoderKL directory")
    e.add_argument("--split", default="train", help="dataset split to encode")
    e.add_argument("--unsafe-pickle", action="store_true", help=system.UNSAFE_PICKLE_HELP)
    e.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                   help="stored latent dtype")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--batch-size", type=int, default=64, help="images per chunk")
    e.add_argument("--num-workers", type=int, default=2, help="DataLoader workers reading images")
    e.add_argument("--threads", type=int, default=0, help=system.THREADS_HELP)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        encode(args)
    except FileNotFoundError as e:  # a missing dataset or weights file: one line
        raise SystemExit(f"vae.py: {e}") from None


if __name__ == "__main__":
    main()
