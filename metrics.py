"""Evaluation metrics of the paper (Sec. 3.1, App. B.7, App. C.1), written out by hand.

    python metrics.py --real ref.npz --fake runs/clean/samples --fake cep=runs/cep/samples \
        --features inception:pt_inception-2015-12-05-6726825d.pth --metrics fid,is,pr --out eval/
    torchrun --nproc_per_node=8 metrics.py ...                       # feature extraction sharded
    python metrics.py train-classifier --dataset fashion-mnist --data-root DIR --out fmnist_cls.pt

FID (pytorch-fid's TF-Inception, float64 statistics, scipy sqrtm), IS (torch-fidelity's way),
precision/recall/density/coverage (k = 3, as the prdc package), sFID (ADM's definition),
top-1 % RMD (Eq. 38-40), sample entropy (Eq. 41), distance to the 5 nearest training images and
the memorization ratio, CLIP score. Features come from a pluggable extractor
("inception:PATH", "clip:DIR", "classifier:PATH"); every report names it.
--real/--train/--fake take an .npz (arr_0 uint8 NHWC: sample.py output, ADM reference batch),
a pytorch-fid statistics .npz (mu, sigma), an image folder or "dataset:NAME[:SPLIT]" (corrupt.py).
A sample.py folder OUT/s{scale}/samples.npz gives one row per guidance scale, and the plots.
"""
import argparse
import concurrent.futures
import glob
import hashlib
import json
import math
import os
import re
import sys
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from tqdm import tqdm

import system

FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS


# --------------------------------------------------------------------------------------------
# The FID Inception-v3 (pytorch-fid's port of TF "inception-2015-12-05"), torchvision key names
# --------------------------------------------------------------------------------------------

class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    """TF's 3x3 average pool ignores the zero padding (pytorch-fid's FID blocks)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = conv(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """pool="max" in the last block (Mixed_7c): a quirk of the TF graph that pytorch-fid keeps."""

    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.pool == "max" else tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


class InceptionV3(nn.Module):
    """uint8 images [B, C, H, W] -> pool3 features (2048), logits (1008) and ADM's sFID features.

    Preprocessing as pytorch-fid: x / 255, bilinear resize to 299 (align_corners=False), 2x - 1.
    Grayscale is replicated to 3 channels. Load the pytorch-fid weights with `load_inception`.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images):
        x = images.float() / 255
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))))
        # sFID (ADM's evaluator): TF "mixed_6/conv" = Mixed_6d.branch1x1, first 7 channels, NHWC order
        spatial = self.Mixed_6d.branch1x1(x)[:, :7].permute(0, 2, 3, 1).flatten(1)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(self.Mixed_6d(x)))))
        pool3 = x.mean(dim=(2, 3))
        return {"features": pool3, "logits": self.fc(pool3),
                "logits_unbiased": pool3 @ self.fc.weight.T,  # IS input of torch-fidelity / the original TF code
                "spatial": spatial}


def load_inception(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID Inception weights not found at '{path}'. Download {FID_WEIGHTS} "
                                f"(the pytorch-fid release asset) from {FID_WEIGHTS_URL}")
    model = InceptionV3()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Other feature extractors: a small domain classifier (trained here) and CLIP (local directory)
# --------------------------------------------------------------------------------------------

def to_model_input(images, channels):
    """uint8 [B, C, H, W] -> float in [-1, 1] with `channels` channels (grey <-> RGB)."""
    x = images.float() / 127.5 - 1
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True) if channels == 1 else x.expand(-1, channels, -1, -1)
    return x


class Classifier(nn.Module):
    """Small CNN for small grayscale datasets; its penultimate layer (128-d) is the feature space."""

    def __init__(self, num_classes=10, image_size=28, channels=1):
        super().__init__()
        self.image_size, self.channels = image_size, channels
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * (image_size // 4) ** 2, 128), nn.ReLU())
        self.head = nn.Linear(128, num_classes)

    def forward(self, x):  # float [-1, 1] at the training size
        return self.head(self.body(x))

    def embed(self, images):  # uint8 images of any size and channel count
        x = to_model_input(images, self.channels)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return {"features": self.body(x)}


def load_classifier(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"classifier checkpoint not found at '{path}'; "
                                "train one with: python metrics.py train-classifier --out PATH")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = Classifier(ckpt["num_classes"], ckpt["image_size"], ckpt["channels"])
    model.load_state_dict(ckpt["model"])
    return model.eval().requires_grad_(False)


class CLIP(nn.Module):
    """transformers' CLIPModel from a local directory: image embeddings, text embeddings."""

    def __init__(self, path):
        super().__init__()
        if not os.path.isdir(path):
            raise FileNotFoundError(f"CLIP directory not found at '{path}'. Save one with transformers, e.g. "
                                    "CLIPModel/CLIPProcessor.from_pretrained('openai/clip-vit-base-patch16')"
                                    ".save_pretrained(DIR) (the paper: CLIP ViT-B/16)")
        from transformers import CLIPModel, CLIPProcessor
        self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
        self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)

    def embed_images(self, images):  # uint8 [B, C, H, W] -> [B, D] (not normalised)
        rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        pixels = self.processor(images=list(rgb.permute(0, 2, 3, 1).cpu().numpy()), return_tensors="pt")["pixel_values"]
        dev = self.model.visual_projection.weight.device
        return self.model.visual_projection(self.model.vision_model(pixel_values=pixels.to(dev)).pooler_output)

    def embed_texts(self, texts):
        tok = self.processor(text=list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        dev = self.model.text_projection.weight.device
        out = self.model.text_model(input_ids=tok["input_ids"].to(dev), attention_mask=tok["attention_mask"].to(dev))
        return self.model.text_projection(out.pooler_output)

    def embed(self, images):
        return {"features": self.embed_images(images)}


class Extractor:
    """A feature network with the name every report carries; __call__(uint8 NCHW) -> dict of [B, D]."""

    def __init__(self, spec, device):
        kind, _, path = spec.partition(":")
        loaders = {"inception": lambda: (load_inception(path), "forward"),
                   "classifier": lambda: (load_classifier(path), "embed"),
                   "clip": lambda: (CLIP(path), "embed")}
        if kind not in loaders or not path:
            raise ValueError(f"--features must be inception:PATH, clip:DIR or classifier:PATH, got '{spec}'")
        self.kind, self.device = kind, device
        self.net, method = loaders[kind]()
        self.net.to(device)
        self.fn = getattr(self.net, method)
        self.name = f"{kind}:{os.path.basename(os.path.normpath(path))}"  # in every report
        self.cache_id = f"{kind}:{os.path.abspath(path)}|{os.stat(path).st_mtime_ns}"

    @torch.no_grad()
    def __call__(self, images):
        return self.fn(images.to(self.device))


# --------------------------------------------------------------------------------------------
# Image sources: .npz (streamed from the zip, no full load), folders, datasets of corrupt.py
# --------------------------------------------------------------------------------------------

class NpzSource:
    """arr_0 uint8 [N, H, W(, C)] read in slices; labels / captions / mu / sigma when present."""

    def __init__(self, path):
        self.path = path
        with np.load(path, allow_pickle=False) as f:
            self.extra = {k: f[k] for k in f.files if k != "arr_0"}
        self.labels = self.extra.get("labels")
        self.captions = self.extra.get("captions")
        self.zip = zipfile.ZipFile(path)
        self.length = 0
        if "arr_0.npy" in self.zip.namelist():
            with self.zip.open("arr_0.npy") as fh:
                version = np.lib.format.read_magic(fh)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                self.shape, fortran, dtype = read_header[version](fh)
                self.offset = fh.tell()
            if dtype != np.uint8 or fortran or len(self.shape) not in (3, 4):
                raise ValueError(f"{path}: arr_0 must be a C-ordered uint8 array [N, H, W, C], got {dtype} {self.shape}")
            if len(self.shape) == 4 and self.shape[-1] not in (1, 3) and self.shape[1] in (1, 3):
                raise ValueError(f"{path}: arr_0 {self.shape} looks channel-first [N, C, H, W]; "
                                 f"images must be channel-last [N, H, W, C] (np.transpose(x, (0, 2, 3, 1)))")
            self.length = self.shape[0]
            self.fh, self.pos = None, None

    def __len__(self):
        return self.length

    def read(self, start, stop):
        row = int(np.prod(self.shape[1:]))
        if self.fh is None or self.pos != start:  # sequential reads stay cheap; a jump re-seeks
            self.fh = self.zip.open("arr_0.npy")
            self.fh.seek(self.offset + start * row)
        data = self.fh.read((stop - start) * row)
        self.pos = stop
        x = np.frombuffer(data, np.uint8).reshape(stop - start, *self.shape[1:]).copy()
        return x[..., None] if x.ndim == 3 else x

    def cache_id(self):
        st = os.stat(self.path)
        return f"{os.path.abspath(self.path)}|{st.st_mtime_ns}|{st.st_size}"


class FolderSource:
    """Every image under a folder (sorted, recursive), decoded to RGB; all must have one size."""

    EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

    def __init__(self, path):
        self.path = path
        self.files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs
                            if f.lower().endswith(self.EXTENSIONS))
        if not self.files:
            raise FileNotFoundError(f"no images ({', '.join(self.EXTENSIONS)}) under '{path}'")
        self.labels = self.captions = None
        self.extra = {}
        self.pool = concurrent.futures.ThreadPoolExecutor(8)

    def __len__(self):
        return len(self.files)

    def read(self, start, stop):
        images = list(self.pool.map(lambda f: np.asarray(Image.open(f).convert("RGB")), self.files[start:stop]))
        if len({im.shape for im in images}) > 1:
            raise ValueError(f"images under '{self.path}' differ in size; resize/crop them first (as ADM's reference batches)")
        return np.stack(images)

    def cache_id(self):
        return f"{os.path.abspath(self.path)}|{os.stat(self.path).st_mtime_ns}|{len(self.files)}"


class DatasetSource:
    """"dataset:NAME[:SPLIT]" through corrupt.load_dataset (e.g. the Fashion-MNIST test set)."""

    def __init__(self, spec, root, image_size):
        import corrupt
        _, name, split = (spec.split(":") + ["test"])[:3]
        self.id = f"{spec}|{root}|{image_size}"
        self.path = spec
        self.ds = corrupt.load_dataset(name, root, split=split, image_size=image_size)
        self.labels = getattr(self.ds, "labels", None)
        self.captions = getattr(self.ds, "captions", None)
        self.extra = {}

    def __len__(self):
        return len(self.ds)

    def read(self, start, stop):
        images = getattr(self.ds, "images", None)
        if torch.is_tensor(images) and images.dtype == torch.uint8:  # in-memory datasets: uint8 NCHW
            return images[start:stop].permute(0, 2, 3, 1).numpy()
        x = torch.stack([self.ds[i][0] for i in range(start, stop)])  # float [-1, 1] CHW
        return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()

    def cache_id(self):
        return self.id


def open_images(spec, data_root=None, image_size=None):
    if spec.startswith("dataset:"):
        return DatasetSource(spec, data_root, image_size)
    if os.path.isdir(spec):
        return FolderSource(spec)
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"no such file or folder: '{spec}'")
    if not spec.endswith(".npz"):
        raise ValueError(f"'{spec}': expected an .npz, an image folder or dataset:NAME[:SPLIT]")
    return NpzSource(spec)


# --------------------------------------------------------------------------------------------
# Feature extraction: sharded over ranks, streaming float64 statistics, gathered features
# --------------------------------------------------------------------------------------------

def world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


class FeatureStats:
    """Running sum and sum of outer products in float64; mean and covariance as np.cov (N - 1)."""

    def __init__(self, dim, device):
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, f):
        f = f.double()
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def all_reduce(self):
        if world()[1] > 1:
            n = torch.tensor([self.n], dtype=torch.float64, device=self.sum.device)
            for t in (n, self.sum, self.outer):
                dist.all_reduce(t)
            self.n = int(n.item())

    def mean_cov(self):
        mu = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.cpu().numpy(), cov.cpu().numpy()


def gather(x):
    """Rank 0 gets every rank's contiguous shard concatenated in rank order (= the original order);
    other ranks get None (the metrics on features are computed on rank 0 only)."""
    rank, size = world()
    if size == 1:
        return x
    parts = [None] * size if rank == 0 else None
    dist.gather_object(x, parts, dst=0)
    return np.concatenate(parts) if rank == 0 else None


def extract(extractor, source, batch_size, desc):
    """-> {"n", "mu", "sigma", ["mu_s", "sigma_s"], "features", ["logits_unbiased"]}: the
    statistics on every rank, the features and logits on rank 0 only (None elsewhere)."""
    rank, size = world()
    if len(source) < size:  # an empty shard would skip the collectives below: a hang
        raise ValueError(f"'{source.path}' has {len(source)} images, fewer than the {size} processes")
    lo, hi = rank * len(source) // size, (rank + 1) * len(source) // size
    stats, kept = {}, {"features": [], "logits_unbiased": []}
    for start in tqdm(range(lo, hi, batch_size), desc=desc, disable=rank != 0):
        images = torch.from_numpy(source.read(start, min(start + batch_size, hi))).permute(0, 3, 1, 2)
        out = extractor(images)
        for key in ("features", "spatial"):
            if key in out:
                if key not in stats:
                    stats[key] = FeatureStats(out[key].shape[1], extractor.device)
                stats[key].update(out[key])
        for key in kept:
            if key in out:
                kept[key].append(out[key].float().cpu().numpy())
    result = {}
    for key, suffix in (("features", ""), ("spatial", "_s")):
        if key in stats:
            stats[key].all_reduce()
            result["mu" + suffix], result["sigma" + suffix] = stats[key].mean_cov()
            result["n"] = stats[key].n
    for key, parts in kept.items():
        if parts:
            result[key] = gather(np.concatenate(parts))
    return result


def reference_features(source, extractor, args, desc, needed):
    """The `needed` statistics/features of a real/training set. Files with Inception
    statistics (pytorch-fid's mu/sigma, ADM's mu/sigma/mu_s/sigma_s) give those, as pytorch-fid
    and ADM use them; images are extracted once and cached under --cache (file, mtime, extractor)."""
    stored = {k: source.extra[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in source.extra}
    stored = stored if extractor.kind == "inception" else {}
    if set(needed) <= stored.keys():
        return stored
    if len(source) == 0:
        raise ValueError(f"'{source.path}' holds no images (arr_0)" + ("" if stored else " and no Inception statistics"))
    key = hashlib.sha1(f"{source.cache_id()}|{extractor.cache_id}".encode()).hexdigest()[:16]
    path = os.path.join(args.cache, f"{key}.npz") if args.cache else None
    hit = [bool(path) and os.path.exists(path)]
    if world()[1] > 1:  # rank 0 decides: a hit on some ranks only would split the collectives
        dist.broadcast_object_list(hit, src=0)
    if hit[0]:
        if world()[0] == 0:
            print(f"{desc}: cached features {path} (--cache '' recomputes them)")
        with np.load(path) as f:
            feats = {k: f[k] for k in f.files}
    else:
        feats = extract(extractor, source, args.batch_size, desc)
        if path and world()[0] == 0:
            os.makedirs(args.cache, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp.npz"  # unique: parallel runs may fill the same cache entry
            np.savez(tmp, **feats)
            os.replace(tmp, path)
    feats = {**feats, **stored}
    missing = set(needed) - feats.keys()
    if missing:
        raise ValueError(f"'{source.path}' with {extractor.name} gives no {sorted(missing)}")
    return feats


# --------------------------------------------------------------------------------------------
# The metrics
# --------------------------------------------------------------------------------------------

def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), exactly as pytorch-fid computes it."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in dimension: {mu1.shape} vs {mu2.shape} (different feature extractors?)")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # singular product: offset the diagonals
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):  # numerical error can leave a tiny imaginary part
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, splits=10, seed=2020):
    """IS as torch-fidelity: shuffled (RandomState(2020)), exp E[KL(p(y|x) || p(y))] per split.

    logits: the fc layer *without* its bias ("logits_unbiased", as the original TF IS code).
    Returns (mean, std) over the splits.
    """
    logits = torch.as_tensor(np.asarray(logits))
    n = logits.shape[0]
    logits = logits[np.random.RandomState(seed).permutation(n)].double()
    p, log_p = logits.softmax(1), logits.log_softmax(1)
    scores = []
    for i in range(splits):
        part, log_part = p[i * n // splits:(i + 1) * n // splits], log_p[i * n // splits:(i + 1) * n // splits]
        kl = (part * (log_part - part.mean(0, keepdim=True).log())).sum(1)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def pairwise_distances(a, b):
    """Euclidean distances in float64 (the same expansion sklearn uses)."""
    a2, b2 = (a * a).sum(1), (b * b).sum(1)
    return (a2[:, None] + b2[None, :] - 2 * a @ b.T).clamp_min(0).sqrt()


def row_blocks(n_rows, n_cols, budget=2 ** 27):
    """Row blocks so a block of distances holds at most `budget` float64 (1 GiB)."""
    step = max(1, budget // max(n_cols, 1))
    return [(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def knn_distances(x, y, k, exclude_self=False):
    """Distances of each row of x to its k nearest rows of y (sorted); self excluded when x is y."""
    out = []
    for i, j in row_blocks(len(x), len(y)):
        d = pairwise_distances(x[i:j], y)
        out.append(d.topk(k + exclude_self, dim=1, largest=False).values[:, exclude_self:])
    return torch.cat(out)


def precision_recall(real, fake, k=3, device="cpu"):
    """Improved precision/recall (Kynkaanniemi et al. 2019) and density/coverage (Naeem et al.
    2020) with k nearest neighbours, as the prdc package, in row blocks (50K x 50K fits)."""
    real = torch.as_tensor(np.asarray(real), device=device, dtype=torch.float64)
    fake = torch.as_tensor(np.asarray(fake), device=device, dtype=torch.float64)
    r_real = knn_distances(real, real, k, exclude_self=True)[:, -1]  # radius of each real ball
    r_fake = knn_distances(fake, fake, k, exclude_self=True)[:, -1]
    fake_in_real = torch.zeros(len(fake), dtype=torch.bool, device=device)
    fake_count = torch.zeros(len(fake), dtype=torch.float64, device=device)
    real_in_fake, covered = [], []
    for i, j in row_blocks(len(real), len(fake)):
        d = pairwise_distances(real[i:j], fake)  # [real block, fake]
        inside = d < r_real[i:j, None]
        fake_in_real |= inside.any(0)
        fake_count += inside.sum(0)
        real_in_fake.append((d < r_fake[None, :]).any(1))
        covered.append(d.min(1).values < r_real[i:j])
    return {"precision": fake_in_real.double().mean().item(),
            "recall": torch.cat(real_in_fake).double().mean().item(),
            "density": (fake_count / k).mean().item(),
            "coverage": torch.cat(covered).double().mean().item()}


def mahalanobis(g, mu, precision):
    z = g - mu
    return ((z @ precision) * z).sum(1)


def rmd_scores(features, labels):
    """RMD(x, y) = M(x, y) - M_agn(x) (Eq. 38-40), every statistic estimated on this (generated)
    set: class means and one shared covariance, and a class-agnostic mean and covariance (1/N, as
    Lee et al. 2018); M(x, y) = -(G - mu_y)^T Sigma^-1 (G - mu_y); pseudo-inverse if singular."""
    g = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    classes, y_idx = torch.unique(y, return_inverse=True)
    means = torch.stack([g[y_idx == c].mean(0) for c in range(len(classes))])
    z = g - means[y_idx]
    shared = torch.linalg.pinv(z.T @ z / len(g), hermitian=True)
    z_agn = g - g.mean(0)
    agnostic = torch.linalg.pinv(z_agn.T @ z_agn / len(g), hermitian=True)
    m_class = -mahalanobis(g, means[y_idx], shared)
    m_agn = -mahalanobis(g, g.mean(0), agnostic)
    return (m_class - m_agn).numpy()


def top_fraction_mean(scores, fraction=0.01):
    """The mean of the largest `fraction` of the scores (Top-1 % RMD; our reading of 'top')."""
    n = max(1, int(math.ceil(fraction * len(scores))))
    return float(np.sort(scores)[-n:].mean())


def vector_entropies(latents, codebook, tau=1.0):
    """Entropy of p = softmax(-||x_ij - C||^2 / tau) over the codebook for every latent vector
    of every image (Eq. 41, with the log and minus sign the printed equation omits).
    latents [N, C, h, w] (the VQ encoder's pre-quantization output), codebook [K, C] -> [N*h*w]."""
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).double()
    cb = codebook.to(x.device).double()
    out = []
    for i, j in row_blocks(len(x), len(cb)):
        d2 = ((x[i:j] * x[i:j]).sum(1, keepdim=True) + (cb * cb).sum(1)[None] - 2 * x[i:j] @ cb.T).clamp_min(0)
        log_p = torch.log_softmax(-d2 / tau, dim=1)
        out.append(-(log_p.exp() * log_p).sum(1))
    return torch.cat(out)


def sample_entropy(latents, codebook, tau=1.0):
    return vector_entropies(latents, codebook, tau).mean().item()


def normalize(features):
    f = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    return f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)


def memorization(fake, train, k=5, threshold=0.12, device="cpu"):
    """Average L2 distance of each sample to its k nearest training images and the fraction whose
    nearest training image is closer than `threshold`; features L2-normalised (the paper: CLIP)."""
    d = knn_distances(normalize(fake).to(device), normalize(train).to(device), k)
    return {"l2_5nn": d.mean().item(), "mem_ratio": (d[:, 0] < threshold).double().mean().item()}


@torch.no_grad()
def clip_score_sum(clip, images, captions):
    """sum over the batch of 100 * max(cos(E_image, E_text), 0) (torchmetrics' CLIPScore formula)."""
    cos = F.cosine_similarity(clip.embed_images(images).double(), clip.embed_texts(captions).double(), dim=1)
    return (100 * cos.clamp_min(0)).sum().item()


# --------------------------------------------------------------------------------------------
# Evaluation of one sample set, sweeps, table, JSON and plots
# --------------------------------------------------------------------------------------------

METRICS = ("fid", "sfid", "is", "pr", "rmd", "entropy", "mem", "clip")


def run_label(path):
    """runs/clean/samples -> "clean"; other paths -> their name without extension."""
    base = os.path.basename(path)
    return os.path.basename(os.path.dirname(path)) if base == "samples" else os.path.splitext(base)[0]


def fake_runs(specs):
    """--fake [LABEL=]PATH -> [(label, scale or None, path)]; a sample.py folder gives one per scale."""
    rows = []
    for spec in specs:
        label, _, path = spec.rpartition("=")
        path = os.path.normpath(path)
        scale_dir = re.fullmatch(r"s([0-9.]+)", os.path.basename(os.path.dirname(path)))
        sweep = sorted(glob.glob(os.path.join(path, "s*", "samples.npz")),
                       key=lambda p: float(os.path.basename(os.path.dirname(p))[1:]))
        if os.path.basename(path) == "samples.npz" and scale_dir:  # OUT/s{scale}/samples.npz
            rows.append((label or run_label(os.path.dirname(os.path.dirname(path))), float(scale_dir[1]), path))
        elif os.path.isdir(path) and sweep:
            rows += [(label or run_label(path), float(os.path.basename(os.path.dirname(p))[1:]), p) for p in sweep]
        else:
            rows.append((label or run_label(path), None, path))
    return rows


def load_vq(path, preset, device, unsafe_pickle=False):
    """The VQ autoencoder of vae.py and its codebook [K, C] (for the sample entropy)."""
    import vae
    model = vae.load_autoencoder(path, preset, unsafe_pickle=unsafe_pickle).to(device).eval().requires_grad_(False)
    if model.config.kind != "vq":
        raise ValueError(f"'{path}' is a {model.config.kind} autoencoder; the sample entropy needs a VQ codebook")
    return model, model.quantize.embedding.weight


def vq_latents(vq, images):
    """uint8 images -> the VQ encoder's pre-quantization latents (our reading: generated images are
    re-encoded, as the .npz holds images; for a latent model these are its decoded samples)."""
    return vq.latent(to_model_input(images, vq.config.in_channels))


@torch.no_grad()
def distributed_pass(source, batch_size, fn, desc):
    """Sum fn(uint8 batch, start, stop) -> (sum, count) over all images, sharded over ranks."""
    rank, size = world()
    lo, hi = rank * len(source) // size, (rank + 1) * len(source) // size
    total = torch.zeros(2, dtype=torch.float64)
    for start in tqdm(range(lo, hi, batch_size), desc=desc, disable=rank != 0):
        stop = min(start + batch_size, hi)
        total += torch.tensor(fn(torch.from_numpy(source.read(start, stop)).permute(0, 3, 1, 2), start, stop), dtype=torch.float64)
    if size > 1:
        total = total.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def evaluate(source, extractor, real, train, metrics, args, extras, desc):
    """All requested metrics of one sample set: every rank extracts its shard, rank 0 computes."""
    feats = extract(extractor, source, args.batch_size, desc)
    row, device = {"n": feats["n"]}, extractor.device
    if world()[0] == 0:
        if "fid" in metrics:
            row["fid"] = frechet_distance(feats["mu"], feats["sigma"], real["mu"], real["sigma"])
        if "sfid" in metrics:
            row["sfid"] = frechet_distance(feats["mu_s"], feats["sigma_s"], real["mu_s"], real["sigma_s"])
        if "is" in metrics:
            row["is"], row["is_std"] = inception_score(feats["logits_unbiased"], args.is_splits)
        if "pr" in metrics:
            row.update(precision_recall(real["features"], feats["features"], args.k, device))
        if "rmd" in metrics:
            scores = rmd_scores(feats["features"], source.labels)
            row["rmd_top1"] = top_fraction_mean(scores, 0.01)
            extras.setdefault("rmd_scores", []).append(scores)
        if "mem" in metrics:
            row.update(memorization(feats["features"], train["features"], 5, args.mem_threshold, device))
    if "entropy" in metrics:
        vq, codebook = extras["vq"]

        def entropy_sum(x, start, stop):
            h = vector_entropies(vq_latents(vq, x.to(device)), codebook, args.tau)
            return h.sum().item(), h.numel()
        row["entropy"] = distributed_pass(source, args.batch_size, entropy_sum, desc + " entropy")
    if "clip" in metrics:
        clip = extras["clip"]
        row["clip_score"] = distributed_pass(source, args.batch_size, lambda x, start, stop: (
            clip_score_sum(clip, x, [str(c) for c in source.captions[start:stop]]), stop - start), desc + " clip")
    return row


def check_request(metrics, extractor, sources, args):
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {', '.join(METRICS)}")
    if {"is", "sfid"} & set(metrics) and extractor.kind != "inception":
        raise ValueError("IS and sFID need --features inception:PATH (its logits / mixed_6 features)")
    for label, _, src in sources:
        if "rmd" in metrics and src.labels is None:
            raise ValueError(f"RMD needs the conditioning labels: '{src.path}' has no 'labels'")
        if "clip" in metrics and src.captions is None:
            raise ValueError(f"CLIP score needs the prompts: '{src.path}' has no 'captions'")
    for label, _, src in sources:
        if {"fid", "sfid"} & set(metrics) and len(src) < 2:
            raise ValueError(f"FID needs at least 2 images: '{src.path}' has {len(src)}")
        if "pr" in metrics and len(src) <= args.k:
            raise ValueError(f"precision/recall with k={args.k} needs more than {args.k} images: "
                             f"'{src.path}' has {len(src)}")
    if "mem" in metrics and not args.train:
        raise ValueError("mem needs --train (the training images)")
    if "entropy" in metrics and not args.vq:
        raise ValueError("entropy needs --vq (the VQ autoencoder checkpoint of vae.py)")
    if "clip" in metrics and not args.clip:
        raise ValueError("clip needs --clip DIR (a local CLIP model directory)")


COLUMNS = [("fid", "FID"), ("sfid", "sFID"), ("is", "IS"), ("precision", "prec"), ("recall", "recall"),
           ("density", "density"), ("coverage", "cover"), ("rmd_top1", "RMD1%"), ("entropy", "entropy"),
           ("l2_5nn", "L2-5NN"), ("mem_ratio", "mem"), ("clip_score", "CLIP")]


def print_table(rows, extractor_name):
    cols = [(k, h) for k, h in COLUMNS if any(k in r for r in rows)]
    print(f"features: {extractor_name}")
    print(f"{'run':<16}{'scale':>7}{'n':>7}" + "".join(f"{h:>9}" for _, h in cols))
    for r in rows:
        scale = "-" if r["scale"] is None else f"{r['scale']:g}"
        print(f"{r['run'][:16]:<16}{scale:>7}{r['n']:>7}" + "".join(f"{r[k]:>9.4g}" if k in r else f"{'':>9}" for k, _ in cols))


def plot_sweeps(rows, out, extractor_name):
    """The paper's two plots: FID against IS (or CLIP score) and precision against recall, one
    point per guidance scale, one line per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = {}
    for r in rows:
        runs.setdefault(r["run"], []).append(r)
    # FID against IS (class models) or CLIP score (text models); against the scale when neither
    x_key = next((k for k in ("is", "clip_score") if any(k in r for r in rows)), "scale")
    x_label = {"is": "IS", "clip_score": "CLIP score", "scale": "guidance scale"}[x_key]
    for name, (xk, yk, xlabel, ylabel) in {"fid_vs_" + x_key: (x_key, "fid", x_label, "FID"),
                                           "precision_recall": ("recall", "precision", "recall", "precision")}.items():
        missing = sorted({r["run"] for r in rows if r.get(xk) is None or r.get(yk) is None})
        if missing:
            print(f"note: no {name}.png: {', '.join(missing)} give no {xlabel if xk == 'scale' else xk} "
                  f"or {yk} (a guidance scale comes from a sample.py folder OUT/s{{scale}}/samples.npz)")
            continue
        fig, ax = plt.subplots(figsize=(5, 4))
        for run, rs in runs.items():
            ax.plot([r[xk] for r in rs], [r[yk] for r in rs], "o-", label=run)
            for r in rs:
                if r["scale"] is not None:
                    ax.annotate(f"{r['scale']:g}", (r[xk], r[yk]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} vs {xlabel} ({extractor_name})", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"{name}.png"), dpi=120)
        plt.close(fig)


def parse_eval_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=system.HelpFormatter)
    p.add_argument("--real", required=True, help="reference set: .npz (arr_0 and/or mu, sigma), image folder or dataset:NAME[:SPLIT] (split default: test)")
    p.add_argument("--fake", required=True, action="append", help="[LABEL=]PATH of samples: .npz, image folder, or a "
                   "sample.py folder OUT with OUT/s{scale}/samples.npz (one row per scale); repeat to overlay runs")
    p.add_argument("--features", required=True, help="inception:PATH (pytorch-fid's .pth), clip:DIR or classifier:PATH")
    p.add_argument("--metrics", default="fid,pr", help=f"comma-separated subset of {','.join(METRICS)} (pr = precision, recall, density, coverage)")
    p.add_argument("--train", default=None, help="training images for 'mem' (distance to the 5 nearest, memorization ratio)")
    p.add_argument("--vq", default=None, help="VQ autoencoder checkpoint (vae.py) for 'entropy'")
    p.add_argument("--vq-preset", default=None, help="vae.py preset (e.g. vq-f4) when --vq is CompVis/diffusers weights")
    p.add_argument("--clip", default=None, help="local CLIP model directory for 'clip' (paper: CLIP ViT-B/16)")
    p.add_argument("--tau", type=float, default=1.0, help="sample-entropy temperature (Eq. 41; the paper gives none)")
    p.add_argument("--k", type=int, default=3, help="nearest neighbours for precision/recall (paper: 3)")
    p.add_argument("--is-splits", type=int, default=10, help="IS splits (paper: 10)")
    p.add_argument("--mem-threshold", type=float, default=0.12, help="memorization: nearest training image closer than this")
    p.add_argument("--data-root", default=None, help="root for dataset:NAME sources (e.g. the Fashion-MNIST idx dir)")
    p.add_argument("--image-size", type=int, default=None, help="image size for dataset:NAME sources (as train.py's --image-size)")
    p.add_argument("--batch-size", type=int, default=100, help="images per forward pass per process")
    p.add_argument("--cache", default="runs/metrics-cache",
                   help="directory of cached reference features ('' = no cache)")
    p.add_argument("--out", default="metrics_out", help="output folder: metrics.json, plots, RMD scores")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--threads", type=int, default=0,
                   help=system.THREADS_HELP)
    p.add_argument("--unsafe-pickle", action="store_true",
                   help="--vq: read a checkpoint that pickles more than tensors (a CompVis Lightning "
                        "model.ckpt); unpickling can run any code it holds: only for files you trust")
    return p.parse_args(argv)


def setup_distributed(device):
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized() and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def main_eval(argv):
    args = parse_eval_args(argv)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 features
    device = setup_distributed(args.device)
    system.set_threads(args.threads)
    rank = world()[0]
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    try:  # what the user gave: one-line errors
        extractor = Extractor(args.features, device)
        runs = [(label, scale, open_images(path, args.data_root, args.image_size))
                for label, scale, path in fake_runs(args.fake)]
        check_request(metrics, extractor, runs, args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"metrics.py: {e}") from None
    extras = {}
    if "entropy" in metrics:
        extras["vq"] = load_vq(args.vq, args.vq_preset, device, args.unsafe_pickle)
    if "clip" in metrics:
        extras["clip"] = CLIP(args.clip).to(device)
    real = train = None
    needed = {"fid": ["mu", "sigma"], "sfid": ["mu_s", "sigma_s"], "pr": ["features"]}
    needed = [key for m in metrics for key in needed.get(m, [])]
    if needed:
        real = reference_features(open_images(args.real, args.data_root, args.image_size), extractor, args, "real", needed)
    if "mem" in metrics:
        train = reference_features(open_images(args.train, args.data_root, args.image_size), extractor, args, "train", ["features"])
    rows = []
    for label, scale, source in runs:
        t0 = time.time()
        row = evaluate(source, extractor, real, train, metrics, args, extras, label if scale is None else f"{label} s={scale:g}")
        rows.append({"run": label, "scale": scale, "path": source.path, **row, "seconds": round(time.time() - t0, 1)})
    if rank == 0:
        print_table(rows, extractor.name)
        os.makedirs(args.out, exist_ok=True)
        report = {"features": extractor.name, "real": args.real, "train": args.train, "metrics": metrics,
                  "options": {"k": args.k, "is_splits": args.is_splits, "tau": args.tau, "mem_threshold": args.mem_threshold,
                              "mem_features": "L2-normalised", "clip_score": "100 * max(cos, 0), mean over samples",
                              "rmd": "mean of the top 1 % scores"},
                  "rows": rows}
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump(report, f, indent=1)
        if "rmd_scores" in extras:
            np.savez(os.path.join(args.out, "rmd_scores.npz"),
                     **{f"{r['run']}_s{r['scale']}": s for r, s in zip(rows, extras["rmd_scores"])})
        plot_sweeps(rows, args.out, extractor.name)
        print(f"wrote {os.path.join(args.out, 'metrics.json')}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return rows


# --------------------------------------------------------------------------------------------
# A domain classifier for small datasets (its penultimate layer = "classifier:PATH" features)
# --------------------------------------------------------------------------------------------

def train_classifier(argv):
    p = argparse.ArgumentParser(description="Train the small CNN whose penultimate layer is the "
                                "'classifier:PATH' feature space (for datasets where ImageNet "
                                "features mean little).", formatter_class=system.HelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist", help="corrupt.load_dataset name (fashion-mnist, digits, ...)")
    p.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist", help="dataset location")
    p.add_argument("--image-size", type=int, default=None, help="as train.py's --image-size (default: native size)")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training split")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (smoke runs)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and data order")
    p.add_argument("--out", required=True, help="checkpoint path to write")
    args = p.parse_args(argv)
    import corrupt
    torch.manual_seed(args.seed)
    train = corrupt.load_dataset(args.dataset, args.data_root, split="train", image_size=args.image_size)
    if args.dataset in ("folder", "captions"):  # no splits: hold out a seeded 10 % to test on
        order = np.random.default_rng(args.seed).permutation(len(train))
        held = max(1, len(train) // 10)
        train, test = (torch.utils.data.Subset(train, sorted(order[held:].tolist())),
                       torch.utils.data.Subset(train, sorted(order[:held].tolist())))
        train.num_classes = train.dataset.num_classes
        print(f"{args.dataset} has no test split: testing on a held-out 10 % ({held} images)")
    else:
        test = corrupt.load_dataset(args.dataset, args.data_root, split="test", image_size=args.image_size)
    x0 = train[0][0]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = Classifier(train.num_classes, x0.shape[-1], x0.shape[0]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True)
    steps = min(args.epochs * len(loader), args.max_steps or float("inf"))
    batches = (batch for _ in range(args.epochs) for batch in loader)
    for _, (x, y) in zip(tqdm(range(steps), desc="classifier"), batches):
        loss = F.cross_entropy(model(x.to(device)), torch.as_tensor(y).to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(test, batch_size=500):
            correct += (model(x.to(device)).argmax(1).cpu() == torch.as_tensor(y)).sum().item()
    accuracy = correct / len(test)
    torch.save({"model": model.cpu().state_dict(), "num_classes": train.num_classes, "image_size": x0.shape[-1],
                "channels": x0.shape[0], "dataset": args.dataset, "test_accuracy": accuracy}, args.out)
    print(f"test accuracy {accuracy:.4f} ({len(test)} images); wrote {args.out}")
    return accuracy


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train-classifier"]:
        return train_classifier(argv[1:])
    return main_eval(argv)


if __name__ == "__main__":
    main()
