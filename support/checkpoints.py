"""Any checkpoint or released model as a Denoiser (cep.py): what train.py (--resume, --init),
sample.py and export.py read.

A train.py checkpoint (a file or a run directory; its EMA or raw weights, falling back to the
previous checkpoint kept beside it when the newest is cut short), a released pipeline directory
or LDM's cin256-v2 model.ckpt (released.py). Tensors and plain data only, unless unsafe_pickle
(a Lightning model.ckpt): nothing in a file runs on load.
"""
import dataclasses
import os

import torch

import cep
import unet
from support import released, system, weights


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


def build_denoiser(config):
    """cep.Denoiser of a run config (train.py's, or a released model's as released.py reads it):
    the class table or the text encoder, and the U-Net at the data's channels and size."""
    ucfg = unet_config(config)
    if config["text"]:
        embedder = cep.TextEmbedder(config["text_encoder"], ucfg.context_dim,
                                    config.get("text_length", 77),
                                    config.get("freeze_text_encoder", False),
                                    config.get("tokenizer"), config.get("attention_mask", True))
    else:
        embedder = cep.ClassEmbedder(config["num_classes"], ucfg.context_dim)
    return cep.Denoiser(embedder, unet.UNet(ucfg))


def load(path, which="ema", device="cpu", text_encoder=None, unsafe_pickle=False):
    """(Denoiser, run config, step) of a train.py checkpoint (a file or a run directory; its
    `which` weights: ema or model), or of a released model (released.py: a pipeline directory or
    LDM's cin256-v2 model.ckpt; step 0, the
    run config holds its stored scheduler config). Tensors and plain data only, unless
    unsafe_pickle (a Lightning model.ckpt): nothing in the file runs on load."""
    if os.path.isdir(path) and released.is_pipeline(path):
        return (*from_state(*released.pipeline(path), path, device), 0)
    path = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    if not os.path.exists(path) and not os.path.exists(system.previous_checkpoint(path)):
        # (between a save's two renames only ckpt.prev.pt is there: readable_checkpoint reads it)
        raise FileNotFoundError(f"no checkpoint at {path}: train one with train.py, or give "
                                f"{released.CHECKPOINT_HINT}")
    ckpt = readable_checkpoint(path, unsafe_pickle)
    if "config" not in ckpt:  # not a run of train.py
        return (*from_state(*released.ldm_checkpoint(ckpt, path), path, device), 0)
    if "text" not in ckpt["config"]:
        what = "an autoencoder (vae.py)" if "kind" in ckpt["config"] else "another kind of model"
        raise ValueError(f"{path} holds {what}, not a diffusion model: give a train.py run or "
                         f"{released.CHECKPOINT_HINT}")
    config = dict(ckpt["config"])
    if config["text"]:
        config["text_encoder"] = text_encoder or config["text_encoder"]
        if not os.path.isdir(config["text_encoder"]):
            raise FileNotFoundError("the text encoder this model was trained with is not at "
                                    f"{config['text_encoder']}: pass --text-encoder DIR (the same "
                                    "model)")
    return (*from_state(config, ckpt[which], None, path, device, which), ckpt["step"])


def readable_checkpoint(path, unsafe_pickle=False):
    """The newest readable checkpoint: `path`, else (with a message) the previous one train.py
    keeps beside it (ckpt.prev.pt) when `path` is missing, cut short or damaged."""
    candidates = [path] + ([system.previous_checkpoint(path)] if path.endswith(".pt") else [])
    problems = []
    for candidate in candidates:
        if not os.path.exists(candidate):
            problems.append(f"{candidate} is missing")
            continue
        try:
            ckpt = weights.torch_load(candidate, unsafe_pickle)
        except Exception as e:  # truncated or foreign file: torch raises several kinds
            first_line = (str(e).splitlines() or [""])[0]  # torch's own messages run long
            problems.append(f"{candidate} cannot be read ({type(e).__name__}: {first_line})")
            continue
        if candidate != path:
            print(f"{problems[0]}; using the previous checkpoint {candidate}")
        return ckpt
    raise ValueError("no readable checkpoint: " + "; ".join(problems))


def from_state(config, state, scheduler, path, device, which="ema"):
    """(Denoiser, run config) holding `state`; non-finite weights are refused."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}: the {which} weights are not finite ({bad[0]}, ...): the run "
                         f"diverged before this checkpoint; nothing to sample")
    if scheduler is not None:
        config["scheduler"] = scheduler
    model = build_denoiser(config)
    if config["text"] and config.get("released"):  # BERT was read from the release's bert/
        state = {**model.embedder.state_dict(prefix="embedder."), **state}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # torch lists every mismatch on lines of their own
        mismatch = next((line.strip() for line in str(e).splitlines()[1:]), str(e))
        raise ValueError(f"{path}: its {which} weights do not fit the model its config "
                         f"describes ({mismatch}): the file is damaged or was edited") from None
    return model.to(device).eval(), config
