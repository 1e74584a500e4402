"""Shared by the tests: one torch thread per pytest-xdist worker (pytest -n auto), so that the
workers and the processes some tests start share the cores without oversubscribing them
(system.py); the longest test first; the helpers several test files use (a tiny train.py run,
its weights, a released-format pipeline directory with random weights)."""
import json
import os

import safetensors.torch
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel, VQModel

import diffusion
import train
import unet
from support import system, weights

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"  # read by system.set_threads and by child processes
    torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """The longest test first: under -n auto it then runs beside all the others instead of
    starting last and running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("longest") is None)  # stable


# ----------------------------------------------------------------------------- train.py runs

TINY = ["--preset", "digits", "--batch-size", "16", "--log-every", "1", "--num-workers", "0"]


def run(tmp_path, name, *flags):
    """A tiny train.py run (the digits preset, batch 16) in tmp_path/name."""
    out = str(tmp_path / name)
    train.main([*TINY, "--out", out, *flags])
    return out


def params(out, key="model"):
    """A run's model (or EMA) weights."""
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)[key]


def assert_same(a, b):
    """Two state dicts equal bit for bit."""
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0.0, rtol=0.0, msg=k)


# ----------------------------------------------------------------------------- released pipelines

# 16x16 one-channel images -> a 2-level VQ -> 8x8x3 latents -> a one-head U-Net with 32-d context
TINY_UNET = unet.UNetConfig(3, 3, 32, (1, 2), 1, (4,), 8, 32, head_channels=-1)
CLASSES = 10  # the class table has CLASSES + 1 rows: the last is the null class
LDM_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0015,
                    beta_end=0.0195, clip_sample=False)


def write_pipeline(root, timestep_spacing, steps_offset, ucfg=TINY_UNET, scheduler=DDIMScheduler,
                   **scheduler_options):
    """The layout of a DiffusionNoise class model: unet/, vqvae/, class_embedder/, scheduler/."""
    net = system.randomise_(UNet2DConditionModel(**weights.unet_diffusers_config(ucfg)), seed=1)
    net.save_pretrained(root / "unet")
    levels = ("DownEncoderBlock2D",) * 2, ("UpDecoderBlock2D",) * 2
    vq = VQModel(in_channels=1, out_channels=1, down_block_types=levels[0],
                 up_block_types=levels[1], block_out_channels=(32, 64), layers_per_block=1,
                 latent_channels=3, num_vq_embeddings=64, vq_embed_dim=3, norm_num_groups=32)
    system.randomise_(vq, seed=2).save_pretrained(root / "vqvae")
    os.makedirs(root / "class_embedder")
    with open(root / "class_embedder" / "config.json", "w") as f:  # the fork's ClassEmbedder
        json.dump({"_class_name": "ClassEmbedder", "n_classes": CLASSES + 1, "embed_dim": 32}, f)
    table = torch.randn(CLASSES + 1, 32, generator=torch.Generator().manual_seed(3))
    path = root / "class_embedder" / "diffusion_pytorch_model.safetensors"
    safetensors.torch.save_file({"embedding.weight": table}, str(path))
    betas = diffusion.ldm_linear_betas().tolist()  # stored as the released configs store them
    if scheduler is DDIMScheduler:
        scheduler_options = {"set_alpha_to_one": False, **scheduler_options}
    scheduler(**LDM_SCHEDULE, trained_betas=betas, timestep_spacing=timestep_spacing,
              steps_offset=steps_offset, **scheduler_options).save_pretrained(root / "scheduler")
    return table
