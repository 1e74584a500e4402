"""bench.py: its CPU path runs end to end on the tiny preset, and its checks can fail."""
import argparse
import json
import sys

import pytest
import torch

import unet
from experiments import bench, gpu_check


def test_cpu_smoke(tmp_path, monkeypatch):
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv",
                        ["bench.py", "--device", "cpu", "--preset", "tiny", "--batch-size", "1",
                                      "--steps", "1", "--warmup", "1", "--sample-steps", "3",
                                      "--lines", "diffusers,channels-last,heads", "--out",
                                      str(out)])
    torch.set_num_threads(1)  # the shared 2-core test machine
    bench.main()
    report = json.loads(out.read_text())
    train = {row["name"]: row for row in report["train"]}
    # same weights, same batch: ours and diffusers' first losses agree
    assert train["diffusers (anchor)"]["loss_rel_err"] < 1e-5
    reference = train["ours: reference"]  # its share of the fp32 matmul peak measured in the run
    peak = report["cpu_peak_gflops"]["fp32, 1 threads"]
    assert reference["images_per_s"] > 0 and peak > 0
    assert reference["mfu"] == pytest.approx(1e3 * reference["tflops"] / peak)
    assert report["train_flops_per_step"]["ours, head_channels -1"] \
        == report["train_flops_per_step"]["diffusers, head_channels -1"]
    assert "ours eager / diffusers eager" in report["train_vs_anchor"]
    assert set(train) == {"ours: reference", "diffusers (anchor)", "channels-last",
                          "32-wide heads [DIFFERENT MODEL]"}
    sample = {row["name"]: row for row in report["sample"]}
    assert sample["diffusers fp32"]["rel_err_vs_ours_fp32"] < 1e-4
    assert report["features_rel_err"] < 1e-5 and len(report["features"]) == 2
    autoencoder = {row["name"]: row for row in report["autoencoder"]}
    assert autoencoder["decode: diffusers fp32"]["rel_err_vs_ours_fp32"] < 1e-4
    assert autoencoder["encode: ours bf16 autocast"]["rel_err_vs_ours_fp32"] < 0.1


def test_flops_of_an_ldm4_in1k_training_step():
    # An earlier estimate quotes ~40.3 TFLOP per ldm4-in1k training step at batch 64; counted on
    # meta: 40.0.
    flops = bench.step_flops("ours", unet.PRESETS["ldm4-in1k"], 64, None)
    assert 39.5e12 < flops < 40.5e12


def test_rel_err_fails_on_zero_reference():
    assert not bench.rel_err(torch.ones(3), torch.zeros(3)) <= 1.0  # NaN: a check on zeros fails
    assert bench.rel_err(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5])) == pytest.approx(0.2)


def test_gpu_check_runs_on_the_cpu(tmp_path):
    """The GPU command's checks, on the CPU (gloo, CPU autocast; compile is tested in
    test_train)."""
    report = {}
    assert gpu_check.gpu_check(torch.device("cpu"), report, str(tmp_path), compile_=False)
    names = [c["check"] for c in report["gpu_check"]]
    assert names == ["bf16 training", "torchrun (gloo) stopped at step 3 and resumed",
                     "bf16 sampling"]
    assert "max |weight difference| 0.0e+00" in report["gpu_check"][1]["detail"]


def test_a_one_thread_training_line_runs_its_backward_on_one_thread(monkeypatch):
    """The thread count of a line holds for the whole step (the backward is most of it)."""
    import diffusion
    from experiments import measure
    seen = []

    def loss_noting_threads(*args):
        loss = measure.unet_loss(*args)
        loss.register_hook(lambda grad: seen.append(torch.get_num_threads()))  # in the backward
        return loss

    monkeypatch.setattr(bench, "unet_loss", loss_noting_threads)
    config = unet.PRESETS["tiny"]
    batch = [torch.randn(2, 3, 16, 16), torch.randint(0, 1000, (2,)), torch.randn(2, 3, 16, 16),
             torch.randn(2, 1, config.context_dim), None]
    abar = diffusion.alphas_cumprod(diffusion.ldm_linear_betas())
    setup = measure.Setup(bf16=False, tf32=False, fused_adamw=False, threads=1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        bench.train_line("ours", setup, config, measure.random_unet_state(config), batch, abar,
                         None, argparse.Namespace(warmup=1, steps=1), torch.device("cpu"))
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 1]  # the warm-up step and the timed one
