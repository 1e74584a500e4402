r"""LDM's f4 autoencoders (Rombach et al. 2022): the first stage of the latent diffusion model.

The paper's LDM-4 models diffuse in the latent space of LDM's VQ-f4 autoencoder (App. B.3,
Table 3): 256x256x3 images -> 64x64x3 latents. Diffusion uses VQ's *pre-quantization* latents;
decoding quantizes first. Module names are LDM's own (ldm/modules/diffusionmodules/model.py), so a
CompVis checkpoint loads key for key (support/weights.py reads it, and diffusers' weights).
Small ones are trained by experiments/train_vae.py; support/encode.py caches a dataset's latents:

    python -m support.encode --dataset folder --data-root IN1K/train --preset vq-f4 \
        --weights vq-f4/model.ckpt --out latents/in1k --batch-size 64      # torchrun-able
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

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
    # the same for colour folders at 16x16 or 32x32 (4x4 or 8x8 latents)
    "small-kl-rgb": AutoencoderConfig("kl", ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
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
        h = self.norm(x)
        # one head over the H*W positions; contiguous: SDPA's fused kernels need it
        q, k, v = (rearrange(m(h), "b c h w -> b 1 (h w) c").contiguous()
                   for m in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(rearrange(h, "b 1 (h w) c -> b c h w", h=x.shape[2]))


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
                               "images), or weights.load_autoencoder(..., scale=cache.scale)")
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
