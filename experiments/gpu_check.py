"""`python -m experiments.bench --gpu-check`: the code paths only a GPU run takes, each against its
fp32 / eager / uninterrupted twin (bf16 training, torch.compile, torchrun stopped and resumed,
bf16 sampling, the SDPA kernels that accept the paper's one-head attention). On the CPU the same
checks run with gloo and CPU autocast at a smaller size (tests/test_bench.py). Method:
experiments/BENCHMARKS.md.
"""
import contextlib
import json
import os
import sys

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def last_loss(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return json.loads(f.readlines()[-1])["loss"]


def check_line(report, name, ok, detail):
    """One line of the GPU check: printed and kept in the report."""
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}")
    report.setdefault("gpu_check", []).append({"check": name, "ok": bool(ok), "detail": detail})


def sdpa_kernels(device, dims):
    """The SDPA backends that accept one-head attention of these widths in bf16 (CUDA only)."""
    found = {}
    for dim, tokens in dims:
        q = torch.randn(2, 1, tokens, dim, device=device, dtype=torch.bfloat16)
        ok = []
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
            with contextlib.suppress(RuntimeError), sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
                ok.append(backend.name.lower())
        found[f"head {dim}, {tokens} tokens"] = ok
    return found


def gpu_check(device, report, out_dir, compile_=True):
    """The paths only a GPU run takes, each against its fp32 / eager / uninterrupted twin: bf16
    training, torch.compile, torchrun with NCCL stopped and resumed, bf16 sampling, SDPA kernels.
    On the CPU the same checks run with gloo and CPU autocast (the kernel list is CUDA only)."""
    import sample
    import subprocess
    import train
    cuda = device.type == "cuda"  # the CPU runs the same code paths at a smaller size
    steps, batch, per_class = (20, 32, 4) if cuda else (10, 16, 2)
    print(f"\n== GPU check (tiny preset, 16x16 digits, {steps} steps) on {device}")
    base = ["--preset", "tiny", "--image-size", "16", "--batch-size", str(batch), "--log-every",
            "5",
            "--num-workers", "0", "--threads", "0"]
    runs = {name: os.path.join(out_dir, name) for name in ("fp32", "bf16", "compiled", "full",
                                                           "part")}
    train.main([*base, "--steps", str(steps), "--precision", "fp32", "--out", runs["fp32"]])
    train.main([*base, "--steps", str(steps), "--precision", "bf16", "--out", runs["bf16"]])
    a, b = last_loss(runs["fp32"]), last_loss(runs["bf16"])
    check_line(report, "bf16 training", abs(b - a) <= 0.05 * a,
               f"loss {b:.6f} vs fp32 {a:.6f} (rel diff {abs(b - a) / a:.1e})")
    if compile_:
        train.main([*base, "--steps", str(steps), "--precision", "fp32", "--compile", "--out",
                    runs["compiled"]])
        c = last_loss(runs["compiled"])
        check_line(report, "torch.compile", abs(c - a) <= 1e-3 * a,
                   f"loss {c:.6f} vs eager {a:.6f}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
    script = os.path.join(root, "train.py")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", script, *base,
                "--ckpt-every", "3", "--precision", "fp32"]
    for name, steps, extra in (("full", 6, []), ("part", 3, []), ("part", 6, ["--resume"])):
        subprocess.run([*launcher, "--steps", str(steps), "--out", runs[name], *extra], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    full, part = (torch.load(os.path.join(runs[n], "ckpt.pt"), weights_only=True)["model"]
                  for n in runs
                  if n in ("full", "part"))
    worst = max((full[k] - part[k]).abs().max().item() for k in full)
    backend = "nccl" if cuda else "gloo"
    check_line(report, f"torchrun ({backend}) stopped at step 3 and resumed", worst == 0.0,
               f"max |weight difference| {worst:.1e} after 6 steps")
    outs = {}
    for precision in ("fp32", "bf16"):
        outs[precision] = os.path.join(out_dir, f"samples-{precision}")
        sample.main(["--ckpt", runs["fp32"], "--per-class", str(per_class), "--guidance", "2",
                     "--no-images",
                     "--precision", precision, "--out", outs[precision]])
    x, y = (np.load(os.path.join(o, "s2", "samples.npz"))["arr_0"].astype(float)
            for o in outs.values())
    check_line(report, "bf16 sampling", np.abs(x - y).mean() < 2.0,
               f"mean |bf16 - fp32| {np.abs(x - y).mean():.2f} of 255 levels")
    if cuda:  # one-head U-Net widths at their maps (64x64 latents), VQ-f4's middle
        kernels = sdpa_kernels(device, [(192, 1024), (384, 256), (576, 64), (960, 64), (512, 4096)])
        report["sdpa_kernels"] = kernels
        for shape, ok in kernels.items():
            print(f"  SDPA {shape}: {', '.join(ok)}")
    return all(c["ok"] for c in report["gpu_check"])
