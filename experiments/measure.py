"""What one line of experiments/bench.py measures with: the setup of a line (one thing changed
against the reference), the timing (median over repeats, CUDA events on a GPU), the models it
compares (ours and diffusers' UNet2DConditionModel / AutoencoderKL with the same weights), the
FLOPs and the peak a line is a share of (the datasheet's on CUDA, a measured matmul on the CPU),
and how a line is printed.
"""
import contextlib
import dataclasses
import gc
import importlib.metadata
import os
import platform
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
    threads: int = 0  # CPU threads for the line (0: the process's)


def reference_setup(device):
    cuda = device.type == "cuda"
    return Setup(bf16=cuda, tf32=cuda, fused_adamw=cuda)


def line_threads(setup):
    """The setup's CPU thread count inside the context (0: the process's), restored after: it
    must hold a whole training step, the backward and the optimizer included."""
    stack = contextlib.ExitStack()
    if setup.threads:
        stack.callback(torch.set_num_threads, torch.get_num_threads())
        torch.set_num_threads(setup.threads)
    return stack


def running(setup, device):
    """Apply a setup's switches: TF32 flags (global), attention kernel and autocast (context;
    the forward only, as autocast is meant)."""
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


def matmul_gflops(dtype, threads, n=2048, repeats=5):
    """The CPU's measured peak: GFLOP/s of an n x n by n x n matmul (2 n^3 FLOPs) in `dtype` at
    `threads` threads, the median of `repeats` after one untimed call."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    with running(Setup(bf16=False, tf32=False, threads=threads), torch.device("cpu")):
        seconds = median_seconds(lambda: a @ b, 1, repeats, torch.device("cpu"))
    return 2 * n ** 3 / seconds / 1e9


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


def forward_flops(call, x):
    """FLOPs of call(x), counted while it runs."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call(x)
    return counter.get_total_flops()


def step_flops(kind, config, batch_size, head_channels, backward=True):
    """FLOPs of one training step (forward + backward), or of one forward, counted on the meta
    device."""
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
        loss = unet_loss(model, x0, t, torch.randn_like(x0), context, abar)
        if backward:
            loss.backward()
    return counter.get_total_flops()


def diffusers_autoencoder(config):
    """diffusers' AutoencoderKL / VQModel of the same shape as vae.Autoencoder(config) (random
    weights; weights.autoencoder_key_map names ours in it)."""
    from diffusers import AutoencoderKL, VQModel
    levels = len(config.ch_mult)
    kw = dict(in_channels=config.in_channels, out_channels=config.in_channels,
              down_block_types=("DownEncoderBlock2D",) * levels,
              up_block_types=("UpDecoderBlock2D",) * levels,
              block_out_channels=tuple(config.ch * m for m in config.ch_mult),
              layers_per_block=config.num_res_blocks, latent_channels=config.z_channels,
              norm_num_groups=32)
    if config.kind == "vq":
        return VQModel(**kw, num_vq_embeddings=config.n_embed, vq_embed_dim=config.embed_dim).eval()
    return AutoencoderKL(**kw).eval()


# ----------------------------------------------------------------------------- report

def throughput(flops, seconds, setup, args, device, report):
    """TFLOP/s of a line and its share of the peak (mfu): on CUDA of the datasheet's bf16 peak
    (--peak-tflops), on the CPU of the matmul peak measured in this run at the line's dtype and
    thread count."""
    tflops = flops / seconds / 1e12
    if device.type == "cuda":
        return {"tflops": tflops, "mfu": tflops / args.peak_tflops}
    key = f"{'bf16' if setup.bf16 else 'fp32'}, {setup.threads or torch.get_num_threads()} threads"
    return {"tflops": tflops, "mfu": 1e3 * tflops / report["cpu_peak_gflops"][key]}


def cpu_peaks():
    """{"fp32, N threads": GFLOP/s} of a 2048^3 matmul, fp32 and bf16, at 1 and all threads."""
    return {f"{name}, {n} threads": matmul_gflops(dtype, n)
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
            for n in sorted({1, torch.get_num_threads()})}


def header(title, device):
    rate, share = ("TFLOP/s", "MFU") if device.type == "cuda" else ("GFLOP/s", "% peak")
    print(f"\n== {title}\n  {'line':<44} {'img/s':>9} {'ms':>9} {rate:>8} {share:>6} "
          f"{'mem GiB':>8} {'x ref':>6}  check")


def print_row(row, note, device):
    def fmt(value, spec, width):
        return f"{value:{width}{spec}}" if value is not None else " " * (width - 1) + "-"
    ms = row.get("ms_per_step", row.get("ms_per_batch"))
    rate = row.get("tflops")
    rate = rate if device.type == "cuda" or rate is None else 1e3 * rate  # CPU: GFLOP/s
    print(f"  {row['name']:<44} {row['images_per_s']:9.1f} {ms:9.1f} {fmt(rate, '.3g', 8)} "
          f"{fmt(row.get('mfu'), '.1%', 6)} {fmt(row.get('peak_memory_gib'), '.1f', 8)} "
          f"{row['speedup_vs_reference']:5.2f}x  {note}", flush=True)


def package_version(name):
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version(name)
    return None


def cpu_name():
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    return platform.processor() or "cpu"
