"""The denoiser eps_theta(x_t, t, c_theta(y) + delta): condition embedder, CEP, U-Net.

One model for training (train.py) and sampling (sample.py). Eq. 8 of the paper is `forward`:
the condition y is embedded (cep.py), the CEP perturbation delta is added during training only
(Sec. 5.1), and the U-Net (unet.py) predicts the noise. The null condition (the extra class
row, or the empty caption) is what condition dropout puts in during training and what
classifier-free guidance (Eq. 2) contrasts with at sampling.
"""
import dataclasses
import os

import torch

import cep
import released
import unet
import vae


def choose_preset(name, size):
    """The --preset, checked against the input size; by default the preset made for that size."""
    made_for = [k for k, c in unet.PRESETS.items() if c.sample_size == size]
    listing = ", ".join(f"{k} ({c.sample_size})" for k, c in unet.PRESETS.items())
    if name is None:
        if not made_for:
            raise ValueError(f"no U-Net preset is made for {size}x{size} inputs (presets: "
                             f"{listing}); choose --image-size, or train on latents")
        return made_for[0]
    if name not in unet.PRESETS:
        raise ValueError(f"unknown --preset {name!r}; presets: {listing}")
    try:
        dataclasses.replace(unet.PRESETS[name], sample_size=size)
    except ValueError as e:
        raise ValueError(f"--preset {name} does not fit {size}x{size} inputs ({e}); presets made "
                         f"for this size: {', '.join(made_for) or 'none'}") from None
    return name


def unet_config(config):
    """The U-Net of a run config: a released model's own (config["unet"]), or the preset at the
    data's channels and size."""
    if config.get("unet"):
        return unet.UNetConfig(**config["unet"])
    ucfg = dataclasses.replace(unet.PRESETS[config["preset"]], in_channels=config["channels"],
                               out_channels=config["channels"], sample_size=config["size"])
    if config["head_channels"] is not None:
        ucfg = dataclasses.replace(ucfg, head_channels=config["head_channels"])
    if config.get("context_dim") is not None:  # runs before this flag have none
        ucfg = dataclasses.replace(ucfg, context_dim=config["context_dim"])
    return ucfg


class Denoiser(torch.nn.Module):
    """eps_theta(x_t, t, c_theta(y) + delta) for class labels or captions (a run config)."""

    def __init__(self, config):
        super().__init__()
        ucfg = unet_config(config)
        if config["text"]:
            self.embedder = cep.TextEmbedder(config["text_encoder"], ucfg.context_dim,
                                             config.get("text_length", 77),
                                             config.get("freeze_text_encoder", False),
                                             config.get("tokenizer"),
                                             config.get("attention_mask", True))
            # [L, D] per condition
            self.context_shape = (self.embedder.max_length, ucfg.context_dim)
        else:
            self.embedder = cep.ClassEmbedder(config["num_classes"], ucfg.context_dim)
            self.context_shape = (1, ucfg.context_dim)
        self.unet = unet.UNet(ucfg)

    def forward(self, x_t, t, conditions, delta=None):
        """Eq. 8. delta [B, *context_shape] is CEP's perturbation (cep.cep_delta), given during
        training only; None at sampling and without CEP."""
        context = self.embedder(conditions)  # c_theta(y): [B, L, D]
        if delta is not None:
            context = context + delta
        return self.unet(x_t, t, context)

    def null_conditions(self, batch):
        """`batch` null conditions: the null class (labels) or the empty caption (text)."""
        return self.embedder.null_condition(batch)

    def drop_conditions(self, conditions, drop):
        """Condition dropout for classifier-free guidance: the null condition where drop (bool
        [B]) is set. Labels are int64 [B]; captions a list of B strings."""
        if isinstance(conditions, list):
            return [self.embedder.null_condition(1)[0] if d else c
                    for d, c in zip(drop.tolist(), conditions)]
        return torch.where(drop, self.embedder.null_label, conditions)


def load(path, weights="ema", device="cpu", text_encoder=None, unsafe_pickle=False):
    """(Denoiser, run config, step) of a train.py checkpoint (a file or a run directory), or of a
    released model (released.py: a pipeline directory or LDM's cin256-v2 model.ckpt; step 0, the
    run config holds its stored scheduler config). Tensors and plain data only, unless
    unsafe_pickle (a Lightning model.ckpt): nothing in the file runs on load."""
    if os.path.isdir(path) and released.is_pipeline(path):
        return (*from_state(*released.pipeline(path), path, device), 0)
    path = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}: train one with train.py, or give "
                                f"{released.CHECKPOINT_HINT}")
    ckpt = vae.torch_load(path, unsafe_pickle)
    if "config" not in ckpt:  # not a run of train.py
        return (*from_state(*released.ldm_checkpoint(ckpt, path), path, device), 0)
    config = dict(ckpt["config"])
    if config["text"]:
        config["text_encoder"] = text_encoder or config["text_encoder"]
        if not os.path.isdir(config["text_encoder"]):
            raise FileNotFoundError("the text encoder this model was trained with is not at "
                                    f"{config['text_encoder']}: pass --text-encoder DIR (the same "
                                    "model)")
    return (*from_state(config, ckpt[weights], None, path, device, weights), ckpt["step"])


def from_state(config, state, scheduler, path, device, weights="ema"):
    """(Denoiser, run config) holding `state`; non-finite weights are refused."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}: the {weights} weights are not finite ({bad[0]}, ...): the run "
                         f"diverged before this checkpoint; nothing to sample")
    if scheduler is not None:
        config["scheduler"] = scheduler
    model = Denoiser(config)
    if config["text"] and config.get("released"):  # BERT was read from the release's bert/
        state = {**model.embedder.state_dict(prefix="embedder."), **state}
    model.load_state_dict(state)
    return model.to(device).eval(), config
