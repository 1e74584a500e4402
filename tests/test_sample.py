"""sample.py on tiny train.py runs of the embedded digits: outputs, batch and process invariance,
a stopped run continued, CADS, clipping, bf16, one-line errors."""
import json
import os
import shutil
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import diffusion
import sample
from conftest import run


def test_sample_writes_outputs_and_is_batch_invariant(tmp_path):
    out = run(tmp_path, "s", "--steps", "2")
    common = ["--ckpt", out, "--per-class", "2", "--steps", "5", "--guidance", "1,2.5"]
    sample.main([*common, "--out", str(tmp_path / "a"), "--batch-size", "7"])
    sample.main([*common, "--out", str(tmp_path / "b"), "--batch-size", "4", "--no-images"])
    a, b = np.load(tmp_path / "a/s2.5/samples.npz"), np.load(tmp_path / "b/s2.5/samples.npz")
    assert a["arr_0"].shape == (20, 8, 8, 1) and a["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["labels"], np.repeat(np.arange(10), 2))
    assert (tmp_path / "a/s1/grid.png").exists() and len(os.listdir(tmp_path / "a/s1/images")) == 20
    assert not (tmp_path / "b/s1/images").exists()
    assert float(a["guidance"]) == 2.5 and list(a["index"]) == list(range(20))


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_stopped_sample_run_continues_to_the_uninterrupted_samples(tmp_path, monkeypatch, sig,
                                                                     capsys):
    import signal
    out = run(tmp_path, "s", "--steps", "2")
    common = ["--ckpt", out, "--per-class", "2", "--steps", "3", "--guidance", "1,2",
              "--batch-size", "6", "--no-images"]
    sample.main([*common, "--out", str(tmp_path / "full")])
    draw, calls = diffusion.sample, []

    def draw_then_signal(*a, **k):
        calls.append(1)
        if len(calls) == 6:  # s=2's second batch (s=1 took four): a pre-emption notice
            os.kill(os.getpid(), getattr(signal, sig))
        return draw(*a, **k)
    monkeypatch.setattr(diffusion, "sample", draw_then_signal)
    part = tmp_path / "part"
    with pytest.raises(SystemExit, match=f"stopped by {sig} after 12 of 20 samples of s=2"):
        sample.main([*common, "--out", str(part)])
    assert sorted(os.listdir(part / "s2/partial")) == ["00000000.npz", "00000006.npz"]
    assert not (part / "s2/samples.npz").exists() and not (part / "s1/partial").exists()
    shutil.copytree(part, tmp_path / "other")
    sample.main([*common, "--seed", "1", "--out", str(tmp_path / "other")])  # other settings
    assert "2 shards of other settings ignored" in capsys.readouterr().out
    monkeypatch.setattr(diffusion, "sample", draw)
    sample.main([*common, "--out", str(part)])  # the same command: s=1 kept, s=2 from 12 on
    printed = capsys.readouterr().out
    assert "s1/samples.npz already holds these 20 samples" in printed
    assert "12 samples of a stopped run found" in printed and "ignored" not in printed
    for scale in ("s1", "s2"):
        full, resumed = np.load(tmp_path / "full" / scale / "samples.npz"), np.load(part / scale /
                                                                                    "samples.npz")
        assert full.files == resumed.files
        for k in full.files:
            if k != "ckpt":
                np.testing.assert_array_equal(full[k], resumed[k])
    assert not (part / "s2/partial").exists()  # the shards are in samples.npz
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_cads_sampling_is_seeded_batch_invariant_and_recorded(tmp_path):
    out = run(tmp_path, "c", "--steps", "2")
    common = ["--ckpt", out, "--per-class", "1", "--steps", "6", "--guidance", "2", "--no-images",
              "--no-clip-denoised"]  # clipped, a 2-step model's samples saturate either way
    sample.main([*common, "--out", str(tmp_path / "plain")])
    sample.main([*common, "--out", str(tmp_path / "a"), "--cads", "--batch-size", "3"])
    sample.main([*common, "--out", str(tmp_path / "b"), "--cads", "--batch-size", "10"])
    plain, a, b = (np.load(tmp_path / f"{d}/s2/samples.npz") for d in ("plain", "a", "b"))
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])  # per-sample CADS noise
    assert not np.array_equal(a["arr_0"], plain["arr_0"])  # CADS changes the samples
    assert str(plain["cads"]) == "off" and str(a["cads"]).startswith("tau=0.6,0.9,s=0.25")
    with pytest.raises(SystemExit, match="--cads-tau"):
        sample.main([*common, "--out", str(tmp_path / "bad"), "--cads", "--cads-tau", "0.9,0.6"])
    with pytest.raises(SystemExit, match="--ddim-eta"):
        sample.main([*common, "--out", str(tmp_path / "bad"), "--ddim-eta", "2"])


def test_sampling_an_untrained_model_warns_clipped_or_not(tmp_path, capsys):
    """Pixel models clip x0 by default: an untrained model's values then pile up at -1 and +1;
    unclipped, they run far outside the range. Both say so, with the epochs seen."""
    out = run(tmp_path, "raw", "--steps", "1")
    common = ["--ckpt", out, "--per-class", "2", "--steps", "5", "--no-images"]
    sample.main([*common, "--out", str(tmp_path / "s")])
    printed = capsys.readouterr().out
    assert "sit at -1 or +1" in printed and "saw 0.00989 epochs" in printed  # 16 of 1,617
    assert bool(np.load(tmp_path / "s/s2/samples.npz")["clip_denoised"])
    sample.main([*common, "--out", str(tmp_path / "u"), "--no-clip-denoised"])
    assert "lie outside [-3.0, 3.0]" in capsys.readouterr().out
    assert not bool(np.load(tmp_path / "u/s2/samples.npz")["clip_denoised"])
    assert sample.range_warning(0.005) is None and "12.0 %" in sample.range_warning(0.12)
    assert sample.range_warning(0.0, 0.9) is None and "99.0 %" in sample.range_warning(0.0, 0.99)


def test_clip_denoised_bounds_every_x0_prediction():
    abar = diffusion.alphas_cumprod(diffusion.ldm_linear_betas())
    x, t = torch.randn(4, 1, 8, 8) * 3, torch.tensor([999, 500, 10, 0])
    eps = diffusion.clip_denoised(lambda x, t: torch.randn_like(x) * 5, abar)(x, t)
    a = abar[t].view(-1, 1, 1, 1).float()
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    assert x0.abs().max() <= 1 + 1e-4


def test_sample_refuses_bad_classes_counts_and_non_finite_weights(tmp_path):
    out = run(tmp_path, "m", "--steps", "1")
    common = ["--ckpt", out, "--steps", "2", "--out", str(tmp_path / "s"), "--no-images"]
    with pytest.raises(SystemExit, match=r"--classes must lie in \[0, 9\]"):
        sample.main([*common, "--classes", "10"])  # 10 is the null class of a 10-class model
    with pytest.raises(SystemExit, match="--per-class must be >= 1"):
        sample.main([*common, "--per-class", "0"])
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    next(v for v in ckpt["ema"].values() if v.is_floating_point())[0] = float("nan")
    torch.save(ckpt, os.path.join(out, "ckpt.pt"))
    with pytest.raises(SystemExit, match="weights are not finite"):
        sample.main(common)
    assert not os.path.exists(tmp_path / "s")


def test_bf16_autocast_samples_stay_close_to_fp32(tmp_path):
    out = run(tmp_path, "p", "--steps", "30", "--batch-size", "32")
    common = ["--ckpt", out, "--per-class", "2", "--steps", "10", "--guidance", "2", "--no-images"]
    sample.main([*common, "--out", str(tmp_path / "fp32"), "--precision", "fp32"])
    sample.main([*common, "--out", str(tmp_path / "bf16"), "--precision", "bf16"])
    a, b = (np.load(tmp_path / f"{p}/s2/samples.npz")["arr_0"].astype(float) for p in ("fp32",
                                                                                       "bf16"))
    assert not np.array_equal(a, b)  # bf16 did run
    assert np.abs(a - b).mean() < 1.0  # of 255 levels (measured: 0.3)


def test_sampling_into_an_existing_output_replaces_it_whole(tmp_path):
    out = run(tmp_path, "r", "--steps", "1")
    common = ["--ckpt", out, "--steps", "2", "--guidance", "1", "--out", str(tmp_path / "s")]
    sample.main([*common, "--per-class", "2"])
    sample.main([*common, "--per-class", "1"])
    assert len(os.listdir(tmp_path / "s/s1/images")) == 10  # not 20: no stale PNGs
    assert np.load(tmp_path / "s/s1/samples.npz")["arr_0"].shape[0] == 10


def test_a_run_trained_again_to_the_same_step_is_sampled_again(tmp_path):
    """The kept samples were keyed by the checkpoint's path and step: a run folder trained again
    (another seed) to the same step kept the first model's samples."""
    out = run(tmp_path, "r", "--steps", "1")
    common = ["--ckpt", out, "--steps", "2", "--guidance", "2", "--per-class", "1",
              "--no-images", "--out", str(tmp_path / "s")]
    sample.main(common)
    first = np.load(tmp_path / "s/s2/samples.npz")["arr_0"]
    shutil.rmtree(out)
    run(tmp_path, "r", "--steps", "1", "--seed", "5")
    sample.main(common)
    assert not np.array_equal(np.load(tmp_path / "s/s2/samples.npz")["arr_0"], first)


def test_class_grids_are_labelled_with_class_names(tmp_path):
    out = run(tmp_path, "g", "--steps", "1")
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["class_names"] == [str(d) for d in range(10)]
    sample.main(["--ckpt", out, "--per-class", "1", "--steps", "2", "--out", str(tmp_path / "s"),
                 "--no-images"])
    from PIL import Image
    grid = np.asarray(Image.open(tmp_path / "s/s2/grid.png"))
    unlabelled = 1 * (64 + 2) + 2  # one 64-pixel column (8x8 zoomed) and its gaps
    assert grid.shape[1] > unlabelled and (grid[:, :4] == 255).all()  # a white label margin


@pytest.mark.parametrize("flags,message", [
    (["--guidance", "2,x"], "--guidance must be comma-separated numbers"),
    (["--guidance", "-1"], "--guidance scales must be >= 0"),
    (["--steps", "0"], "--steps and --batch-size must be >= 1"),
    (["--ddim-eta", "-0.5"], r"--ddim-eta must be in \[0, 1\]"),
    (["--cads", "--cads-tau", "low,high"], "--cads-tau must be tau1,tau2"),
])
def test_bad_sampling_flags_give_one_line_errors(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        sample.main(["--ckpt", str(tmp_path / "none"), "--out", str(tmp_path / "s"), *flags])
    assert not os.path.exists(tmp_path / "s")


def _sample_worker(rank, world, port, argv):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sample.main(argv)


@pytest.mark.parametrize("classes", ["0,1,2,3,4,5,6", "0,1"])  # 7 over 3 ranks; 2 (one rank empty)
def test_sharded_sampling_equals_one_process(tmp_path, classes):
    out = run(tmp_path, "m", "--steps", "1")
    common = ["--ckpt", out, "--classes", classes, "--per-class", "1", "--steps", "3",
              "--guidance", "1,2", "--threads", "1", "--no-images"]
    sample.main([*common, "--out", str(tmp_path / "one")])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sample_worker, args=(3, port, [*common, "--out", str(tmp_path / "three")]), nprocs=3,
             join=True)
    for scale in ("s1", "s2"):
        a, b = (np.load(tmp_path / d / scale / "samples.npz") for d in ("one", "three"))
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
        # shards gone
        assert sorted(os.listdir(tmp_path / "three" / scale)) == ["grid.png", "samples.npz"]
