"""Released models as this repository's Denoiser: the authors' pipelines and LDM's cin256-v2.

The paper's models are released as diffusers pipeline directories (the DiffusionNoise
organisation on the Hugging Face hub; the authors' scripts need their fork of diffusers 0.27,
LDMClassToImagePipeline). A class model's directory holds
    unet/             UNet2DConditionModel: config.json + diffusion_pytorch_model.safetensors
    vqvae/            VQModel (LDM's VQ-f4; decoded with quantisation; the class pipeline
                      decodes the latents as they are, the text pipeline divides them by the
                      config's scaling_factor first: text_latent_scale)
    class_embedder/   config.json {"n_classes": 1001, "embed_dim": 512} and embedding.weight
                      [1001, 512]: one 512-d context token per label, the last row the null class
    scheduler/        scheduler_config.json: the 1,000 training betas (trained_betas) and the
                      timestep spacing
Their sampling rebuilds the scheduler with DPMSolverMultistepScheduler.from_config (or DDIM's)
from the stored config: the stored `timestep_spacing` and `steps_offset` decide the timesteps
(with "leading" spacing, 50 DPM steps are 951, 932, ..., 20, not 999, 979, ..., 20). `timesteps`
reproduces what from_config gives, and refuses options our sampler (diffusion.py) does not have.

LDM's own class model (cin256-v2, model.ckpt) holds model.diffusion_model.* in our U-Net's
names (unet.py), cond_stage_model.embedding.weight [1001, 512] and the VQ-f4 autoencoder.

    python sample.py --ckpt DiffusionNoise-LDM-IN1K-eta2.5 --per-class 50 --guidance 2
    python train.py --init DiffusionNoise-LDM-IN1K-clean --latents cache/mydata --eta 0.05

The other direction, a train.py run written in this layout, is export.py.
"""
import dataclasses
import json
import math
import os

import torch

import diffusion
import unet
from support import system, weights

CHECKPOINT_HINT = ("a released pipeline directory (unet/, vqvae/, class_embedder/, scheduler/: "
                   "e.g. a DiffusionNoise LDM model from the Hugging Face hub, downloaded with "
                   "`huggingface-cli download REPO --local-dir DIR`) or LDM's cin256-v2 model.ckpt "
                   "(https://ommer-lab.com/files/latent-diffusion/cin.zip)")


def is_pipeline(path):
    """A released pipeline directory (not a run directory of train.py); a DiT pipeline is
    refused: a transformer on latent patches, not the LDM U-Net of unet.py."""
    if os.path.isfile(os.path.join(path, "transformer", "config.json")):
        raise ValueError(f"{path} is a DiT pipeline (transformer/): a different architecture "
                         "from the paper's LDM-4 U-Net, not supported here")
    return os.path.isfile(os.path.join(path, "unet", "config.json"))


def is_pixel_export(path):
    """A pixel-space model written by `export`: its model_index.json names no autoencoder."""
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        return False
    return not {"vqvae", "vae"} & set(read_json(index))


def read_json(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: expected {CHECKPOINT_HINT}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # cut short or not JSON
        raise ValueError(f"{path} is not a readable JSON file ({e}): download it again") from None


def read_weights(folder):
    """The state dict of a diffusers model folder (.safetensors preferred, .bin accepted)."""
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors",
                 "diffusion_pytorch_model.bin", "pytorch_model.bin"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            try:
                return system.read_weights(path)
            except Exception as e:  # safetensors and torch raise several kinds for a cut file
                first_line = (str(e).splitlines() or [""])[0]
                raise ValueError(f"{path} cannot be read ({type(e).__name__}: {first_line}): "
                                 "cut short or not a weights file; download it again") from None
    raise FileNotFoundError(f"no weights (diffusion_pytorch_model.safetensors) in {folder}: "
                            f"expected {CHECKPOINT_HINT}")


# ----------------------------------------------------------------------------- the U-Net

def unet_config(c, source="the U-Net config"):
    """Our UNetConfig for a diffusers UNet2DConditionModel config, checked by mapping it back
    (weights.unet_diffusers_config) and comparing every key: a model of another kind is refused."""
    missing = [k for k in ("block_out_channels", "attention_head_dim", "down_block_types",
                           "in_channels", "out_channels", "layers_per_block", "sample_size",
                           "cross_attention_dim") if k not in c]
    if missing:
        raise ValueError(f"{source} lacks {', '.join(missing)}: not a "
                         "UNet2DConditionModel config of a released model")
    widths = list(c["block_out_channels"])
    heads = c["attention_head_dim"]  # diffusers reads it as the number of heads
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(widths)
    attention = [i for i, b in enumerate(c["down_block_types"]) if b.startswith("CrossAttn")]
    head_widths = {widths[i] // heads[i] for i in attention}
    ours = unet.UNetConfig(
        in_channels=c["in_channels"], out_channels=c["out_channels"], model_channels=widths[0],
        channel_mult=tuple(w // widths[0] for w in widths), num_res_blocks=c["layers_per_block"],
        attention_resolutions=tuple(c["sample_size"] // 2**i for i in attention),
        sample_size=c["sample_size"], context_dim=c["cross_attention_dim"],
        head_channels=-1 if all(heads[i] == 1 for i in attention) else min(head_widths),
        transformer_depth=c.get("transformer_layers_per_block", 1))

    def same(a, b):
        return list(a) == list(b) if isinstance(a, (list, tuple)) else a == b
    expected = weights.unet_diffusers_config(ours)
    expected["attention_head_dim"] = [expected["attention_head_dim"][i] for i in attention]
    stored = {**c, "attention_head_dim": [heads[i] for i in attention]}
    unexpected = {"class_embed_type": None, "num_class_embeds": None, "addition_embed_type": None,
                  "encoder_hid_dim": None, "time_embedding_type": "positional",
                  "resnet_time_scale_shift": "default", "only_cross_attention": False,
                  "upcast_attention": False}
    bad = [k for k, v in expected.items() if k in stored and not same(stored[k], v)]
    bad += [k for k, v in unexpected.items() if stored.get(k, v) != v]
    one_head = ours.head_channels == -1  # one head per block: the widths are the head widths
    if bad or (len(head_widths) > 1 and not one_head):
        raise ValueError(f"this U-Net is not an LDM U-Net of unet.py: {', '.join(bad) or 'heads'} "
                         f"differ ({ {k: c.get(k) for k in bad} })")
    return ours


# ----------------------------------------------------------------------------- the schedule

# what from_config fills in for keys the stored config lacks (diffusers' defaults)
DEFAULTS = {
    "dpm": {"timestep_spacing": "linspace", "steps_offset": 0, "algorithm_type": "dpmsolver++",
            "solver_order": 2, "solver_type": "midpoint", "lower_order_final": True,
            "euler_at_final": False, "final_sigmas_type": "zero", "use_karras_sigmas": False,
            "use_lu_lambdas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
            "use_flow_sigmas": False, "thresholding": False, "prediction_type": "epsilon",
            "lambda_min_clipped": -math.inf, "variance_type": None},
    "ddim": {"timestep_spacing": "leading", "steps_offset": 0, "clip_sample": True,
             "set_alpha_to_one": True, "thresholding": False, "prediction_type": "epsilon",
             "rescale_betas_zero_snr": False},
}
# options that change what the U-Net's output means or what is done with it: no timesteps make
# our samplers right for them (DPM-Solver reads variance_type only when the variance is learned:
# a DDPMScheduler config's "fixed_small" is ignored, as in diffusers' convert_model_output)
MEANING = {"dpm": {"prediction_type": "epsilon", "thresholding": False},
           "ddim": {"prediction_type": "epsilon", "thresholding": False, "clip_sample": False}}
LEARNED_VARIANCE = ("learned", "learned_range")
# the sampler options diffusion.py's samplers implement (LDM's and the paper's protocol)
SUPPORTED = {
    "dpm": {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint",
            "lower_order_final": True, "euler_at_final": False, "final_sigmas_type": "zero",
            "use_karras_sigmas": False, "use_lu_lambdas": False, "use_exponential_sigmas": False,
            "use_beta_sigmas": False, "use_flow_sigmas": False, "lambda_min_clipped": -math.inf},
    "ddim": {"set_alpha_to_one": False, "rescale_betas_zero_snr": False},
}


def check_model_options(config, sampler):
    """Refuse a stored scheduler config whose options change what the model means (with any
    timesteps, --timesteps paper included)."""
    kind = "dpm" if sampler == "dpm" else "ddim"  # DDPM clips as DDIM does
    c = {**DEFAULTS[kind], **config}
    wrong = {k: c[k] for k, v in MEANING[kind].items() if c[k] != v}
    if sampler == "dpm" and c["variance_type"] in LEARNED_VARIANCE:
        wrong["variance_type"] = c["variance_type"]
    if wrong:
        raise ValueError(f"the stored scheduler config sets {wrong}: the samplers here take an "
                         "epsilon-predicting model, unclipped; this model cannot be sampled here")


def alphas_cumprod(config):
    """abar_t (float64 [T]) of a stored scheduler config: its trained_betas, or its beta
    schedule ("scaled_linear" is LDM's: linspace of sqrt(beta), squared)."""
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
        if len(betas) != config.get("num_train_timesteps", len(betas)):
            raise ValueError(f"the stored scheduler config has {len(betas)} trained_betas for "
                             f"num_train_timesteps {config['num_train_timesteps']}: a damaged "
                             "or foreign schedule")
    else:
        n, lo, hi = config["num_train_timesteps"], config["beta_start"], config["beta_end"]
        if config.get("beta_schedule") == "scaled_linear":
            betas = torch.linspace(lo ** 0.5, hi ** 0.5, n, dtype=torch.float64) ** 2
        elif config.get("beta_schedule") == "linear":
            betas = torch.linspace(lo, hi, n, dtype=torch.float64)
        else:
            raise ValueError(f"unsupported beta_schedule {config.get('beta_schedule')!r}")
    return diffusion.alphas_cumprod(betas)


def timesteps(config, sampler, num_steps):
    """The timesteps diffusers' DPMSolverMultistepScheduler ("dpm") or DDIMScheduler ("ddim")
    .from_config(config).set_timesteps(num_steps) gives, descending (int64 [num_steps])."""
    if sampler not in DEFAULTS:
        raise ValueError(f"released models sample with dpm or ddim, not {sampler!r}")
    check_model_options(config, sampler)
    c = {**DEFAULTS[sampler], **config}
    wrong = {k: c[k] for k, v in SUPPORTED[sampler].items() if c[k] != v}
    if wrong:
        raise ValueError(f"the stored scheduler config sets {wrong}, which this sampler does not "
                         f"implement; pass --timesteps paper for the paper's protocol")
    T, n, spacing = len(alphas_cumprod(config)), num_steps, c["timestep_spacing"]
    if spacing == "linspace":
        t = torch.linspace(0, T - 1, n + 1 if sampler == "dpm" else n, dtype=torch.float64)
        t = t.round().flip(0)[:n] if sampler == "dpm" else t.round().flip(0)
    elif spacing == "leading":
        ratio = T // (n + 1) if sampler == "dpm" else T // n
        t = (torch.arange(n + 1 if sampler == "dpm" else n) * ratio).flip(0)[:n] + c["steps_offset"]
    elif spacing == "trailing":
        t = torch.arange(T, 0, -T / n, dtype=torch.float64).round() - 1
    else:
        raise ValueError(f"unknown timestep_spacing {spacing!r}")
    return t.to(torch.int64)


# ----------------------------------------------------------------------------- loading

def pipeline(path):
    """(run config, state dict of cep.Denoiser, scheduler config) of a released pipeline
    directory: a class model (class_embedder/) or a text model (bert/ and tokenizer/); the run
    config names the autoencoder (vqvae/) the samples decode with."""
    config_path = os.path.join(path, "unet", "config.json")
    ucfg = unet_config(read_json(config_path), config_path)
    theirs = read_weights(os.path.join(path, "unet"))
    state = {f"unet.{k}": v for k, v in weights.unet_from_diffusers(ucfg, theirs).items()}
    autoencoder = next((os.path.join(path, d) for d in ("vqvae", "vae")
                        if os.path.isdir(os.path.join(path, d))), None)
    if autoencoder is None and not is_pixel_export(path):
        raise FileNotFoundError(f"{path} has no vqvae/ (or vae/): expected {CHECKPOINT_HINT}")
    config = {"unet": dataclasses.asdict(ucfg), "channels": ucfg.in_channels,
              "size": ucfg.sample_size, "space": "latent" if autoencoder else "pixel",
              "vae": autoencoder, "released": path}
    if os.path.isdir(os.path.join(path, "bert")):  # BERT's weights: the embedder reads bert/
        config.update(text_conditions(path, ucfg), latent_scale=text_latent_scale(autoencoder))
    else:
        conditions, state["embedder.embedding.weight"] = class_conditions(path, ucfg)
        config.update(conditions)
    scheduler = read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
    return config, state, scheduler


def class_conditions(path, ucfg):
    """class_embedder/: one context token per label, the last row the null class; the run
    config's part and the table [n + 1, D]."""
    embedder = read_json(os.path.join(path, "class_embedder", "config.json"))
    if embedder["embed_dim"] != ucfg.context_dim:
        raise ValueError(f"{path}: class_embedder embed_dim {embedder['embed_dim']} differs from "
                         f"the U-Net's cross_attention_dim {ucfg.context_dim}")
    table = read_weights(os.path.join(path, "class_embedder"))["embedding.weight"]
    return {"text": False, "num_classes": embedder["n_classes"] - 1, "class_names": None}, table


def text_conditions(path, ucfg):
    """bert/ and tokenizer/: BERT's token states are the context as they are (no projection:
    the U-Net's context width is BERT's), BERT called with the token ids only, 77 tokens."""
    bert = read_json(os.path.join(path, "bert", "config.json"))
    if bert["hidden_size"] != ucfg.context_dim:
        raise ValueError(f"{path}: BERT's width {bert['hidden_size']} differs from the U-Net's "
                         f"cross_attention_dim {ucfg.context_dim}")
    tokenizer = os.path.join(path, "tokenizer")
    return {"text": True, "num_classes": None, "text_encoder": os.path.join(path, "bert"),
            "tokenizer": tokenizer if os.path.isdir(tokenizer) else None, "text_length": 77,
            "attention_mask": False}


def text_latent_scale(autoencoder):
    """The text pipeline decodes latents / scaling_factor (diffusers' LDMTextToImagePipeline;
    VQModel's default 0.18215 when the config has none), so its U-Net's latents are the
    autoencoder's times that factor. The class pipeline decodes the latents as they are."""
    return read_json(os.path.join(autoencoder, "config.json")).get("scaling_factor", 0.18215)


def latent_scale(path):
    """The latent scale a released model's U-Net works at, where its pipeline sets one (a text
    pipeline directory); None otherwise (the autoencoder's own)."""
    text = os.path.isdir(os.path.join(path, "bert"))
    if not (os.path.isdir(path) and is_pipeline(path) and text):
        return None
    return text_latent_scale(next(os.path.join(path, d) for d in ("vqvae", "vae")
                                  if os.path.isdir(os.path.join(path, d))))


def ldm_checkpoint(ckpt, path):
    """(run config, state dict, None) of LDM's cin256-v2 model.ckpt (loaded as `ckpt`): the
    ldm4-in1k U-Net, a 1001-row class table (the last row the null class) and the VQ-f4
    autoencoder, which the run config points at (the same file)."""
    sd = ckpt.get("state_dict", ckpt)
    prefix = "model.diffusion_model."
    if not any(k.startswith(prefix) for k in sd) or "cond_stage_model.embedding.weight" not in sd:
        raise ValueError(f"{path} is neither a train.py checkpoint nor an LDM class model: "
                         f"expected {CHECKPOINT_HINT}")
    state = {"unet." + k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    table = sd["cond_stage_model.embedding.weight"]  # [n + 1, 512]
    state["embedder.embedding.weight"] = table
    ucfg = unet.PRESETS["ldm4-in1k"]
    config = {"text": False, "num_classes": len(table) - 1, "class_names": None,
              "unet": dataclasses.asdict(ucfg), "channels": ucfg.in_channels,
              "size": ucfg.sample_size, "space": "latent", "vae": path, "vae_preset": "vq-f4",
              "released": path}
    return config, state, None
