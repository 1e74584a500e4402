"""The LDM-4 latent U-Net: LDM's "openaimodel" U-Net with spatial transformers.

Rombach et al. 2022 (LDM): ldm/modules/diffusionmodules/openaimodel.py + ldm/modules/attention.py.
The paper trains LDM's cin256-v2 model (Table 3, App. B.3): widths 192/384/576/960, 2 res-blocks
per level (3 on the way up), a spatial transformer (self-attn, cross-attn to the condition
tokens, GEGLU feed-forward) at the 32, 16 and 8 maps of a 64x64x3 latent and in the middle block,
one attention head, 512-d context: 400,920,579 parameters.

Module names follow LDM's (those diffusers' conversion script reads), so an LDM checkpoint's
`model.diffusion_model.*` weights load as they are; diffusers-format weights (the paper's
released models) map to them in support/weights.py.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


@dataclass
class UNetConfig:
    in_channels: int
    out_channels: int
    model_channels: int  # width of the first level; level i has model_channels * channel_mult[i]
    channel_mult: tuple
    num_res_blocks: int  # per level on the way down (num_res_blocks + 1 on the way up)
    attention_resolutions: tuple  # feature-map sizes (for a sample_size input) with a transformer
    sample_size: int  # input height/width that attention_resolutions refer to
    context_dim: int  # width D of the condition tokens [B, L, D]
    # -1: one head as wide as the feature map (the paper's model, Table 3). N > 0: N-wide heads,
    # a DIFFERENT model with the same parameter count (faster: fits the flash-attention kernel).
    head_channels: int
    transformer_depth: int = 1
    dropout: float = 0.0  # in the res-blocks, as LDM

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)  # lists come back from config.json
        self.attention_resolutions = tuple(self.attention_resolutions)
        levels = [self.sample_size // 2**i for i in range(len(self.channel_mult))]
        bad = [r for r in self.attention_resolutions if r not in levels]
        if bad:
            raise ValueError(f"attention_resolutions {bad} are not feature-map sizes of this U-Net "
                             f"(sample_size {self.sample_size} gives {levels})")
        for width in (self.model_channels * m for m in self.channel_mult):
            if width % 32:
                raise ValueError(f"channel width {width} is not a multiple of 32 (GroupNorm "
                                 "groups)")
            if self.head_channels != -1 and width % self.head_channels:
                raise ValueError(f"channel width {width} is not a multiple of head_channels "
                                 f"{self.head_channels}")

    def has_attention(self, level):
        return self.sample_size // 2**level in self.attention_resolutions


# Copy with dataclasses.replace(PRESETS[name], ...) before changing a field.
PRESETS = {
    # LDM cin256-v2 (the paper's ImageNet model): 400,920,579 parameters, ~200 GFLOP per 64x64
    # latent.
    "ldm4-in1k": UNetConfig(3, 3, 192, (1, 2, 3, 5), 2, (32, 16, 8), 64, 512, head_channels=-1),
    # LDM text2img256 (32-wide heads, 640-d context): 403,623,939 parameters.
    "ldm4-text": UNetConfig(3, 3, 192, (1, 2, 3, 5), 2, (32, 16, 8), 64, 640, head_channels=32),
    # ldm4-in1k's layout (levels, blocks, attention, one head) at 32 channels and a 64-d context:
    # the full-scale commands end to end in minutes (experiments/rehearse.py --narrow).
    "ldm4-narrow": UNetConfig(3, 3, 32, (1, 2, 3, 5), 2, (32, 16, 8), 64, 64, head_channels=-1),
    # Tests: 16x16 input, attention at 8x8 and in the middle (~1.0M params).
    "tiny": UNetConfig(3, 3, 32, (1, 2), 1, (8,), 16, 32, head_channels=-1),
    # CPU demo on 8x8 one-channel pixels (sklearn digits): 1.0M params, ~40 MFLOP per image.
    "digits": UNetConfig(1, 1, 32, (1, 2), 1, (4,), 8, 64, head_channels=-1),
    # 32x32 one-channel Fashion-MNIST (pixels, padded; or replace in_channels for latents):
    # 2.6M params, 1.07 GFLOP per image forward: sized so sweep.py's 17 models fit one GPU.
    "fmnist": UNetConfig(1, 1, 32, (1, 2, 2), 2, (16, 8), 32, 128, head_channels=-1),
}


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of timesteps t [B] (int or float) -> [B, dim], laid out [cos | sin] as
    LDM (diffusers: flip_sin_to_cos=True, freq_shift=0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def zero_module(module):
    # LDM zero-initialises the last conv of every residual branch and the output conv.
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def group_norm(channels, eps=1e-5):
    return nn.GroupNorm(32, channels, eps=eps)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, + time embedding, GroupNorm -> SiLU -> dropout -> conv, + skip."""

    def __init__(self, channels, emb_channels, out_channels, dropout):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(group_norm(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3,
                                                              padding=1)))
        self.skip_connection = (nn.Identity() if channels == out_channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x, emb):  # x [B, C, H, W], emb [B, E]
        h = self.in_layers(x)  # [B, C_out, H, W]
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Attention(nn.Module):
    """Multi-head attention of x [B, N, dim] to context [B, L, context_dim] (self-attn: context =
    x)."""

    def __init__(self, dim, context_dim, heads, head_dim):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_k = nn.Linear(context_dim, heads * head_dim, bias=False)
        self.to_v = nn.Linear(context_dim, heads * head_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * head_dim, dim))  # LDM's name: to_out.0

    def forward(self, x, context):
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (rearrange(u, "b n (h d) -> b h n d", h=self.heads) for u in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(d)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        # The Identity holds LDM's dropout slot (p = 0), keeping LDM's key names net.0 / net.2.
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim))

    def forward(self, x):
        return self.net(x)


class TransformerBlock(nn.Module):
    """LDM's BasicTransformerBlock: pre-LayerNorm self-attn, cross-attn, GEGLU feed-forward."""

    def __init__(self, dim, heads, head_dim, context_dim):
        super().__init__()
        self.attn1 = Attention(dim, dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, context_dim, heads, head_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):  # x [B, N, dim], context [B, L, context_dim]
        h = self.norm1(x)
        x = x + self.attn1(h, h)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm -> 1x1 conv -> transformer blocks over the H*W tokens -> 1x1 conv, + residual."""

    def __init__(self, channels, heads, head_dim, depth, context_dim):
        super().__init__()
        inner = heads * head_dim
        self.norm = group_norm(channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(inner, heads, head_dim, context_dim) for _ in range(depth)])
        self.proj_out = zero_module(nn.Conv2d(inner, channels, 1))

    def forward(self, x, context):
        h = rearrange(self.proj_in(self.norm(x)), "b c h w -> b (h w) c")  # H*W tokens
        for block in self.transformer_blocks:
            h = block(h, context)
        h = rearrange(h, "b (h w) c -> b c h w", h=x.shape[2])
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):  # [B, C, H, W] -> [B, C, H/2, W/2]
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):  # [B, C, H, W] -> [B, C, 2H, 2W]
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def run_block(block, x, emb, context):
    """One U-Net block (a ModuleList): res-blocks see the time embedding, transformers the
    context."""
    for layer in block:
        if isinstance(layer, ResBlock):
            x = layer(x, emb)
        elif isinstance(layer, SpatialTransformer):
            x = layer(x, context)
        else:
            x = layer(x)
    return x


class UNet(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = self.config = config
        emb_ch = 4 * c.model_channels

        def transformer(width):
            heads = 1 if c.head_channels == -1 else width // c.head_channels
            return SpatialTransformer(width, heads, width // heads, c.transformer_depth,
                                      c.context_dim)

        self.time_embed = nn.Sequential(nn.Linear(c.model_channels, emb_ch), nn.SiLU(),
                                        nn.Linear(emb_ch, emb_ch))

        # Encoder: conv_in; per level num_res_blocks x (ResBlock [+ transformer]), then Downsample
        # (not after the last level). Every block's output is kept for a skip connection.
        ch = c.model_channels
        self.input_blocks = nn.ModuleList([nn.ModuleList([nn.Conv2d(c.in_channels, ch, 3,
                                                                    padding=1)])])
        skip_channels = [ch]
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers = [ResBlock(ch, emb_ch, mult * c.model_channels, c.dropout)]
                ch = mult * c.model_channels
                if c.has_attention(level):
                    layers.append(transformer(ch))
                self.input_blocks.append(nn.ModuleList(layers))
                skip_channels.append(ch)
            if level < len(c.channel_mult) - 1:
                self.input_blocks.append(nn.ModuleList([Downsample(ch)]))
                skip_channels.append(ch)

        self.middle_block = nn.ModuleList([ResBlock(ch, emb_ch, ch, c.dropout), transformer(ch),
                                           ResBlock(ch, emb_ch, ch, c.dropout)])

        # Decoder: per level num_res_blocks + 1 x (ResBlock on [h, skip] [+ transformer]), then
        # Upsample (not after the first level).
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_ch, mult * c.model_channels,
                                   c.dropout)]
                ch = mult * c.model_channels
                if c.has_attention(level):
                    layers.append(transformer(ch))
                if level > 0 and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(nn.ModuleList(layers))

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(),
                                 zero_module(nn.Conv2d(ch, c.out_channels, 3, padding=1)))

    def forward(self, x, t, context):
        """x [B, C, H, W], t [B] (int64 or float), context [B, L, context_dim] -> eps [B, C, H,
        W]."""
        c = self.config
        factor = 2 ** (len(c.channel_mult) - 1)
        if x.ndim != 4 or x.shape[1] != c.in_channels or x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"x must be [B, {c.in_channels}, H, W] with H, W multiples of "
                             f"{factor}; got {tuple(x.shape)}")
        if context.ndim != 3 or context.shape[-1] != c.context_dim:
            raise ValueError(f"context must be [B, L, {c.context_dim}]; got {tuple(context.shape)}")
        emb = self.time_embed(timestep_embedding(t, c.model_channels))  # [B, 4 * model_channels]
        h, skips = x, []
        for block in self.input_blocks:
            h = run_block(block, h, emb, context)
            skips.append(h)
        h = run_block(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = run_block(block, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
