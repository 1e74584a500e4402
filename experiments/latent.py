"""The first stage of the sweep's latent setting: the paper's LDM pipeline at Fashion-MNIST scale.

LDM-4 diffuses in the latent space of a frozen autoencoder (App. B.3). Here a small KL-f4
autoencoder (vae.py's `small-kl`: 32x32x1 images -> 4x8x8 latents) is trained once on the
Fashion-MNIST training split (experiments/train_vae.py), its latent scale measured as LDM's
scale_by_std, and the diffusion model's training set is cached as latents, as LDM caches
first-stage codes (with both horizontal flips where the setting says `flip`, as the committed
Fashion-MNIST results were made). Every image the sweep scores samples against is a
reconstruction (decode of encode), so the autoencoder's blur is on both sides of FID and KID and
the metrics see the diffusion model only. Used by experiments/sweep.py (--setting fmnist-latent).
"""
import json
import os

import numpy as np
import torch

from experiments import glyphs, train_vae
from support import data, encode, weights


def first_stage(out, size, train_images, train_labels):
    """The autoencoder of the setting, trained once into OUT/autoencoder (resumed if cut): on
    Fashion-MNIST's training split, or on the diffusion model's training images (glyphs: written
    as a class folder, OUT/train-images)."""
    folder = os.path.join(out, "autoencoder")
    report = os.path.join(folder, "report.json")
    if not os.path.exists(report):
        stage = size["first_stage"]
        resume = ["--resume"] if os.path.exists(os.path.join(folder, "ckpt.pt")) else []
        if size["dataset"] == "glyphs":
            images = glyphs.write_folder(train_images, train_labels,
                                         os.path.join(out, "train-images"))
            dataset = ["--dataset", "folder", "--data-root", images, "--image-size", "32"]
        else:
            dataset = ["--dataset", size["dataset"], "--data-root", size["data_root"], "--pad"]
        train_vae.main([*dataset, "--preset", stage["preset"], "--steps", str(stage["steps"]),
                        "--batch-size", str(stage["batch"]), "--eval-images",
                        str(stage["eval_images"]), "--out", folder, *resume])
    print(f"[sweep] autoencoder: {json.load(open(report))}", flush=True)
    return weights.load_autoencoder(os.path.join(folder, "ckpt.pt")).eval()


def cache_training_set(autoencoder, images, labels, size, out):
    """The diffusion model's training images as a latent cache (their mirrors too where the
    setting flips): OUT/latents."""
    folder = os.path.join(out, "latents")
    path = os.path.join(out, "autoencoder", "ckpt.pt")
    meta = {**encode.cache_meta(autoencoder, size["first_stage"]["preset"], path, size["dataset"],
                                size["data_root"], "train", None, True, size.get("flip", False)),
            "subset": "split.npz: train"}
    names = [str(c) for c in range(int(labels.max()) + 1)]
    data.encode_dataset(autoencoder, data.InMemoryDataset(images, labels, names), folder, meta)
    return folder


@torch.no_grad()
def reconstruct(autoencoder, images, batch=250):
    """uint8 NCHW images -> decode(encode(images)), uint8 NCHW (what a perfect latent model
    would produce for them)."""
    parts = []
    for i in range(0, len(images), batch):
        x = data.to_float(images[i:i + batch])
        parts.append(data.to_uint8(autoencoder.decode(autoencoder.encode(x))))
    return torch.cat(parts)


def split(size):
    """Fashion-MNIST's split for the latent setting: indices into [train split; test split].
    train: train.py's stratified draw; unseen: as many others of the training split (the copy
    rate); classifier: the rest of the training split; reference and floor: disjoint
    stratified draws from the test split."""
    full = data.load_dataset(size["dataset"], size["data_root"], "train", pad=True)
    test = data.load_dataset(size["dataset"], size["data_root"], "test", pad=True)
    images = torch.cat([full.images, test.images])
    labels = np.concatenate([full.labels, test.labels])
    parts = {"train": data.per_class_indices(full.labels, size["train_per_class"], seed=0)}
    rng = np.random.default_rng(1)
    rest = np.setdiff1d(np.arange(len(full)), parts["train"])
    parts["unseen"] = np.sort(np.concatenate([
        rng.choice(rest[full.labels[rest] == c], size["train_per_class"], replace=False)
        for c in range(full.num_classes)]))
    parts["classifier"] = np.setdiff1d(rest, parts["unseen"])
    drawn = [rng.permutation(np.flatnonzero(test.labels == c)) for c in range(test.num_classes)]
    n_ref, n_floor = size["reference_per_class"], size["floor_per_class"]
    parts["reference"] = len(full) + np.sort(np.concatenate([d[:n_ref] for d in drawn]))
    parts["floor"] = len(full) + np.sort(np.concatenate([d[n_ref:n_ref + n_floor]
                                                         for d in drawn]))
    return images, labels, parts
