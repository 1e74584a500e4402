"""Weights in other formats: diffusers' and CompVis' names for the U-Net (unet.py) and the
autoencoders (vae.py), and the loaders that read them. The released pipelines themselves are read
and written by released.py.

The U-Net's names are LDM's own, so LDM checkpoints load as they are; diffusers'
UNet2DConditionModel names map key for key (as diffusers' LDM conversion script names them). The
autoencoder's names are LDM's too; diffusers' VQModel / AutoencoderKL map by a few rules.
"""
import hashlib
import json
import os
import pickle
import re
import zipfile

import torch

import unet
import vae
from support import system

# ============================================================================= the U-Net

# diffusers ResnetBlock2D names -> LDM ResBlock names; transformer names are the same in both.
_RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3",
                 "conv_shortcut": "skip_connection"}


def unet_diffusers_config(c):
    """The UNet2DConditionModel config equivalent to UNetConfig c (as diffusers' LDM conversion)."""
    levels = range(len(c.channel_mult))
    widths = [c.model_channels * m for m in c.channel_mult]
    return dict(
        sample_size=c.sample_size, in_channels=c.in_channels, out_channels=c.out_channels,
        flip_sin_to_cos=True, freq_shift=0,
        down_block_types=["CrossAttnDownBlock2D" if c.has_attention(l) else "DownBlock2D"
                          for l in levels],
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=["CrossAttnUpBlock2D" if c.has_attention(l) else "UpBlock2D"
                        for l in reversed(levels)],
        block_out_channels=widths, layers_per_block=c.num_res_blocks, downsample_padding=1,
        act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=c.context_dim,
        transformer_layers_per_block=c.transformer_depth, use_linear_projection=False,
        # diffusers reads attention_head_dim as the NUMBER of heads (its LDM conversions do too)
        attention_head_dim=[1 if c.head_channels == -1 else w // c.head_channels for w in widths],
    )


def unet_key_map(config):
    """{our key: diffusers UNet2DConditionModel key} for every tensor of UNet(config), as diffusers'
    LDM conversion names them (scripts/convert_ldm_original_checkpoint_to_diffusers.py)."""
    n, levels = config.num_res_blocks, len(config.channel_mult)
    blocks = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
              "time_embed.2": "time_embedding.linear_2", "middle_block.0": "mid_block.resnets.0",
              "middle_block.1": "mid_block.attentions.0", "middle_block.2": "mid_block.resnets.1",
              "out.0": "conv_norm_out", "out.2": "conv_out"}  # our block -> diffusers block
    for level in range(levels):
        up = levels - 1 - level  # diffusers numbers up-blocks from the lowest resolution
        for j in range(n):
            k = 1 + level * (n + 1) + j
            blocks[f"input_blocks.{k}.0"] = f"down_blocks.{level}.resnets.{j}"
            blocks[f"input_blocks.{k}.1"] = f"down_blocks.{level}.attentions.{j}"
        if level < levels - 1:
            down = f"input_blocks.{(level + 1) * (n + 1)}.0.op"
            blocks[down] = f"down_blocks.{level}.downsamplers.0.conv"
        for j in range(n + 1):
            k = up * (n + 1) + j
            blocks[f"output_blocks.{k}.0"] = f"up_blocks.{up}.resnets.{j}"
            blocks[f"output_blocks.{k}.1"] = f"up_blocks.{up}.attentions.{j}"
        if level > 0:
            slot = 2 if config.has_attention(level) else 1
            upsample = f"output_blocks.{up * (n + 1) + n}.{slot}.conv"
            blocks[upsample] = f"up_blocks.{up}.upsamplers.0.conv"

    with torch.device("meta"):
        ours = unet.UNet(config).state_dict().keys()
    key_map = {}
    for key in ours:
        parts = key.split(".")
        i = max(i for i in range(1, len(parts)) if ".".join(parts[:i]) in blocks)  # longest match
        block, rest = ".".join(parts[:i]), ".".join(parts[i:])
        if ".resnets." in blocks[block]:
            for theirs, mine in _RESNET_NAMES.items():
                if rest.startswith(mine + "."):
                    rest = theirs + rest[len(mine):]
        key_map[key] = f"{blocks[block]}.{rest}"
    return key_map


def load_unet_diffusers(model, state_dict):
    """Load a diffusers UNet2DConditionModel state dict into our UNet."""
    model.load_state_dict(unet_from_diffusers(model.config, state_dict))


def unet_from_diffusers(config, state_dict):
    """Our state dict for UNet(config) from a diffusers UNet2DConditionModel one (e.g. a released
    pipeline's unet/diffusion_pytorch_model.safetensors); raises with the missing / unexpected
    keys on mismatch."""
    key_map = unet_key_map(config)
    missing = sorted(set(key_map.values()) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(key_map.values()))
    if missing or unexpected:
        raise ValueError(f"diffusers U-Net weights do not fit {config}:\n"
                         f"missing ({len(missing)}): {missing}\n"
                         f"unexpected ({len(unexpected)}): {unexpected}")
    return {ours: state_dict[theirs] for ours, theirs in key_map.items()}


# ============================================================================= the autoencoders

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
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive (since PyTorch 1.6)
        raise ValueError(f"{path} is not a PyTorch checkpoint (cut short, or another kind of "
                         "file)")
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


def autoencoder_key_map(config):
    """{our key: diffusers VQModel / AutoencoderKL key} for every tensor of the autoencoder."""
    levels = len(config.ch_mult)
    def up(m):
        kind = "resnets" if m[2] == "block" else "upsamplers.0"
        return f"decoder.up_blocks.{levels - 1 - int(m[1])}.{kind}."
    mapping = {}
    for key in vae.Autoencoder(config).to("meta").state_dict():
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
    for ours, name in autoencoder_key_map(model.config).items():
        if name in theirs:  # attention: diffusers' Linear [C,C] is LDM's 1x1 conv [C,C,1,1]
            v = theirs.pop(name)
            sd[ours] = v[:, :, None, None] if v.dim() == 2 and len(shapes[ours]) == 4 else v
    # left-overs are reported as unexpected
    sd.update({f"(diffusers) {k}": v for k, v in theirs.items()})
    load_exact(model, sd, f)


def autoencoder_diffusers_config(path):
    """The AutoencoderConfig of a diffusers VQModel / AutoencoderKL folder (its config.json), and
    the KL scaling_factor (VQ latents are not scaled: LDM's VQ models decode them as they are)."""
    folder = os.path.dirname(diffusers_weights_file(path))
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder} has no config.json: name the architecture with a "
                                f"preset (one of {sorted(vae.PRESETS)})")
    with open(os.path.join(folder, "config.json")) as f:
        c = json.load(f)
    widths = c["block_out_channels"]
    kind = "vq" if "num_vq_embeddings" in c else "kl"
    config = vae.AutoencoderConfig(kind, in_channels=c["in_channels"], ch=widths[0],
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
            model = vae.Autoencoder(preset_config(preset, weights))
        else:
            model = vae.Autoencoder(*autoencoder_diffusers_config(weights))
        load_diffusers_weights(model, weights)
    else:
        ckpt = torch_load(weights, unsafe_pickle)
        if is_our_checkpoint(ckpt):
            model = vae.from_our_checkpoint(ckpt)
        else:
            model = vae.Autoencoder(preset_config(preset, weights))
            load_exact(model, compvis_state_dict(ckpt), weights)
    if scale is not None:
        model.scale = scale
    return model


def preset_config(preset, weights):
    if preset not in vae.PRESETS:
        raise ValueError(f"{weights} is CompVis or diffusers weights: name the architecture with a "
                         f"preset (one of {sorted(vae.PRESETS)}), got {preset!r}")
    return vae.PRESETS[preset]
