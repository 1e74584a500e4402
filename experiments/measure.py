"""What one line of experiments/bench.py measures with: the setup of a line (one thing changed
against the reference), the timing (median over repeats, CUDA events on a GPU), and the two
U-Nets it compares, ours (unet.py) and diffusers' UNet2DConditionModel with the same weights.
"""
import contextlib
import dataclasses
import gc
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import diffusion
import unet
from support import system, weights

SDPA = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH}


@dataclasses.dataclass(frozen=True)
class Setup:
    """How a step runs. Each ablation line changes one field of the reference setup."""
    bf16: bool = True  # bf16 autocast (CUDA); False = fp32
    tf32: bool = True  # TF32 for fp32 matmuls and convolutions (CUDA)
    cudnn_benchmark: bool = False  # let cuDNN time its convolution algorithms (CUDA)
    channels_last: bool = False  # NHWC memory format for the model and its input
    sdpa: str = "auto"  # attention kernel: auto (PyTorch picks) | flash | efficient | math
    head_channels: int = None  # None: the preset's (ldm4-in1k: one head, Table 3); N: N-wide heads
    compile: bool = False  # torch.compile of the denoiser (default mode)
    fused_adamw: bool = True  # fused AdamW kernel; False = foreach
    encode: bool = False  # encode 256x256 images with the autoencoder every step (no latent cache)


def reference_setup(device):
    cuda = device.type == "cuda"
    return Setup(bf16=cuda, tf32=cuda, fused_adamw=cuda)


def running(setup, device):
    """Apply a setup's switches: TF32 flags (global), attention kernel and autocast (context)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = setup.tf32
    torch.backends.cudnn.benchmark = setup.cudnn_benchmark
    stack = contextlib.ExitStack()
    if setup.sdpa != "auto":
        stack.enter_context(sdpa_kernel(SDPA[setup.sdpa]))
    if setup.bf16:
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
    return stack


# ----------------------------------------------------------------------------- measuring


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, warmup, repeats, device):
    """Median wall time of one fn() call after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def rel_err(a, b):
    """max |a - b| / max |b|; NaN (which fails every `err <= tol`) when b is all zeros."""
    scale = b.float().abs().max().item()
    return (a.float() - b.float()).abs().max().item() / scale if scale > 0 else float("nan")


# ----------------------------------------------------------------------------- the two U-Nets


class DiffusersEps(torch.nn.Module):
    """diffusers' U-Net behind our denoiser signature model(x, t, context) -> eps."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t, context):
        return self.net(x, t, encoder_hidden_states=context, return_dict=False)[0]


def random_unet_state(config):
    """The random U-Net weights every line of a section starts from (CPU, our key names)."""
    with torch.device("meta"):
        model = unet.UNet(config)
    return system.randomise_(model.to_empty(device="cpu"), seed=1).state_dict()


def unet_loss(model, x0, t, noise, context, abar):
    """diffusion.training_loss of a bare U-Net given its context tokens (no embedder, no CEP)."""
    return diffusion.training_loss(lambda x_t, tt, c, delta: model(x_t, tt, c), x0, t, noise,
                                   context, None, abar)


def build_unet(kind, config, state, device, setup=Setup()):
    """Our U-Net ("ours") or diffusers' ("diffusers") with the weights `state` (our key names)."""
    if setup.head_channels is not None:  # the same weights make a different function
        config = dataclasses.replace(config, head_channels=setup.head_channels)
    if kind == "ours":
        with torch.device("meta"):
            model = unet.UNet(config)
        model = model.to_empty(device=device)
        model.load_state_dict(state)
    else:
        from diffusers import UNet2DConditionModel
        with torch.device("meta"):
            net = UNet2DConditionModel(**weights.unet_diffusers_config(config))
        net = net.to_empty(device=device)
        net.load_state_dict({theirs: state[ours]
                             for ours, theirs in weights.unet_key_map(config).items()})
        model = DiffusersEps(net)
    if setup.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if setup.compile else model


def step_flops(kind, config, batch_size, head_channels):
    """FLOPs of one training step (forward + backward), counted on the meta device."""
    if head_channels is not None:
        config = dataclasses.replace(config, head_channels=head_channels)
    with torch.device("meta"):
        if kind == "ours":
            model = unet.UNet(config)
        else:
            from diffusers import UNet2DConditionModel
            model = DiffusersEps(UNet2DConditionModel(**weights.unet_diffusers_config(config)))
        x0 = torch.randn(batch_size, config.in_channels, config.sample_size, config.sample_size)
        t = torch.randint(0, 1000, (batch_size,))
        context = torch.randn(batch_size, 1, config.context_dim)
        abar = diffusion.alphas_cumprod(diffusion.ldm_linear_betas())
    with FlopCounterMode(display=False) as counter:
        unet_loss(model, x0, t, torch.randn_like(x0), context, abar).backward()
    return counter.get_total_flops()
