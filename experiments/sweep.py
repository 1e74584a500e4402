"""Does slight corruption help? The paper's comparison (Sec. 3, 5) with paired seeds and statistics.

    python -m experiments.sweep                      # the CPU experiment: 8x8 digits, 2 cores
    python -m experiments.sweep --setting fmnist --workers 4    # Fashion-MNIST 32x32 (a GPU)
    python -m experiments.sweep --smoke              # the same code, tiny (CI, under a minute)
    python -m experiments.sweep --setting glyphs-latent --workers 2   # 128 classes (hours)

Design, fixed before the run. Primary: two contrasts against clean, FID at guidance 2, Holm over
the two: eta 5 % symmetric label flips (Sec. 3.1) - clean, and CEP-G with gamma 1 (Sec. 5.1,
Eq. 8) - clean; 7 paired seeds. Secondary, labelled so: every other metric and scale, and one
mechanism pair, CEP-G against clean with a 16-d class embedding (near the rank of 10 classes;
4 seeds). Further arms (eta 2.5 / 10 / 20, CEP-U, IP, gamma 0.3 and 3, CADS at sampling) run
only with --other-seeds N; with fewer than 4 seeds they are reported, never bolded.
Paired seeds: seed k fixes the initial weights, the data order, every t / noise / dropout draw, the
corruption (corruption seed = k) and the sampling noise, in every arm; CEP and IP draw after the
shared draws of a step, so switching them on changes nothing else.

The yardstick. One seeded, stratified, random split of the dataset's images, the same for every
seed and arm (split.npz): the training set (train.py --train-per-class, --split-seed 0); the rest,
per class in thirds: the feature classifier's images, the reference set every FID / KID is taken
against, and a held-out set from the same distribution that scores as a perfect model would (the
floor). No metric is taken against images its feature network was fit on. Metrics, in the
classifier's feature space: FID against the reference and against the training set, KID
(unbiased at any n), precision and recall (k = 3), the classifier's accuracy on the conditioning
label, top-1 % RMD (Eq. 38-40); in pixel space, the copy rate: each sample's distance to its
nearest training image over its distance to the nearest of an equal-size set of unseen images
(share under 1/3, and the mean ratio). Each run also records its class embedding: the norms, the
distance between classes and CEP's delta against it.
The many-class setting (--setting glyphs-latent, experiments/glyphs.py), designed to ask the
question where the paper says the effect lives, stated before its run: 128 CJK characters in 55
font designs, the latent pipeline above without flips, a 128-way feature classifier fit on
designs never scored against. The budget is fixed first, on the clean model of seed 0 alone
(ladder: 2K / 4K / 8K / 16K steps of 64, the first rung whose FID is at least 0.7x the previous
rung's, as the paper's 75K -> 150K; none by 16K: halve the classes once, --classes 64; none
by 16K there either: 16K, a clause added on 2026-12-07 while the 64-class ladder ran; unused).
Primary: FID at s = 2, eta 5 % symmetric flips - clean and CEP-G (gamma 1) - clean, 6 paired
seeds, Holm over the two.
Secondary: the positive control of Table 6, dropout 0.1 on the class embedding in training only
(3 seeds) - clean, top-1 % RMD, and each arm at its best guidance scale of s in {1, 1.5, 2, 3, 4}
on seeds 0 and 1. Reading: a null beside a control that moved says "regime reached, no effect";
a null beside a dead control says "regime still missed". The control moved if the 95 % t-interval
of its FID difference at s = 2 lies below zero (with 3 seeds no sign-flip p goes below 2/8; this
criterion added on 2026-12-07, before any control job ran).
Each (arm, seed) is one job. A finished job leaves its record, OUT/jobs/ARM-sSEED.json: its rows,
the settings that made them and the yardstick's fingerprint (a hash of its images, split and
trained networks). A job with a matching record is not run again, even with its run folder gone:
the records, with the yardstick's trained networks (OUT/classifier.pt, OUT/autoencoder), copied
to a fresh machine resume the sweep there. Without a record, a job reuses what is complete (the
checkpoint's own step, the samples' recorded settings), so a killed sweep resumes where it stopped.
"""
import argparse
import concurrent.futures
import csv
import hashlib
import json
import math
import multiprocessing
import os
import time
import types
import warnings
import zipfile

import numpy as np
import torch

import metrics
import sample
import train
from experiments import glyphs, latent, paired
from support import data, features, system

SETTINGS = {  # images seen = steps x batch; every arm of a setting gets the same budget
    "digits": dict(dataset="digits", data_root=None, image_size=None, train_per_class=30,
                   preset="digits", steps=1000, batch=64, lr=1e-3, samples={2.0: 200, 1.0: 100},
                   sample_steps=25, classifier_epochs=30),
    "fmnist": dict(dataset="fashion-mnist", data_root="/usr/share/datasets/fashion-mnist",
                   image_size=32, train_per_class=500, preset="fmnist", steps=12000, batch=128,
                   lr=2e-4, samples={2.0: 1000, 1.0: 500}, sample_steps=50, classifier_epochs=3),
    # the paper's LDM pipeline (experiments/latent.py): a KL-f4 autoencoder, 4x8x8 latents.
    # steps: the first of 1,000 / 2,000 / 4,000 / 8,000 at which the clean model (seed 0, read
    # alone, before any other arm trained that long) samples recognisably: class accuracy of 50
    # samples at s = 2 was 0.46 / 0.56 / 0.64 / 0.82, the rule 0.8 (reconstructions: 0.87)
    "fmnist-latent": dict(dataset="fashion-mnist", data_root="/usr/share/datasets/fashion-mnist",
                          image_size=None, train_per_class=100, preset="digits", steps=8000,
                          batch=64, lr=1e-3, samples={2.0: 100, 1.0: 100}, sample_steps=50,
                          classifier_epochs=3, reference_per_class=500, floor_per_class=100,
                          first_stage=dict(preset="small-kl", steps=2000, batch=16,
                                           eval_images=10000), seeds=8, mechanism_seeds=0,
                          flip=True),  # as committed: both flips cached, one drawn per sample
    # many classes (experiments/glyphs.py): 128 CJK characters, each in 55 font designs split
    # per class 24 train / 12 classifier / 12 reference / 7 floor; the same latent pipeline.
    # steps: set by the budget ladder on the clean model of seed 0 (ladder below)
    "glyphs-latent": dict(dataset="glyphs", data_root="runs/glyphs", image_size=None, classes=128,
                          train_per_class=24, fonts=dict(train=24, classifier=12, reference=12),
                          preset="digits", steps=None, ladder=(2000, 4000, 8000, 16000),
                          batch=64, lr=1e-3, samples={2.0: 10},
                          scan=dict(scales=(1.0, 1.5, 3.0, 4.0), seeds=2), sample_steps=50,
                          classifier_epochs=60, classifier_shift=2,
                          first_stage=dict(preset="small-kl", steps=2000, batch=16,
                                           eval_images=1000, accept=0.9),
                          seeds=6, mechanism_seeds=0, control_seeds=3),
}  # samples: per class, per guidance scale (scan: further scales on the first seeds)
SMOKE = dict(train_per_class=3, steps=4, batch=8, samples={2.0: 3, 1.0: 2}, sample_steps=3,
             classifier_epochs=1, classifier_max_steps=5, reference_per_class=3,
             floor_per_class=3)
SMOKE_FIRST_STAGE = dict(preset="small-kl", steps=2, batch=4, eval_images=8)
SMOKE_GLYPHS = dict(classes=6, fonts=dict(train=1, classifier=1, reference=1), train_per_class=1,
                    packages=("fonts-sawarabi-gothic", "fonts-sawarabi-mincho",
                              "fonts-motoya-l-cedar", "fonts-misaki"),
                    ladder=(2, 4), samples={2.0: 2}, scan=dict(scales=(1.0,), seeds=1))
GAMMA_1 = ["--gamma", "1"]
PRIMARY = {"clean": [], "eta5": ["--eta", "0.05"], "cep-g": ["--cep", "gaussian", *GAMMA_1]}
CONTRASTS = ("eta5", "cep-g")  # each - clean, FID at s = 2, Holm over the two
MECHANISM = {"clean-d16": ["--context-dim", "16"],
             "cep-g-d16": ["--context-dim", "16", "--cep", "gaussian", *GAMMA_1]}
OTHER = {**{f"eta{e:g}": ["--eta", str(e / 100)] for e in (2.5, 10, 20)},
         "cep-u": ["--cep", "uniform", *GAMMA_1], "ip": ["--input-perturbation", "0.1"],
         "cep-g-g0.3": ["--cep", "gaussian", "--gamma", "0.3"],
         "cep-g-g3": ["--cep", "gaussian", "--gamma", "3"], "cads": []}
CONTROL = {"emb-drop": ["--embedding-dropout", "0.1"]}  # Table 6: helps the paper's IN-1K model
ARMS = {**PRIMARY, **MECHANISM, **CONTROL, **OTHER}
BASELINE = {"clean-d16": None, "cep-g-d16": "clean-d16", "clean": None}  # others: clean
CADS = ["--cads", "--cads-tau", "0.6,0.9", "--cads-scale", "0.25"]  # Sadat et al.'s defaults
METRICS = ("fid", "kid", "fid_floor_n", "fid_train", "precision", "recall", "class_acc", "rmd_top1",
           "copy_share", "copy_ratio", "nn_train")
EMBEDDING = ("emb_norm", "emb_dist", "delta_rms", "delta_over_dist")
MIN_SEEDS_TO_BOLD = 4  # intervals from fewer seeds are printed, never marked
GRID_SEED = 0  # the seed whose samples the grids show
GRID_PER_CLASS, GRID_CLASSES = 10, 16  # a grid: 10 samples of each of the first 16 classes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=system.HelpFormatter)
    p.add_argument("--setting", default="digits", choices=SETTINGS,
                   help="digits: 8x8 pixels, CPU-sized (default); fmnist: 32x32, GPU-sized")
    p.add_argument("--out", default=None,
                   help="sweep directory, resumable (default runs/sweep-SETTING, with --smoke "
                        "runs/sweep-SETTING-smoke)")
    p.add_argument("--seeds", type=int, default=None,
                   help="paired seeds of clean, eta 5 %% and CEP-G (default 7; fmnist-latent 8)")
    p.add_argument("--mechanism-seeds", type=int, default=None,
                   help="paired seeds of the 16-d embedding pair (0: not run; default 4, "
                        "fmnist-latent 0)")
    p.add_argument("--control-seeds", type=int, default=None,
                   help="seeds of the positive control, dropout 0.1 on the class embedding "
                        "(Table 6; default: the setting's, 0 but glyphs-latent 3)")
    p.add_argument("--other-seeds", type=int, default=0,
                   help="seeds of every further arm (0: not run, reported as not measured)")
    p.add_argument("--classes", type=int, default=None,
                   help="glyphs-latent: characters (default 128; 64 when the budget ladder does "
                        "not settle by its last rung)")
    p.add_argument("--workers", type=int, default=2, help="jobs at once, one thread each")
    p.add_argument("--floors-only", action="store_true",
                   help="build the yardstick (split, classifier, autoencoder, reference) and score "
                        "the floor rows only: OUT/floors.md; no diffusion model is trained")
    p.add_argument("--smoke", action="store_true", help="the same code, tiny (CI)")
    args = p.parse_args(argv)
    setting = SETTINGS[args.setting]
    args.seeds = setting.get("seeds", 7) if args.seeds is None else args.seeds
    if args.mechanism_seeds is None:
        args.mechanism_seeds = setting.get("mechanism_seeds", 4)
    if args.control_seeds is None:
        args.control_seeds = setting.get("control_seeds", 0)
    extra = (args.mechanism_seeds, args.control_seeds, args.other_seeds)
    if args.seeds < 2 or min(extra) < 0 or args.workers < 1:
        raise SystemExit("--seeds must be >= 2, --mechanism-seeds, --control-seeds and "
                         "--other-seeds >= 0, --workers >= 1")
    if args.classes is not None and setting["dataset"] != "glyphs":
        raise SystemExit("--classes applies to --setting glyphs-latent")
    name = args.setting + (f"-{args.classes}" if args.classes else "")
    args.out = args.out or f"runs/sweep-{name}" + ("-smoke" if args.smoke else "")
    return args


# ----------------------------------------------------------------------------- the yardstick

def split(size):
    """The fixed split: images uint8 NCHW and labels of the dataset's train and test splits
    together, and the indices of each part (train = train.py's --train-per-class draw)."""
    if size["dataset"] == "glyphs":
        return glyphs.split(size)
    if "first_stage" in size:
        return latent.split(size)
    full = data.load_dataset(size["dataset"], size["data_root"], "train", size["image_size"])
    test = data.load_dataset(size["dataset"], size["data_root"], "test", size["image_size"])
    images = torch.cat([full.images, test.images])
    labels = np.concatenate([full.labels, test.labels])
    parts = {"train": data.per_class_indices(full.labels, size["train_per_class"], seed=0)}
    rest = np.setdiff1d(np.arange(len(labels)), parts["train"])
    rng = np.random.default_rng(1)  # the thirds of the rest, per class
    thirds = [np.array_split(rng.permutation(rest[labels[rest] == c]), 3)
              for c in range(full.num_classes)]
    for k, name in enumerate(("classifier", "reference", "floor")):
        parts[name] = np.sort(np.concatenate([t[k] for t in thirds]))
    n_copy = size["train_per_class"]  # the unseen images of the copy rate: as many as train
    parts["unseen"] = np.sort(np.concatenate(
        [rng.choice(t[0], n_copy, replace=False) for t in thirds]))  # classifier images
    return images, labels, parts


def reference(out, size):
    """Split, feature classifier, reference features and the floor rows, made once. The latent
    setting also trains its autoencoder, caches the training latents and scores against
    reconstructions (experiments/latent.py)."""
    path = os.path.join(out, "reference.npz")
    if os.path.exists(path):
        return dict(np.load(path))
    images, labels, parts = split(size)
    system.write_atomic(os.path.join(out, "split.npz"), lambda tmp: np.savez(tmp, **parts))
    clf, accuracy = feature_classifier(out, size, images, labels, parts)
    scored = {k: images[torch.from_numpy(v)] for k, v in parts.items() if k != "classifier"}
    ref = {"classifier_accuracy": accuracy}
    networks = [clf]
    if "first_stage" in size:  # the paper's pipeline: the first stage on both sides
        train_images, train_labels = scored["train"], labels[parts["train"]]
        autoencoder = latent.first_stage(out, size, train_images, train_labels)
        latent.cache_training_set(autoencoder, train_images, train_labels, size, out)
        scored = {k: latent.reconstruct(autoencoder, v) for k, v in scored.items()}
        ref["reconstruction_accuracy"] = accept_first_stage(clf, scored["floor"],
                                                            labels[parts["floor"]], accuracy, size)
        networks.append(autoencoder)
    ref["fingerprint"] = fingerprint(images, parts, networks)
    ref.update({f"{k}_images": nhwc(v) for k, v in scored.items()})
    ref.update({f"{k}_labels": labels[v] for k, v in parts.items()})
    for k in ("reference", "train"):
        ref[f"{k}_features"] = classifier_features(clf, ref[f"{k}_images"])
    ref["between_class_variance"] = between_class_share(ref["reference_features"],
                                                        ref["reference_labels"])
    system.write_atomic(path, lambda tmp: np.savez(tmp, **ref))
    return ref


def feature_classifier(out, size, images, labels, parts):
    """(The feature classifier, its accuracy on the floor set): OUT/classifier.pt where it is
    already there (a yardstick carried to another machine), else fit on the classifier part."""
    path = os.path.join(out, "classifier.pt")
    floor = torch.from_numpy(parts["floor"])
    if os.path.exists(path):
        clf = features.load_classifier(path)
        with torch.no_grad():
            accuracy = float((clf.predict(images[floor]).numpy() == labels[floor]).mean())
        return clf, accuracy
    names = [str(c) for c in range(int(labels.max()) + 1)]
    fit = data.InMemoryDataset(images[torch.from_numpy(parts["classifier"])],
                               labels[parts["classifier"]], names)
    check = data.InMemoryDataset(images[floor], labels[floor], names)
    opts = types.SimpleNamespace(epochs=size["classifier_epochs"], lr=1e-3, batch_size=128,
                                 max_steps=size.get("classifier_max_steps"), seed=0)
    if size.get("classifier_shift"):
        fit = glyphs.Shifted(fit, size["classifier_shift"])
    clf, accuracy = features.fit_classifier(fit, check, len(names), opts)
    features.save_classifier(path, clf, accuracy, size["dataset"])
    return clf, accuracy


def fingerprint(images, parts, networks):
    """A hash of what the yardstick is made of: the images, the split and the weights of its
    trained networks (the classifier; the autoencoder of the latent settings)."""
    digest = hashlib.sha256(images.numpy().tobytes())
    for name in sorted(parts):
        digest.update(parts[name].tobytes())
    for network in networks:
        for tensor in network.state_dict().values():
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def accept_first_stage(clf, reconstructed, labels, real_accuracy, size):
    """The classifier's accuracy on the reconstructed floor set; a setting with
    first_stage["accept"] stops when it is under that fraction of the real images'."""
    with torch.no_grad():
        accuracy = float((clf.predict(reconstructed).numpy() == labels).mean())
    floor = size["first_stage"].get("accept")
    print(f"[sweep] classifier accuracy on the floor set: real {real_accuracy:.3f}, "
          f"reconstructed {accuracy:.3f}", flush=True)
    if floor is not None and accuracy < floor * real_accuracy:
        raise SystemExit(f"the autoencoder's reconstructions are named {accuracy:.3f} of the "
                         f"time, under {floor:g}x the real glyphs' {real_accuracy:.3f}: train it "
                         "longer (first_stage steps) before any diffusion model")
    return accuracy


def between_class_share(features_, labels):
    """The share of the features' total variance that lies between the class means."""
    mean = features_.mean(0)
    total = ((features_ - mean) ** 2).sum()
    between = sum((labels == k).sum() * ((features_[labels == k].mean(0) - mean) ** 2).sum()
                  for k in np.unique(labels))
    return float(between / total)


def nhwc(images):
    return images.permute(0, 2, 3, 1).numpy()


def classifier_features(clf, images, batch=500):
    """Penultimate-layer features of the domain classifier, float64 [N, 128]."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        parts = [clf.embed(x[i:i + batch])["features"] for i in range(0, len(x), batch)]
    return torch.cat(parts).double().numpy()


def nn_distance(images, others):
    """Per-pixel RMS distance of each image to its nearest image of `others` (pixels in [0, 1])."""
    a = torch.from_numpy(images.reshape(len(images), -1)).double() / 255
    b = torch.from_numpy(others.reshape(len(others), -1)).double() / 255
    return (torch.cdist(a, b).min(1).values / math.sqrt(a.shape[1])).numpy()


def fid(a, b):
    return metrics.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0),
                                    np.cov(b, rowvar=False))


def evaluate(images, labels, ref, clf):
    """Every metric of one image set (uint8 NHWC, its conditioning labels) on the yardstick."""
    warnings.filterwarnings("ignore", message="Matrix is singular")  # dead ReLU features
    feats, real = classifier_features(clf, images), ref["reference_features"]
    with torch.no_grad():
        predicted = clf.predict(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    to_train = nn_distance(images, ref["train_images"])
    ratio = to_train / np.maximum(nn_distance(images, ref["unseen_images"]), 1e-12)
    pr = metrics.precision_recall(real, feats, k=3)
    same_n = floor_sized(labels, ref["floor_labels"])  # FID's bias depends on n
    return {"fid": fid(feats, real), "kid": metrics.kernel_inception_distance(real, feats),
            "fid_floor_n": fid(feats[same_n], real),
            "fid_train": fid(feats, ref["train_features"]),
            "precision": pr["precision"], "recall": pr["recall"],
            "class_acc": float((predicted == labels).mean()),
            "rmd_top1": metrics.top_fraction_mean(metrics.rmd_scores(feats, labels), 0.01),
            "copy_share": float((ratio < 1 / 3).mean()), "copy_ratio": float(ratio.mean()),
            "nn_train": float(to_train.mean()), "n": len(images)}


def floor_sized(labels, floor_labels):
    """Indices of a subset with the floor set's class counts (each class's first samples): its
    FID has the floor row's n, so the two compare without the estimator's bias in n."""
    wanted = np.bincount(floor_labels, minlength=labels.max() + 1)
    return np.concatenate([np.flatnonzero(labels == c)[:k] for c, k in enumerate(wanted)])


def floor_rows(ref, clf, latent_setting=False, flip=False):
    """What 'perfect model' and 'copies its training set' score on the same yardstick (the
    latent setting: their reconstructions, what a perfect latent model would decode). A setting
    that trains on flipped images adds what a perfect model of *that* data scores: the held-out
    set with a seeded half of its images mirrored."""
    kind = " (reconstructed)" if latent_setting else ""
    rows = [{"arm": name + kind, **evaluate(ref[f"{part}_images"], ref[f"{part}_labels"], ref,
                                            clf)}
            for name, part in (("real held-out", "floor"), ("training set", "train"))]
    if flip:
        images = ref["floor_images"].copy()  # [N, H, W, C]
        half = np.random.default_rng(0).permutation(len(images))[:len(images) // 2]
        images[half] = images[half, :, ::-1]
        rows.append({"arm": "real held-out, half mirrored" + kind,
                     **evaluate(images, ref["floor_labels"], ref, clf)})
    return rows


def embedding_diagnostics(run_dir):
    """The EMA class embedding of a run: mean row norm, mean distance between classes, and CEP's
    delta (root mean square norm: gamma for CEP-G, gamma / sqrt(3) for CEP-U) against it."""
    ckpt = torch.load(os.path.join(run_dir, "ckpt.pt"), map_location="cpu", weights_only=True)
    table = ckpt["ema"]["embedder.embedding.weight"][:-1].double()  # without the null row
    dist = torch.pdist(table).mean().item()
    cep = ckpt["config"]["cep"]
    gamma = ckpt["config"]["gamma"] if cep != "none" else 0.0
    delta = gamma / math.sqrt(3) if cep == "uniform" else gamma
    return {"emb_norm": table.norm(dim=1).mean().item(), "emb_dist": dist,
            "delta_rms": delta, "delta_over_dist": delta / dist}


# ----------------------------------------------------------------------------- one job

def train_flags(arm_flags, seed, size, run_dir):
    if "first_stage" in size:  # the cache holds exactly the training set
        data = ["--latents", os.path.join(os.path.dirname(run_dir), "latents")]
    else:
        data = ["--dataset", size["dataset"], "--train-per-class", str(size["train_per_class"]),
                "--split-seed", "0"]
        data += ["--data-root", size["data_root"]] if size["data_root"] else []
        data += ["--image-size", str(size["image_size"])] if size["image_size"] else []
    return [*data, "--preset", size["preset"],
            "--steps", str(size["steps"]), "--batch-size", str(size["batch"]),
            "--lr", str(size["lr"]), "--ema-decay", "0.999",
            "--seed", str(seed), "--corruption-seed", str(seed),
            "--ckpt-every", str(max(1, size["steps"] // 4)),
            "--log-every", str(max(1, size["steps"] // 20)),
            "--num-workers", "0", "--threads", "1", "--out", run_dir,
            *(["--flip"] if size.get("flip") else []), *arm_flags]


def checkpoint_step(run_dir):
    path = os.path.join(run_dir, "ckpt.pt")
    if not os.path.exists(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=True)["step"]


def scales_of(size, seed):
    """{guidance scale: samples per class} of a seed: every seed's scales, and on the first
    scan["seeds"] seeds the scan's further scales (as many samples as at s = 2)."""
    scan = size.get("scan")
    extra = scan["scales"] if scan and seed < scan["seeds"] else ()
    return {**size["samples"], **{s: size["samples"][2.0] for s in extra}}


def samples_done(out, size, cads, seed):
    """Every scale's npz exists, is complete (written atomically) and has this sweep's settings,
    size and model (the checkpoint step it was sampled from)."""
    for scale, per_class in scales_of(size, seed).items():
        path = os.path.join(out, f"s{scale:g}", "samples.npz")
        if not os.path.exists(path):
            return False
        try:
            with np.load(path) as f:
                same = (str(f["sampler"]) == f"dpm:{size['sample_steps']}"
                        and "ckpt_step" in f.files and int(f["ckpt_step"]) == size["steps"]
                        and (str(f["cads"]) != "off") == cads
                        and not ("clip_denoised" in f.files and bool(f["clip_denoised"]))
                        and np.bincount(f["labels"]).min() == per_class)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # cut short or foreign: redo
            return False
        if not same:
            return False
    return True


def draw(run_dir, samples, scale, per_class, size, seed, cads=False):
    """sample.py on a run: SAMPLES/s{scale}/samples.npz, the sweep's sampler and seed."""
    sample.main(["--ckpt", run_dir, "--out", samples, "--per-class", str(per_class),
                 "--guidance", f"{scale:g}", "--sampler", "dpm",
                 "--steps", str(size["sample_steps"]), "--batch-size", "250",
                 "--no-images", "--seed", str(seed), "--threads", "1",
                 "--no-clip-denoised",  # as the committed results were sampled
                 *(CADS if cads else [])])


def job_dir(arm, seed, out):
    """A job's run folder (CADS samples the clean model of the same seed)."""
    return os.path.join(out, f"{'clean' if arm == 'cads' else arm}-s{seed}")


def run_job(job):
    """Train (or resume), sample every scale, evaluate: one (arm, seed), unless its record
    matches. CADS samples the clean model of the same seed."""
    torch.set_num_threads(1)  # the evaluation; train and sample get --threads 1
    arm, seed, size, out = job
    ref = dict(np.load(os.path.join(out, "reference.npz")))
    key = record_key(arm, seed, size, ref)
    rows = recorded_rows(record_path(arm, seed, out), key)
    if rows is not None:
        return rows
    started = time.time()
    run_dir = job_dir(arm, seed, out)
    step = checkpoint_step(run_dir)
    if step != size["steps"]:
        if step is not None and step > size["steps"]:
            raise SystemExit(f"{run_dir} was trained for {step} steps, more than {size['steps']}")
        resume = ["--resume"] if step is not None else []
        train.main(train_flags(ARMS[arm], seed, size, run_dir) + resume)
    samples = os.path.join(run_dir, "samples-cads" if arm == "cads" else "samples")
    if not samples_done(samples, size, arm == "cads", seed):
        for scale, per_class in scales_of(size, seed).items():
            draw(run_dir, samples, scale, per_class, size, seed, arm == "cads")
    clf = features.load_classifier(os.path.join(out, "classifier.pt"))
    emb = embedding_diagnostics(run_dir)
    rows = []
    for scale in scales_of(size, seed):
        with np.load(os.path.join(samples, f"s{scale:g}", "samples.npz")) as f:
            row = evaluate(f["arr_0"], f["labels"], ref, clf)
        rows.append({"arm": arm, "seed": seed, "scale": scale, **row, **emb,
                     "minutes": (time.time() - started) / 60})
    os.makedirs(os.path.join(out, "jobs"), exist_ok=True)
    if seed == GRID_SEED:
        save_grid(os.path.join(samples, "s2", "samples.npz"), grid_path(arm, out))
    system.write_json(record_path(arm, seed, out), {"key": key, "rows": rows})
    return rows


# ----------------------------------------------------------------------------- job records

def record_key(arm, seed, size, ref):
    """What a job's rows depend on (as JSON reads it back)."""
    return {"arm": arm, "seed": seed, "flags": ARMS[arm], "steps": size["steps"],
            "batch": size["batch"], "lr": size["lr"], "flip": bool(size.get("flip")),
            "sample_steps": size["sample_steps"],
            "samples": {f"{s:g}": n for s, n in scales_of(size, seed).items()},
            "yardstick": str(ref["fingerprint"])}


def record_path(arm, seed, out):
    return os.path.join(out, "jobs", f"{arm}-s{seed}.json")


def recorded_rows(path, key):
    """The rows of a finished job's record, or None if there is none or it was made otherwise."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):  # none yet, or not a record: run the job
        return None
    return record["rows"] if record.get("key") == key else None


def grid_path(arm, out):
    return os.path.join(out, "jobs", f"{arm}-s{GRID_SEED}-grid.npz")


def save_grid(samples_path, path):
    """The samples a grid shows (at s = 2), kept beside the job's record."""
    with np.load(samples_path) as f:
        images, labels = f["arr_0"], f["labels"]
    keep = np.concatenate([np.flatnonzero(labels == c)[:GRID_PER_CLASS]
                           for c in np.unique(labels)[:GRID_CLASSES]])
    system.write_atomic(path, lambda tmp: np.savez_compressed(tmp, images=images[keep],
                                                              labels=labels[keep]))


# ----------------------------------------------------------------------------- the budget ladder

def ladder(out, size):
    """The training budget, fixed on the clean model of seed 0 alone before any other arm
    trains: train it through size["ladder"]'s rungs (resuming one run), score each rung as a job
    is scored at s = 2, and stop at the first rung whose FID is at least 0.7x the previous one's:
    the last doubling improved FID by at most 30 %, as the paper's 75K -> 150K (App. C, Table 5).
    Returns (that rung or None, the rows); OUT/ladder.json keeps the rows."""
    path, run_dir = os.path.join(out, "ladder.json"), os.path.join(out, "ladder-clean-s0")
    rows = json.load(open(path)) if os.path.exists(path) else []
    ref = dict(np.load(os.path.join(out, "reference.npz")))
    clf = features.load_classifier(os.path.join(out, "classifier.pt"))
    for rung in size["ladder"]:
        if budget_rule(rows) is not None:
            break
        if rung in [r["steps"] for r in rows]:
            continue
        resume = ["--resume"] if checkpoint_step(run_dir) is not None else []
        train.main(train_flags(PRIMARY["clean"], 0, {**size, "steps": rung}, run_dir) + resume)
        samples = os.path.join(run_dir, f"samples-{rung}")
        draw(run_dir, samples, 2.0, size["samples"][2.0], size, seed=0)
        with np.load(os.path.join(samples, "s2", "samples.npz")) as f:
            rows.append({"steps": rung, **evaluate(f["arr_0"], f["labels"], ref, clf)})
        system.write_json(path, rows)
        print(f"[sweep] ladder: {rung} steps, FID {rows[-1]['fid']:.3f}, copy share "
              f"{rows[-1]['copy_share']:.3f}", flush=True)
    return budget_rule(rows), rows


def budget_rule(rows, gain=0.3):
    """The first rung whose FID is at least (1 - gain) x the previous rung's, or None."""
    for previous, current in zip(rows, rows[1:]):
        if current["fid"] >= (1 - gain) * previous["fid"]:
            return current["steps"]
    return None


def ladder_table(rows, budget):
    keys = ("fid", "fid_train", "kid", "class_acc", "copy_share", "copy_ratio", "nn_train")
    lines = [f"**Budget ladder** (clean, seed 0, s = 2; the budget: the first rung whose FID is "
             f"at least 0.7x the previous rung's: {budget or 'not reached'})", "",
             "| steps | FID / previous | " + " | ".join(keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for previous, r in zip([None] + rows, rows):
        ratio = f"{r['fid'] / previous['fid']:.3f}" if previous else ""
        lines.append(f"| {r['steps']} | {ratio} | " + " | ".join(f"{r[k]:.4g}" for k in keys)
                     + " |")
    return lines


# ----------------------------------------------------------------------------- statistics

def summarise(rows):
    """Per (arm, scale, metric): mean, seed-to-seed std, and the paired comparison with the
    arm's baseline (clean; the 16-d CEP arm: the 16-d clean arm); Holm over the primary two."""
    by = {}
    for r in rows:
        by.setdefault((r["arm"], r["scale"]), {})[r["seed"]] = r
    out = []
    for (arm, scale), seeds in sorted(by.items(), key=lambda kv: (arm_order(kv[0][0]), kv[0][1])):
        base_arm = BASELINE.get(arm, "clean")
        base = by.get((base_arm, scale), {})
        shared = sorted(set(seeds) & set(base))
        for m in METRICS + EMBEDDING:
            values = [seeds[s][m] for s in sorted(seeds)]
            row = dict(arm=arm, scale=scale, metric=m, seeds=len(values), baseline=base_arm,
                       mean=float(np.mean(values)),
                       std=float(np.std(values, ddof=1)) if len(values) > 1 else math.nan)
            if base_arm is not None and m in METRICS:
                row.update(paired.paired_stats([seeds[s][m] for s in shared],
                                        [base[s][m] for s in shared]))
            out.append(row)
    primary = [r for r in out if r["arm"] in CONTRASTS and r["scale"] == 2.0
               and r["metric"] == "fid" and r.get("n", 0) >= 2]
    for r, p in zip(primary, paired.holm([r["p"] for r in primary])):
        r["p_holm"] = p
    return out


def arm_order(arm):
    names = list(ARMS)
    return (names.index(arm) if arm in names else len(names), arm)


# ----------------------------------------------------------------------------- report

def write_report(rows, summary, floors, out, ref, meta, extra=()):
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, ["arm", "seed", "scale", *METRICS, "n", *EMBEDDING, "minutes"])
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(out, "summary.csv"), "w", newline="") as f:
        keys = ["arm", "scale", "metric", "seeds", "baseline", "mean", "std",
                "n", "diff", "lo", "hi", "p", "p_holm", "mde"]
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows({k: r.get(k, "") for k in keys} for r in summary)
    sizes = ", ".join(f"{k} {len(ref[f'{k}_labels'])}" for k in
                      ("train", "classifier", "reference", "floor", "unseen"))
    lines = [f"Split (images): {sizes}. Classifier accuracy on the floor set "
             f"{float(ref['classifier_accuracy']):.3f}; {meta}.", "",
             *primary_table(summary), "", *floor_table(floors), "", *extra]
    for m in METRICS + EMBEDDING:
        lines += metric_table(summary, m) + [""]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines))
    return "\n".join(lines)


def best_scales(rows, size):
    """Each arm at its best guidance scale: the scale of lowest mean FID over the scan's seeds
    (every scale sampled on those seeds only), a secondary result."""
    seeds = size["scan"]["seeds"]
    lines = [f"**Best guidance scale** (secondary; mean FID over seeds 0-{seeds - 1}, scales "
             + ", ".join(f"{s:g}" for s in sorted(scales_of(size, 0))) + ")", "",
             "| arm | best s | FID there | FID at s = 2 |", "|---|---|---|---|"]
    for arm in sorted({r["arm"] for r in rows}, key=arm_order):
        mine = [r for r in rows if r["arm"] == arm and r["seed"] < seeds]
        means = {s: np.mean([r["fid"] for r in mine if r["scale"] == s])
                 for s in {r["scale"] for r in mine}}
        if len(means) > 1:
            best = min(means, key=means.get)
            lines.append(f"| {arm} | {best:g} | {means[best]:.3f} | {means[2.0]:.3f} |")
    return lines


def primary_table(summary):
    rows = [r for r in summary if "p_holm" in r]
    lines = ["**Primary contrasts** (FID at s=2, arm - clean, paired seeds; Holm over the two)", "",
             "| contrast | seeds | difference [95 % CI] | sign-flip p | Holm p | detectable |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} - clean | {r['n']} | {r['diff']:+.3f} [{r['lo']:+.3f}, "
                     f"{r['hi']:+.3f}] | {r['p']:.4f} | {r['p_holm']:.4f} | {r['mde']:.3f} |")
    return lines


def floor_table(floors):
    keys = ("fid", "kid", "fid_floor_n", "fid_train", "precision", "recall", "class_acc",
            "copy_share", "copy_ratio", "n")
    lines = ["**Floor rows** (real images on the same yardstick)", "",
             "| images | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for r in floors:
        lines.append(f"| {r['arm']} | " + " | ".join(f"{r[k]:.4g}" for k in keys) + " |")
    return lines


def metric_table(summary, metric):
    """One Markdown table: rows = arms, columns = scales; mean ± std, then diff [CI] p vs the
    baseline (bold only when the interval excludes 0 with >= MIN_SEEDS_TO_BOLD seeds)."""
    mine = [r for r in summary if r["metric"] == metric]
    scales = sorted({r["scale"] for r in mine})
    lines = [f"**{metric}** (mean ± seed std; arm - baseline: mean difference [95 % CI], "
             "sign-flip p, smallest detectable difference)", "",
             "| arm | seeds | " + " | ".join(f"s={s:g}" for s in scales) + " |",
             "|---|---|" + "---|" * len(scales)]
    most_seeds = {}
    for r in mine:
        most_seeds[r["arm"]] = max(most_seeds.get(r["arm"], 0), r["seeds"])
    for arm in sorted(most_seeds, key=arm_order):
        cells = []
        for s in scales:
            r = next((r for r in mine if r["arm"] == arm and r["scale"] == s), None)
            if r is None:
                cells.append("")
                continue
            cell = f"{r['mean']:.4g} ± {r['std']:.2g}"
            if r["seeds"] < most_seeds[arm]:  # a scale sampled on fewer seeds says so
                cell += f" ({r['seeds']} seeds)"
            if r.get("n", 0) >= 2:
                sure = r["n"] >= MIN_SEEDS_TO_BOLD and (r["lo"] > 0 or r["hi"] < 0)
                mark = "**" if sure else ""
                cell += (f"<br>{mark}{r['diff']:+.4g} [{r['lo']:+.3g}, {r['hi']:+.3g}]{mark} "
                         f"p={r['p']:.3f} mde={r['mde']:.3g}")
            cells.append(cell)
        lines.append(f"| {arm} | {most_seeds[arm]} | " + " | ".join(cells) + " |")
    return lines


def plot(rows, summary, floors, out):
    """FID and KID per seed (paired lines) with the floor rows; the paired differences."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    arms = sorted({r["arm"] for r in rows}, key=arm_order)
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.8))
    for k, metric in enumerate(("fid", "kid")):
        for seed in sorted({r["seed"] for r in rows}):
            pts = [(i, r[metric]) for i, a in enumerate(arms) for r in rows
                   if r["arm"] == a and r["seed"] == seed and r["scale"] == 2.0]
            ax[k].plot(*zip(*pts), "o-", color="grey", alpha=0.5, lw=0.8)
        for f, style in zip(floors, ("--", ":")):
            ax[k].axhline(f[metric], ls=style, color="k", label=f"{f['arm']} (n={f['n']})")
        ax[k].set(xticks=range(len(arms)), ylabel=f"{metric.upper()} against the reference set",
                  title=f"{metric.upper()} at s=2, one line per seed")
        ax[k].set_xticklabels(arms, rotation=30)
        ax[k].legend(fontsize=7)
    # 2 seeds give intervals 12.7 standard errors wide (t, 1 d.f.): they would hide the rest
    diffs = [r for r in summary if r["metric"] == "fid" and r.get("n", 0) >= 3]
    labels = [f"{r['arm']} - {r['baseline']} s={r['scale']:g} ({r['n']} seeds)" for r in diffs]
    y = np.arange(len(diffs))
    xerr = [[r["diff"] - r["lo"] for r in diffs], [r["hi"] - r["diff"] for r in diffs]]
    ax[2].errorbar([r["diff"] for r in diffs], y, xerr=xerr, fmt="o", capsize=3)
    ax[2].axvline(0, color="k", lw=0.8)
    ax[2].set(yticks=y, xlabel="FID difference, paired, 95 % CI (left = better)",
              title="paired differences against the baseline")
    ax[2].set_yticklabels(labels, fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "sweep.png"), dpi=110)
    plt.close(fig)


def plot_ladder(rows, floors, budget, out):
    """ladder.png: clean FID (against the reference and the training set) and the copy share by
    training steps, with the floor rows."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [r["steps"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    ax[0].plot(steps, [r["fid"] for r in rows], "o-", label="FID against the reference")
    ax[0].plot(steps, [r["fid_train"] for r in rows], "s--", label="FID against the training set")
    for f, style in zip(floors, (":", "-.", "--")):
        ax[0].axhline(f["fid"], ls=style, color="k", lw=0.8, label=f["arm"])
    ax[1].plot(steps, [r["copy_share"] for r in rows], "o-")
    for a, label in zip(ax, ("FID", "share of samples nearer a training image (ratio < 1/3)")):
        a.set(xscale="log", xticks=steps, xlabel="training steps (batch 64)", ylabel=label)
        a.set_xticklabels([f"{s:,}" for s in steps])
        if budget:
            a.axvline(budget, color="C3", lw=0.8)
    ax[0].legend(fontsize=7)
    fig.suptitle("budget ladder: clean, seed 0, s = 2")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "ladder.png"), dpi=110)
    plt.close(fig)


def plot_grids(out):
    """grids_s0_s2.png: the first samples of the first classes from every primary arm and the
    control of seed GRID_SEED at s = 2 (as save_grid kept them), side by side; sample i starts
    from the same noise in every arm, so the cells pair up."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    arms = [a for a in (*PRIMARY, *CONTROL) if os.path.exists(grid_path(a, out))]
    if not arms:  # records copied without their grids: nothing to draw
        return
    fig, ax = plt.subplots(1, len(arms), figsize=(6 * len(arms), 6.2), squeeze=False)
    for a, arm in zip(ax[0], arms):
        with np.load(grid_path(arm, out)) as f:
            images, labels = f["images"], f["labels"]
        classes = np.unique(labels)
        rows = [np.concatenate(list(images[labels == c]), axis=1)  # [H, cols*W, C]
                for c in classes]
        grid = np.concatenate(rows)  # [classes*H, cols*W, C]
        a.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255)
        h = images.shape[1]
        a.set(xticks=[], yticks=h * np.arange(len(classes)) + h / 2, yticklabels=classes,
              title=f"{arm}, seed {GRID_SEED}, s = 2")
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"grids_s{GRID_SEED}_s2.png"), dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- driver

def steps_left(job, ref):
    """Training steps a job has still to run (a CADS job samples the trained clean model; a job
    with a matching record runs nothing)."""
    arm, seed, size, out = job
    key = record_key(arm, seed, size, ref)
    if arm == "cads" or recorded_rows(record_path(arm, seed, out), key) is not None:
        return 0
    return size["steps"] - (checkpoint_step(job_dir(arm, seed, out)) or 0)


def run_all(jobs, ref, args, t_start):
    """Run jobs (in a pool of spawned one-thread workers), printing progress and the time left,
    estimated from the training steps run so far in this invocation (jobs a previous one
    finished cost almost nothing and say nothing about the rate)."""
    todo = [steps_left(job, ref) for job in jobs]
    if args.workers == 1:
        results = map(run_job, jobs)
    else:
        spawn = multiprocessing.get_context("spawn")  # fresh processes: one thread each
        pool = concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=spawn)
        results = pool.map(run_job, jobs)
    rows = []
    for done, (job, job_rows) in enumerate(zip(jobs, results), 1):
        rows += job_rows
        elapsed = time.time() - t_start
        trained, left = sum(todo[:done]), sum(todo[done:])
        eta = f"about {elapsed / trained * left / 60:.0f} min left" if trained else (
            f"{left} training steps left")
        print(f"[sweep] {job[0]}-s{job[1]} done: {done}/{len(jobs)} jobs, {elapsed / 60:.1f} min, "
              f"{eta}", flush=True)
    return rows


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)  # the yardstick, as every job: its numbers do not depend on the cores
    size = {**SETTINGS[args.setting], **(SMOKE if args.smoke else {})}
    if args.smoke and "first_stage" in size:
        size["first_stage"] = {**SMOKE_FIRST_STAGE, "accept": None}
    if args.classes:  # the same fonts and seeded order of characters, the first K
        size.update(classes=args.classes, data_root=f"{size['data_root']}-{args.classes}")
    if args.smoke and size["dataset"] == "glyphs":
        size.update(SMOKE_GLYPHS, data_root=os.path.join(args.out, "glyphs"))
    os.makedirs(args.out, exist_ok=True)
    with system.folder_lock(args.out, "sweep"):
        if args.floors_only:
            return floors_only(args, size)
        return run_sweep(args, size)


def floors_only(args, size):
    """The yardstick and its floor rows, before (or without) any model: OUT/floors.md."""
    ref = reference(args.out, size)
    clf = features.load_classifier(os.path.join(args.out, "classifier.pt"))
    floors = floor_rows(ref, clf, "first_stage" in size, size.get("flip", False))
    text = "\n".join([*yardstick_lines(ref), "", *floor_table(floors)])
    with open(os.path.join(args.out, "floors.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return floors


def yardstick_lines(ref):
    """What the yardstick's own numbers are: the classifier, the first stage, the features."""
    line = (f"Classifier accuracy on the floor set {float(ref['classifier_accuracy']):.3f}"
            + (f", on its reconstructions {float(ref['reconstruction_accuracy']):.3f}"
               if "reconstruction_accuracy" in ref else "")
            + f"; share of the reference features' variance between classes "
              f"{float(ref['between_class_variance']):.3f}.")
    return [line]


def run_sweep(args, size):
    """Every job of the design, then the report and the plot."""
    system.write_json(os.path.join(args.out, "sweep.json"),
                      {**vars(args), **size, "samples": {f"{k:g}": v for k, v in
                                                         size["samples"].items()},
                       "arms": ARMS, "cads": CADS, "contrasts": CONTRASTS})
    t_start = time.time()
    ref = reference(args.out, size)
    steps, ladder_rows = None, None
    if size.get("ladder"):  # the budget, fixed on clean seed 0 before any other arm trains
        steps, ladder_rows = ladder(args.out, size)
        if steps is None and not args.smoke and args.classes is None:
            raise SystemExit(f"the budget ladder did not settle by {size['ladder'][-1]} steps "
                             f"({args.out}/ladder.json): halve the classes, --classes "
                             f"{size['classes'] // 2}")
        if steps is None:  # halved once already (stated before the run): the last rung
            print(f"[sweep] the ladder did not settle at {size['classes']} classes either: the "
                  f"budget is its last rung, {size['ladder'][-1]} steps", flush=True)
        size = {**size, "steps": steps or size["ladder"][-1]}
    jobs = [(arm, seed, size, args.out) for seed in range(args.seeds) for arm in PRIMARY]
    jobs += [(arm, seed, size, args.out) for seed in range(args.mechanism_seeds)
             for arm in MECHANISM]
    jobs += [(arm, seed, size, args.out) for seed in range(args.control_seeds)
             for arm in CONTROL]
    jobs += [(arm, seed, size, args.out) for seed in range(args.other_seeds) for arm in OTHER]
    rows = run_all(jobs, ref, args, t_start)
    clf = features.load_classifier(os.path.join(args.out, "classifier.pt"))
    floors = floor_rows(ref, clf, "first_stage" in size, size.get("flip", False))
    summary = summarise(rows)
    minutes = (time.time() - t_start) / 60
    meta = (f"{args.setting}: {size['train_per_class']} training images per class, "
            f"{size['steps']} steps x {size['batch']}, samples per class "
            + ", ".join(f"{v} at s={k:g}" for k, v in size["samples"].items())
            + f", DPM-Solver++ {size['sample_steps']} steps; this invocation took "
            f"{minutes:.1f} min (a job whose model and samples were complete was evaluated only)")
    if "first_stage" in size:
        stage = size["first_stage"]
        report = json.load(open(os.path.join(args.out, "autoencoder", "report.json")))
        meta += (f"; autoencoder {stage['preset']}, {stage['steps']} steps of {stage['batch']}, "
                 f"held-out PSNR {report['psnr']:.2f} dB on {report['held_out_images']} images, "
                 f"latent scale {report['scale']:.4f}")
    extra = [*yardstick_lines(ref), ""]
    if ladder_rows:
        extra += [*ladder_table(ladder_rows, steps), ""]
        plot_ladder(ladder_rows, floors, steps, args.out)
    if size.get("scan"):
        extra += [*best_scales(rows, size), ""]
    print(write_report(rows, summary, floors, args.out, ref, meta, extra))
    plot(rows, summary, floors, args.out)
    plot_grids(args.out)
    print(f"[sweep] wrote {args.out}/results.csv, summary.csv, results.md, sweep.png, "
          "grids_s0_s2.png "
          f"({minutes:.1f} min)")
    return rows, summary


if __name__ == "__main__":
    main()
