"""Bad inputs as a table: each row a bad input a careful user tried, named by what it checks, the
script it went to, and what must happen: a one-line error with these words (SystemExit), or a
note with these words and the right result. A regression shows as the row's name."""
import dataclasses
import json
import os
import re
import shutil

import matplotlib
import numpy as np
import pytest
import torch

import metrics
import sample
import train
from experiments import emoji, sweep, train_vae
from support import data, export, system
from conftest import TINY, write_pipeline


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step digits run (checkpoints at steps 2 and 4) and a released-layout pipeline."""
    root = tmp_path_factory.mktemp("bad")
    train.main([*TINY, "--steps", "4", "--ckpt-every", "2", "--out", str(root / "run")])
    write_pipeline(root / "model", "leading", 1)
    return root


def copy(root, name, tmp_path):
    shutil.copytree(root / name, tmp_path / name)
    return tmp_path / name


def train_run(root, tmp_path, *flags):
    train.main([*TINY, "--steps", "1", "--out", str(tmp_path / "new"), *flags])


def resume_shorter(root, tmp_path):  # a step-4 run resumed with --steps 2
    run = copy(root, "run", tmp_path)
    train.main([*TINY, "--steps", "2", "--ckpt-every", "2", "--resume", "--out", str(run)])


def latents_and_vae(root, tmp_path):
    train_run(root, tmp_path, "--latents", str(tmp_path / "cache"), "--vae", str(tmp_path / "v"))


def small_cache(tmp_path, labels=None):
    """A latent cache of 4 digits (a random tiny autoencoder); labels.npy replaced if given."""
    from support import encode
    import vae
    model = system.randomise_(vae.Autoencoder(vae.PRESETS["tiny-kl"], scale=1.0), 0).eval()
    ds = data.InMemoryDataset(torch.zeros(4, 3, 16, 16, dtype=torch.uint8), [0, 1, 0, 1], "ab")
    meta = encode.cache_meta(model, "tiny-kl", __file__, "digits", None, "train", 16, False, False)
    data.encode_dataset(model, ds, str(tmp_path / "cache"), meta, batch_size=4)
    if labels is not None:
        np.save(tmp_path / "cache" / "labels.npy", np.asarray(labels, np.int64))
    return str(tmp_path / "cache")


def cache_with_labels(root, tmp_path, labels):
    train_run(root, tmp_path, "--latents", small_cache(tmp_path, labels), "--preset", "digits")


def sample_run(root, tmp_path, *flags):
    sample.main(["--ckpt", str(root / "run"), "--steps", "2", "--per-class", "1",
                 "--no-images", "--out", str(tmp_path / "s"), *flags])


def unreadable_newest(root, tmp_path, junk=False):  # sample.py falls back to ckpt.prev.pt
    run = copy(root, "run", tmp_path)
    if junk:
        (run / "ckpt.pt").write_bytes(b"junk")  # not a torch file at all
    else:
        with open(run / "ckpt.pt", "r+b") as f:
            f.truncate(200)  # cut short
    sample.main(["--ckpt", str(run), "--steps", "2", "--per-class", "1", "--no-images"])


def saturating_model(root, tmp_path):  # a diverged model's weights give all-black images
    run = copy(root, "run", tmp_path)
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    ckpt["ema"]["unet.out.2.bias"].fill_(1e4)  # eps = 1e4 everywhere: x0 far below -1
    torch.save(ckpt, run / "ckpt.pt")
    sample.main(["--ckpt", str(run), "--steps", "2", "--per-class", "1", "--no-images"])


def damaged_cache(root, tmp_path):  # a metrics cache entry cut short is recomputed
    metrics_on(root, tmp_path, NOISE)
    score(tmp_path, tmp_path / "cache")
    for entry in (tmp_path / "cache").iterdir():
        cut(entry)
    score(tmp_path, tmp_path / "cache")


def pipeline_with(root, tmp_path, part, change):
    """The released pipeline with one file changed by change(path)."""
    model = copy(root, "model", tmp_path)
    change(model / part)
    sample.main(["--ckpt", str(model), "--steps", "2", "--per-class", "1", "--no-images",
                 "--out", str(tmp_path / "s"), "--classes", "1"])


def drop_key(path):
    config = json.load(open(path))
    del config["block_out_channels"]
    path.write_text(json.dumps(config))


def cut(path):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def replace_with_text(path):
    path.write_text("not weights")


def scheduler_change(**change):
    def apply(path):
        config = json.load(open(path))
        config.update({k: v(config) if callable(v) else v for k, v in change.items()})
        path.write_text(json.dumps(config))
    return apply


def vae_on(root, tmp_path, *flags):
    train_vae.main(["--dataset", "digits", "--image-size", "16", "--steps", "1",
                    "--batch-size", "4", "--eval-images", "4", "--out", str(tmp_path / "ae"),
                    *flags])


def captions(root, tmp_path, text, encoding):  # what train.py reads first
    from PIL import Image
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "c.tsv").write_bytes(text.encode(encoding))
    try:
        ds = data.load_caption_tsv(str(tmp_path / "c.tsv"), 8)
    except ValueError as e:  # as train.py reports it
        raise SystemExit(f"train.py: {e}") from None
    assert os.path.exists(ds.paths[0]), ds.paths[0]  # no mark in the path
    assert len(ds) == text.count("\n")  # one pair per line: U+2028 is inside a caption


def metrics_on(root, tmp_path, fake, real=None, labels=None, metric="fid"):
    np.savez(tmp_path / "fake.npz", arr_0=fake, **({} if labels is None else {"labels": labels}))
    np.savez(tmp_path / "real.npz", arr_0=fake if real is None else real)
    from support import features
    clf = features.Classifier(10, 8, 1)
    torch.save({"model": clf.state_dict(), "num_classes": 10, "image_size": 8, "channels": 1},
               tmp_path / "clf.pt")
    score(tmp_path, metric=metric)


def metrics_on_inception(root, tmp_path):
    """IS of 4 samples in the default 10 splits (empty splits gave NaN)."""
    from support import features
    np.savez(tmp_path / "fake.npz", arr_0=NOISE[:4])
    torch.save(features.InceptionV3().state_dict(), tmp_path / "inception.pth")
    metrics.main(["--real", str(tmp_path / "fake.npz"), "--fake", str(tmp_path / "fake.npz"),
                  "--features", f"inception:{tmp_path / 'inception.pth'}", "--metrics", "is",
                  "--out", str(tmp_path / "m"), "--cache", ""])


def score(tmp_path, cache="", metric="fid"):
    metrics.main(["--real", str(tmp_path / "real.npz"), "--fake", str(tmp_path / "fake.npz"),
                  "--features", f"classifier:{tmp_path / 'clf.pt'}", "--metrics", metric,
                  "--out", str(tmp_path / "m"), "--cache", str(cache)])


def two_sweeps(root, tmp_path):  # a second sweep into a folder that one is running in
    with system.folder_lock(str(tmp_path / "sw"), "sweep"):
        sweep.main(["--smoke", "--out", str(tmp_path / "sw"), "--workers", "1"])


def train_beside_another(root, tmp_path):  # two train.py in one --out at once
    run = copy(root, "run", tmp_path)
    with system.folder_lock(str(run), "train"):
        train.main([*TINY, "--steps", "6", "--resume", "--out", str(run)])


def sample_beside_another(root, tmp_path):  # two sample.py into one output folder at once
    with system.folder_lock(str(tmp_path / "s"), "sample"):
        sample_run(root, tmp_path)


def stale_temporary(root, tmp_path):  # a save killed by SIGKILL left its temporary file
    run = copy(root, "run", tmp_path)
    (run / "ckpt.atomic-tmp999999999.pt").write_bytes(b"0" * 1000)
    (run / "notes.tmp999999.txt").write_text("a user's file that looks like a temporary")
    train.main([*TINY, "--steps", "5", "--resume", "--ckpt-every", "5", "--out", str(run)])
    assert not os.path.exists(run / "ckpt.atomic-tmp999999999.pt")
    assert os.path.exists(run / "notes.tmp999999.txt")  # not the project's: kept


def small_autoencoder(tmp_path):
    """A tiny KL autoencoder's checkpoint, as experiments/train_vae.py writes one."""
    import vae
    model = vae.Autoencoder(vae.PRESETS["tiny-kl"], scale=1.0)
    torch.save({"config": dataclasses.asdict(model.config), "preset": "tiny-kl", "scale": 1.0,
                "model": model.state_dict(), "step": 0}, tmp_path / "autoencoder.pt")
    return str(tmp_path / "autoencoder.pt")


def caption_cache_without_encoder(root, tmp_path):
    """A latent cache of captioned images, trained on without --text-encoder."""
    from support import encode
    import vae
    from PIL import Image
    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(tmp_path / f"{i}.png")
    ds = data.FileDataset([str(tmp_path / f"{i}.png") for i in range(4)], 16,
                          captions=["a dog", "a cat", "a red dog", "a cat"])
    model = system.randomise_(vae.Autoencoder(vae.PRESETS["tiny-kl"], scale=1.0), 0).eval()
    meta = encode.cache_meta(model, "tiny-kl", __file__, "captions", None, "train", 16, False,
                             False)
    data.encode_dataset(model, ds, str(tmp_path / "cache"), meta, batch_size=4)
    train_run(root, tmp_path, "--latents", str(tmp_path / "cache"), "--preset", "digits")


def cache_of_a_renamed_class(root, tmp_path):
    """The same support.encode command after a class folder is renamed (same images)."""
    from support import encode
    from PIL import Image
    for name in ("apple", "pear"):
        os.makedirs(tmp_path / "imgs" / name)
        for i in range(2):
            Image.new("RGB", (16, 16), (90 * i, 0, 0)).save(tmp_path / "imgs" / name / f"{i}.png")
    command = ["--dataset", "folder", "--data-root", str(tmp_path / "imgs"), "--image-size",
               "16", "--weights", small_autoencoder(tmp_path), "--out", str(tmp_path / "cache"),
               "--num-workers", "0"]
    encode.main(command)
    os.rename(tmp_path / "imgs" / "pear", tmp_path / "imgs" / "quince")
    encode.main(command)


def between_renames(root, tmp_path):
    """sample.py while a save has moved ckpt.pt to ckpt.prev.pt and not yet renamed the new one
    into place: it samples the previous checkpoint."""
    run = copy(root, "run", tmp_path)
    os.replace(run / "ckpt.pt", run / "ckpt.prev.pt")
    sample_run(tmp_path, tmp_path)


def wrong_shape(root, tmp_path):
    """A checkpoint whose class table was replaced by a tensor of another shape."""
    run = copy(root, "run", tmp_path)
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    ckpt["ema"]["embedder.embedding.weight"] = torch.zeros(3, 3)
    torch.save(ckpt, run / "ckpt.pt")
    sample_run(tmp_path, tmp_path)


def nan_latent(root, tmp_path):
    """A latent cache with a NaN in one latent (a disk error, an overflowing encoder)."""
    cache = small_cache(tmp_path)
    latents = np.load(os.path.join(cache, "latents.npy"), mmap_mode="r+")
    latents[1, 0, 0, 0, 0] = np.nan
    latents.flush()
    train_run(root, tmp_path, "--latents", cache, "--preset", "digits")


def stale_lock_files(root, tmp_path):
    """A lock file left holding garbage, then one naming a live process that holds no lock:
    the kernel's lock is what counts, so both runs go ahead."""
    for text in ("\x00garbage", str(os.getppid())):
        os.makedirs(tmp_path / "new")
        (tmp_path / "new" / ".train.lock").write_text(text)
        train_run(root, tmp_path)
        shutil.rmtree(tmp_path / "new")


def cache_on_a_full_disk(root, tmp_path):
    """The disk has no room for the latent cache: one line before any latent is written (the
    memory map's writes would die of SIGBUS)."""
    def full(fd, offset, length):
        raise OSError(28, "No space left on device")
    fallocate, os.posix_fallocate = os.posix_fallocate, full
    try:
        small_cache(tmp_path)
    finally:
        os.posix_fallocate = fallocate


class Payload:
    """What a hostile checkpoint pickles: a call that would run when the file is unpickled."""
    def __reduce__(self):
        return (os.remove, ("/nonexistent/never-run",))


def classifier_payload(root, tmp_path):
    torch.save({"model": Payload(), "num_classes": 10}, tmp_path / "evil.pt")
    np.savez(tmp_path / "real.npz", arr_0=NOISE)
    metrics.main(["--real", str(tmp_path / "real.npz"), "--fake", str(tmp_path / "real.npz"),
                  "--features", f"classifier:{tmp_path / 'evil.pt'}", "--metrics", "fid",
                  "--out", str(tmp_path / "m")])


def foreign_cache_shape(root, tmp_path):
    """A latent cache whose latents.npy was replaced by an array of another layout."""
    cache = small_cache(tmp_path)
    np.save(os.path.join(cache, "latents.npy"), np.zeros((4, 8, 8), np.float16))
    train_run(root, tmp_path, "--latents", cache, "--preset", "digits")


def cut_cache_file(root, tmp_path, name, keep):
    """A latent cache with one of its files cut to its first `keep` bytes."""
    cache = small_cache(tmp_path)
    path = os.path.join(cache, name)
    with open(path, "rb") as f:
        head = f.read(keep)
    with open(path, "wb") as f:
        f.write(head)
    train_run(root, tmp_path, "--latents", cache, "--preset", "digits")


def folder_with_a_bomb(root, tmp_path):
    """A class folder with an image over PIL's decompression-bomb limit (lowered here)."""
    from PIL import Image
    os.makedirs(tmp_path / "imgs" / "a")
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a" / f"{i}.png")
    Image.new("L", (32, 32)).save(tmp_path / "imgs" / "a" / "big.png")  # 1,024 pixels
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, 256  # over twice it: an error
    try:
        train.main(["--dataset", "folder", "--data-root", str(tmp_path / "imgs"),
                    "--image-size", "8", "--steps", "1", "--num-workers", "0",
                    "--out", str(tmp_path / "new")])
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def fake_npz(root, tmp_path, name="fake.npz", cut=False, **arrays):
    """metrics.py on a samples file: `arrays` saved as `name` (in a folder named with '='),
    optionally cut in half."""
    folder = tmp_path / "a=b"
    os.makedirs(folder)
    np.savez(folder / name, **arrays)
    if cut:
        size = os.path.getsize(folder / name)
        with open(folder / name, "r+b") as f:
            f.truncate(size // 2)
    np.savez(tmp_path / "real.npz", arr_0=NOISE)
    from support import features
    clf = features.Classifier(10, 8, 1)
    torch.save({"model": clf.state_dict(), "num_classes": 10, "image_size": 8, "channels": 1},
               tmp_path / "clf.pt")
    metrics.main(["--real", str(tmp_path / "real.npz"), "--fake", str(folder / name),
                  "--features", f"classifier:{tmp_path / 'clf.pt'}", "--metrics", "fid,acc",
                  "--out", str(tmp_path / "m")])


def export_on_a_full_disk(root, tmp_path):
    """The disk fills at the last file of an export: no half pipeline is left, and the same
    command then writes it whole."""
    write_json, out = system.write_json, str(tmp_path / "pipeline")

    def full(path, value):
        if path.endswith("model_index.json"):
            raise OSError(28, "No space left on device")
        write_json(path, value)
    system.write_json = full
    try:
        export.main([str(root / "run"), out])
    except SystemExit as e:
        assert os.listdir(tmp_path) == [], os.listdir(tmp_path)  # nothing half-written
        system.write_json = write_json
        export.main([str(root / "run"), out])
        assert os.path.exists(os.path.join(out, "model_index.json"))
        raise e
    finally:
        system.write_json = write_json


GREY = np.zeros((20, 8, 8, 1), np.uint8)
NOISE = np.random.default_rng(0).integers(0, 255, (20, 8, 8, 1), dtype=np.uint8)
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
SCHEDULER = "scheduler/scheduler_config.json"
ROWS = [  # (what it checks, call, 'error' or 'note', words)
    ("asymmetric-classes-not-indices",
     lambda r, t: train_run(r, t, "--eta", "0.1", "--corruption", "asymmetric",
                            "--corrupt-classes", "a,b"), "error", "comma-separated class"),
    ("ema-decay-above-1", lambda r, t: train_run(r, t, "--ema-decay", "1.5"), "error",
     "--ema-decay must be"),
    ("ema-decay-negative", lambda r, t: train_run(r, t, "--ema-decay", "-1"), "error",
     "--ema-decay must be"),
    ("resume-past-steps", resume_shorter, "error", "past --steps 2: nothing to do"),
    ("latents-and-vae-together", latents_and_vae, "error", "give one of the two"),
    ("ddim-eta-with-dpm",
     lambda r, t: sample_run(r, t, "--sampler", "dpm", "--ddim-eta", "0.5"), "error",
     "--ddim-eta applies to --sampler ddim"),
    ("newest-checkpoint-cut-short", unreadable_newest, "note", "using the previous checkpoint"),
    ("newest-checkpoint-not-torch", lambda r, t: unreadable_newest(r, t, junk=True), "note",
     "cannot be read .*using the previous checkpoint"),
    ("released-unet-config-lacks-a-key",
     lambda r, t: pipeline_with(r, t, "unet/config.json", drop_key), "error",
     "config.json lacks block_out_channels"),
    ("released-unet-config-cut", lambda r, t: pipeline_with(r, t, "unet/config.json", cut),
     "error", "config.json is not a readable JSON file"),
    ("released-unet-weights-cut", lambda r, t: pipeline_with(r, t, UNET_WEIGHTS, cut),
     "error", "diffusion_pytorch_model.safetensors cannot be read"),
    ("released-unet-weights-are-text",
     lambda r, t: pipeline_with(r, t, UNET_WEIGHTS, replace_with_text), "error",
     "cannot be read"),
    ("released-scheduler-v-prediction",
     lambda r, t: pipeline_with(r, t, SCHEDULER, scheduler_change(
         prediction_type="v_prediction")), "error", "v_prediction.*cannot be sampled here"),
    ("released-scheduler-10-betas",
     lambda r, t: pipeline_with(r, t, SCHEDULER, scheduler_change(
         trained_betas=lambda c: c["trained_betas"][:10])), "error", "10 trained_betas"),
    ("autoencoder-channels-differ", lambda r, t: vae_on(r, t, "--preset", "tiny-kl"), "error",
     "takes 3-channel images; digits has 1"),
    ("autoencoder-resume-without-checkpoint",
     lambda r, t: vae_on(r, t, "--preset", "small-kl", "--resume"), "error",
     "no autoencoder checkpoint"),
    ("captions-in-latin-1", lambda r, t: captions(r, t, "a.png\tcafé\n", "latin-1"), "error",
     "is not UTF-8"),
    ("captions-with-a-bom", lambda r, t: captions(r, t, "\ufeffa.png\ta dog\n", "utf-8"),
     "note", ""),
    ("an-empty-caption", lambda r, t: captions(r, t, "a.png\t\na.png\ta dog\n", "utf-8"),
     "note", "1 of the 2 captions .* are empty"),
    ("samples-with-5-channels",
     lambda r, t: metrics_on(r, t, np.zeros((20, 8, 8, 5), np.uint8)), "error",
     "has 5 channels"),
    ("samples-of-1x1", lambda r, t: metrics_on(r, t, np.zeros((20, 1, 1, 1), np.uint8)),
     "error", "under 4x4"),
    ("reference-that-does-not-vary", lambda r, t: metrics_on(r, t, NOISE, GREY), "note",
     "do not vary"),
    ("feature-cache-entry-cut", damaged_cache, "note", "cannot be read .*recomputing them"),
    ("learning-rate-1e6", lambda r, t: train_run(r, t, "--lr", "1e6", "--steps", "40"), "error",
     "(blew up|non-finite loss.*) in steps"),
    ("diverged-weights-saturate", saturating_model, "note", "sit at -1 or \\+1 .*train longer"),
    ("samples-and-reference-of-other-sizes",
     lambda r, t: metrics_on(r, t, NOISE, NOISE[:, :4, :4]), "note",
     "holds 8x8 images, the reference .* 4x4: both are resized"),
    ("two-sweeps-in-one-folder", two_sweeps, "error", "another sweep .* is running"),
    ("two-trainings-in-one-folder", train_beside_another, "error",
     "another train \\(pid \\d+\\) is running"),
    ("two-samplings-into-one-folder", sample_beside_another, "error",
     "another sample \\(pid \\d+\\) is running"),
    ("stale-temporary-of-a-killed-save", stale_temporary, "note", "left by a killed save"),
    ("latents-with-train-per-class",
     lambda r, t: train_run(r, t, "--latents", "cache", "--train-per-class", "2"), "error",
     "--train-per-class draws from"),
    ("latent-cache-with-fewer-labels", lambda r, t: cache_with_labels(r, t, [0, 1, 0]), "error",
     "3 conditions for 4 latents: it is damaged"),
    ("latent-cache-with-more-labels", lambda r, t: cache_with_labels(r, t, [0, 1, 0, 1, 0]),
     "error", "5 conditions for 4 latents"),
    ("a-caption-with-a-line-separator",
     lambda r, t: captions(r, t, "a.png\tline\u2028separated\na.png\tdog\n", "utf-8"),
     "note", ""),
    ("labels-beyond-the-classifiers-classes",
     lambda r, t: metrics_on(r, t, NOISE, labels=np.arange(20), metric="acc"), "error",
     "labels up to 19, the classifier .* knows 10 classes"),
    ("fewer-samples-than-is-splits", lambda r, t: metrics_on_inception(r, t), "error",
     "IS in 10 splits needs at least 10 images"),
    ("ckpt-pointing-at-config-json",
     lambda r, t: sample.main(["--ckpt", str(r / "run" / "config.json"), "--out", str(t / "s")]),
     "error", "config.json is not a PyTorch checkpoint"),
    ("ckpt-pointing-at-an-autoencoder",
     lambda r, t: sample.main(["--ckpt", small_autoencoder(t), "--out", str(t / "s")]),
     "error", "holds an autoencoder \\(vae.py\\), not a diffusion model"),
    ("out-is-a-file", lambda r, t: (open(t / "f", "w").close(),
                                    train.main([*TINY, "--steps", "1", "--out", str(t / "f")])),
     "error", "is a file, not a folder"),
    ("asymmetric-classes-beyond-the-classes",
     lambda r, t: train_run(r, t, "--eta", "0.1", "--corruption", "asymmetric",
                            "--corrupt-classes", "0,12"), "error",
     "^train.py: asymmetric corruption needs a subset .* got \\[0, 12\\]"),
    ("head-channels-that-do-not-divide", lambda r, t: train_run(r, t, "--head-channels", "7"),
     "error", "^train.py: channel width 32 is not a multiple of head_channels 7"),
    ("latent-cache-of-a-renamed-class", cache_of_a_renamed_class, "error",
     "holds a different cache \\(class names pear -> quince\\)"),
    ("lock-file-holding-garbage-or-a-live-pid",
     stale_lock_files, "note", "run .*new: "),
    ("latent-cache-on-a-full-disk", cache_on_a_full_disk, "error",
     "no room for .*latents.npy .*No space left on device"),
    ("latent-cache-of-a-foreign-shape", foreign_cache_shape, "error",
     "latents.npy holds an array of shape \\[4, 8, 8\\], not the \\[N, views, C, h, w\\]"),
    ("latent-cache-latents-cut-short", lambda r, t: cut_cache_file(r, t, "latents.npy", 200),
     "error", "latents.npy cannot be read .*encode it again"),
    ("latent-cache-meta-cut-short", lambda r, t: cut_cache_file(r, t, "meta.json", 50),
     "error", "meta.json cannot be read .*encode it again"),
    ("caption-cache-without-a-text-encoder", caption_cache_without_encoder, "error",
     "^train.py: captions need a text encoder: pass --text-encoder DIR"),
    ("an-image-over-the-decompression-bomb-limit", folder_with_a_bomb, "error",
     "cannot read image file .*big.png: .*decompression bomb"),
    ("samples-npz-cut-short", lambda r, t: fake_npz(r, t, cut=True, arr_0=NOISE), "error",
     "a=b/fake.npz cannot be read .*cut short"),
    ("samples-npz-without-arr-0", lambda r, t: fake_npz(r, t, images=NOISE), "error",
     "holds neither images \\(arr_0\\) nor FID statistics"),
    ("samples-with-fewer-labels", lambda r, t: fake_npz(r, t, arr_0=NOISE, labels=np.zeros(5)),
     "error", "labels must be 20 integer class indices"),
    ("samples-with-labels-as-strings",
     lambda r, t: fake_npz(r, t, arr_0=NOISE, labels=np.array(["0"] * 20)), "error",
     "labels must be 20 integer class indices, one per image; found <U1"),
    ("samples-in-a-folder-named-with-an-equals-sign",
     lambda r, t: fake_npz(r, t, arr_0=NOISE, labels=np.arange(20) % 10), "note", "fake\\s"),
    ("sample-between-the-two-renames-of-a-save", between_renames, "note",
     "ckpt.pt is missing; using the previous checkpoint"),
    ("checkpoint-with-a-tensor-of-the-wrong-shape", wrong_shape, "error",
     "ckpt.pt: its ema weights do not fit the model its config describes \\(size mismatch"),
    ("latent-cache-holding-nan", nan_latent, "error",
     "^train.py: cannot read latent 1 of .*: it holds NaN or inf"),
    ("emoji-font-without-colour-bitmaps",
     lambda r, t: emoji.main(["--font", os.path.join(os.path.dirname(matplotlib.__file__),
                                                     "mpl-data/fonts/ttf/DejaVuSans.ttf"),
                              "--out", str(t / "e")]),
     "error", "DejaVuSans.ttf has no colour bitmaps"),
    ("classifier-holding-a-pickled-payload", classifier_payload, "error",
     "^metrics.py: .*evil.pt is not a classifier of support/features.py \\(UnpicklingError"),
    ("export-on-a-full-disk", export_on_a_full_disk, "error", "No space left on device"),
]


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input(row, trained, tmp_path, capsys):
    _, call, outcome, words = row
    if outcome == "error":
        with pytest.raises(SystemExit, match=words):
            call(trained, tmp_path)
    else:
        call(trained, tmp_path)
        printed = capsys.readouterr()
        assert re.search(words, printed.out + printed.err), printed


def test_identical_statistics_give_an_fid_of_exactly_zero():  # a negative FID printed -8.7e-11
    x = np.random.default_rng(0).normal(size=(200, 16))
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    assert metrics.frechet_distance(mu, sigma, mu, sigma) == 0.0
    few = np.random.default_rng(1).normal(size=(20, 64))  # fewer images than dimensions
    mu, sigma = few.mean(0), np.cov(few, rowvar=False)
    assert metrics.frechet_distance(mu, sigma, mu, sigma) == 0.0  # printed -1.571e-09
    assert system.pid_alive(os.getpid()) and not system.pid_alive(999999999)
