"""A train.py run in the released layout (released.py), so that diffusers users and the authors'
scripts can sample a model trained here; sample.py --ckpt reads it back.

    python -m support.export runs/demo runs/demo-pipeline

unet/ (UNet2DConditionModel), class_embedder/ (the authors' fork's ClassEmbedder) or bert/ +
tokenizer/, vqvae/ (vae/ for a KL autoencoder; none for pixel models), scheduler/ (LDM's
schedule as trained_betas, linspace spacing: the paper's DPM-Solver protocol), model_index.json.
"""
import argparse
import os
import shutil

import safetensors.torch
import torch

import diffusion
from support import checkpoints, system, weights

DIFFUSERS_VERSION = "0.27.0"  # the authors' fork


def save_component(folder, config, state):
    """A diffusers model folder: config.json and diffusion_pytorch_model.safetensors."""
    os.makedirs(folder, exist_ok=True)
    system.write_json(os.path.join(folder, "config.json"),
                      {**config, "_diffusers_version": DIFFUSERS_VERSION})
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    system.write_atomic(path, lambda tmp: safetensors.torch.save_file(tensors, tmp))


def export_autoencoder(autoencoder, folder, scaling_factor):
    """Our Autoencoder as a diffusers VQModel / AutoencoderKL folder (the inverse of
    weights.load_diffusers_weights: attention 1x1 convs become diffusers' Linear layers)."""
    c = autoencoder.config
    levels = len(c.ch_mult)
    config = {"_class_name": "VQModel" if c.kind == "vq" else "AutoencoderKL",
              "in_channels": c.in_channels, "out_channels": c.in_channels,
              "down_block_types": ["DownEncoderBlock2D"] * levels,
              "up_block_types": ["UpDecoderBlock2D"] * levels,
              "block_out_channels": [c.ch * m for m in c.ch_mult],
              "layers_per_block": c.num_res_blocks, "act_fn": "silu",
              "latent_channels": c.z_channels, "norm_num_groups": 32,
              "scaling_factor": scaling_factor}
    if c.kind == "vq":
        config.update(num_vq_embeddings=c.n_embed, vq_embed_dim=c.embed_dim)
    key_map = weights.autoencoder_key_map(c)
    state = {}
    for ours, v in autoencoder.state_dict().items():
        attention = ".attentions." in key_map[ours] and v.dim() == 4
        state[key_map[ours]] = v[:, :, 0, 0] if attention else v
    save_component(folder, config, state)


def export_text_encoder(model, out):
    """bert/ and tokenizer/, as the CC3M releases: BERT's width is the U-Net's context, called
    with the token ids only, 77 tokens (LDMTextToImagePipeline's way); anything else would
    sample differently there, so it is refused."""
    embedder = model.embedder
    why = [reason for reason, bad in [
        ("a projection from BERT's width to the context width", not isinstance(
            embedder.proj, torch.nn.Identity)),
        ("BERT called with an attention mask (train with --no-attention-mask)",
         embedder.attention_mask),
        (f"{embedder.max_length} tokens, not 77", embedder.max_length != 77)] if bad]
    if why:
        raise ValueError("this text model cannot be written in the released layout: "
                         + "; ".join(why))
    embedder.encoder.save_pretrained(os.path.join(out, "bert"))
    embedder.tokenizer.save_pretrained(os.path.join(out, "tokenizer"))


def export(run, out, which="ema"):
    """Write the train.py run `run` (its EMA weights) as a pipeline directory `out`: unet/,
    class_embedder/ or bert/ + tokenizer/, vqvae/ (vae/ for a KL autoencoder; none for pixel
    models), scheduler/ (LDM's schedule, stored as trained_betas; timestep_spacing linspace, the
    paper's DPM-Solver protocol) and model_index.json."""
    model, config, _ = checkpoints.load(run, which)
    if os.path.exists(out):
        raise FileExistsError(f"{out} exists: choose a new directory")
    if config["text"] and config["space"] != "latent":
        raise ValueError("a pixel-space text model has no released layout (the text pipeline "
                         "decodes latents): sample it from its run directory")
    partial = f"{os.path.normpath(out)}{system.TEMPORARY}{os.getpid()}"  # renamed when whole
    shutil.rmtree(partial, ignore_errors=True)
    try:
        write_pipeline(model, config, partial)
        os.rename(partial, out)
    except BaseException:  # a full disk, a missing autoencoder, Ctrl-C: no half pipeline left
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def write_pipeline(model, config, out):
    """The pipeline directory's components and model_index.json, written into `out`."""
    ucfg = model.unet.config
    theirs = weights.unet_key_map(ucfg)
    save_component(os.path.join(out, "unet"),
                   {"_class_name": "UNet2DConditionModel", **weights.unet_diffusers_config(ucfg)},
                   {theirs[k]: v for k, v in model.unet.state_dict().items()})
    components = {"unet": ["diffusers", "UNet2DConditionModel"],
                  "scheduler": ["diffusers", "DDIMScheduler"]}
    if config["text"]:
        export_text_encoder(model, out)
        components.update(bert=["transformers", "BertModel"],
                          tokenizer=["transformers", "BertTokenizer"])
    else:
        table = model.embedder.embedding.weight
        save_component(os.path.join(out, "class_embedder"),
                       {"_class_name": "ClassEmbedder", "n_classes": len(table),
                        "embed_dim": table.shape[1]}, {"embedding.weight": table})
        components["class_embedder"] = ["diffusers", "ClassEmbedder"]  # the authors' fork
    if config["space"] == "latent":
        autoencoder = weights.load_autoencoder(config["vae"], config.get("vae_preset"),
                                           config.get("latent_scale"))
        kind = "vqvae" if autoencoder.config.kind == "vq" else "vae"
        # the text pipeline divides by scaling_factor, the class pipeline does not: a VQ run of
        # ours (scale 1) stores 1.0; a KL run its measured scale (read back by weights.py)
        export_autoencoder(autoencoder, os.path.join(out, kind), autoencoder.scale)
        components[kind] = ["diffusers", "VQModel" if kind == "vqvae" else "AutoencoderKL"]
    betas = diffusion.ldm_linear_betas().tolist()
    os.makedirs(os.path.join(out, "scheduler"))
    system.write_json(os.path.join(out, "scheduler", "scheduler_config.json"), {
        "_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": len(betas), "beta_start": 0.0015, "beta_end": 0.0195,
        "beta_schedule": "scaled_linear", "trained_betas": betas, "clip_sample": False,
        "set_alpha_to_one": False, "steps_offset": 0, "timestep_spacing": "linspace",
        "prediction_type": "epsilon"})
    pipeline_class = "LDMTextToImagePipeline" if config["text"] else "LDMClassToImagePipeline"
    system.write_json(os.path.join(out, "model_index.json"),
                      {"_class_name": pipeline_class, "_diffusers_version": DIFFUSERS_VERSION,
                       **components})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=system.HelpFormatter)
    p.add_argument("run", help="train.py run directory (or its ckpt.pt)")
    p.add_argument("out", help="pipeline directory to create")
    p.add_argument("--weights", default="ema", choices=["ema", "model"],
                   help="EMA weights (what sample.py uses) or the raw weights")
    args = p.parse_args(argv)
    try:
        print(f"wrote {export(args.run, args.out, args.weights)}")
    except (OSError, ValueError) as e:  # missing or existing paths, a full disk, a foreign file
        raise SystemExit(f"export.py: {e}") from None


if __name__ == "__main__":
    main()
