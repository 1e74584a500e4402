"""Image sets for metrics.py: the sources it reads, --fake run labels, a sharded pass.

A source is an .npz (arr_0 uint8 NHWC, streamed from the zip: sample.py's output or an ADM
reference batch; a pytorch-fid statistics file with mu / sigma), an image folder, or
"dataset:NAME[:SPLIT]" (data.py). FID's streamed feature pass and the feature cache are in
metrics.py, beside the Gaussian fit they feed.
"""
import concurrent.futures
import glob
import hashlib
import os
import re
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from support import data, system


# --------------------------------------------------------------------------------------------
# Image sources: .npz (streamed from the zip, no full load), folders, datasets of data.py
# --------------------------------------------------------------------------------------------

class NpzSource:
    """arr_0 uint8 [N, H, W(, C)] read in slices; labels / captions / mu / sigma when present."""

    def __init__(self, path):
        self.path = path
        try:
            with np.load(path, allow_pickle=False) as f:
                self.extra = {k: f[k] for k in f.files if k != "arr_0"}
            self.zip = zipfile.ZipFile(path)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path} cannot be read ({e}): cut short or not an .npz; write it "
                             "again") from None
        self.labels = self.extra.get("labels")
        self.captions = self.extra.get("captions")
        self.length = 0
        if "arr_0.npy" not in self.zip.namelist() and "mu" not in self.extra:
            raise ValueError(f"{path} holds neither images (arr_0) nor FID statistics (mu, "
                             f"sigma), only {sorted(self.extra) or 'nothing'}")
        if "arr_0.npy" in self.zip.namelist():
            with self.zip.open("arr_0.npy") as fh:
                version = np.lib.format.read_magic(fh)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}
                self.shape, fortran, dtype = read_header[version](fh)
                self.offset = fh.tell()
            if dtype != np.uint8 or fortran or len(self.shape) not in (3, 4):
                raise ValueError(f"{path}: arr_0 must be a C-ordered uint8 array [N, H, W, C], got "
                                 f"{dtype} {self.shape}")
            if len(self.shape) == 4 and self.shape[-1] not in (1, 3) and self.shape[1] in (1, 3):
                raise ValueError(f"{path}: arr_0 {self.shape} looks channel-first [N, C, H, W]; "
                                 f"images must be channel-last [N, H, W, C] "
                                 f"(np.transpose(x, (0, 2, 3, 1)))")
            if len(self.shape) == 4 and self.shape[-1] not in (1, 3):
                raise ValueError(f"{path}: arr_0 {self.shape} has {self.shape[-1]} channels; "
                                 "images must be grey (1) or RGB (3)")
            if self.shape[0] and min(self.shape[1:3]) < 4:
                raise ValueError(f"{path}: arr_0 {self.shape} holds images under 4x4 pixels: "
                                 "too small for a feature network (a wrong shape?)")
            self.length = self.shape[0]
            self.fh, self.pos = None, None
        if self.labels is not None and (self.labels.dtype.kind not in "iu"
                                        or self.labels.shape != (self.length,)):
            raise ValueError(f"{path}: labels must be {self.length} integer class indices, one "
                             f"per image; found {self.labels.dtype} {self.labels.shape}")

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
        def decode(path):
            with Image.open(path) as im:
                return np.asarray(data.to_8bit(im).convert("RGB"))
        images = list(self.pool.map(decode, self.files[start:stop]))
        if len({im.shape for im in images}) > 1:
            raise ValueError(f"images under '{self.path}' differ in size; resize/crop them first "
                             "(as ADM's reference batches)")
        return np.stack(images)

    def cache_id(self):
        """Every file's name, size and modification time: images rewritten in place are new."""
        stamp = hashlib.sha1()
        for f in self.files:
            st = os.stat(f)
            stamp.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return f"{os.path.abspath(self.path)}|{stamp.hexdigest()}"


class DatasetSource:
    """"dataset:NAME[:SPLIT]" through data.load_dataset (e.g. the Fashion-MNIST test set)."""

    def __init__(self, spec, root, image_size):
        _, name, split = (spec.split(":") + ["test"])[:3]
        self.id = f"{spec}|{root}|{image_size}"
        self.path = spec
        self.ds = data.load_dataset(name, root, split=split, image_size=image_size)
        self.labels = getattr(self.ds, "labels", None)
        self.captions = getattr(self.ds, "captions", None)
        self.extra = {}

    def __len__(self):
        return len(self.ds)

    def read(self, start, stop):
        images = getattr(self.ds, "images", None)
        # in-memory datasets: uint8 NCHW
        if torch.is_tensor(images) and images.dtype == torch.uint8:
            return images[start:stop].permute(0, 2, 3, 1).numpy()
        x = torch.stack([self.ds[i][0] for i in range(start, stop)])  # float [-1, 1] CHW
        return data.to_uint8(x).permute(0, 2, 3, 1).numpy()

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
# --fake labels and a sharded pass over a source
# --------------------------------------------------------------------------------------------

def run_label(path):
    """runs/clean/samples -> "clean"; other paths -> their name without extension."""
    base = os.path.basename(path)
    if base == "samples":
        return os.path.basename(os.path.dirname(path))
    return os.path.splitext(base)[0]


def fake_runs(specs):
    """--fake [LABEL=]PATH -> [(label, scale or None, path)]; a sample.py folder gives one per
    scale."""
    rows = []
    for spec in specs:
        if os.path.exists(spec) or "=" not in spec:  # a path, '=' and all
            label, path = "", spec
        else:  # LABEL=PATH, split at the first '='
            label, _, path = spec.partition("=")
        path = os.path.normpath(path)
        scale_dir = re.fullmatch(r"s([0-9.]+)", os.path.basename(os.path.dirname(path)))
        sweep = sorted(glob.glob(os.path.join(path, "s*", "samples.npz")),
                       key=lambda p: float(os.path.basename(os.path.dirname(p))[1:]))
        if os.path.basename(path) == "samples.npz" and scale_dir:  # OUT/s{scale}/samples.npz
            rows.append((label or run_label(os.path.dirname(os.path.dirname(path))),
                         float(scale_dir[1]), path))
        elif os.path.isdir(path) and sweep:
            rows += [(label or run_label(path), float(os.path.basename(os.path.dirname(p))[1:]), p)
                     for p in sweep]
        else:
            rows.append((label or run_label(path), None, path))
    return rows


@torch.no_grad()
def distributed_pass(source, batch_size, fn, desc):
    """Sum fn(uint8 batch, start, stop) -> (sum, count) over all images, sharded over ranks."""
    rank, size = system.rank_and_world()
    lo, hi = rank * len(source) // size, (rank + 1) * len(source) // size
    total = torch.zeros(2, dtype=torch.float64)
    for start in tqdm(range(lo, hi, batch_size), desc=desc, disable=rank != 0):
        stop = min(start + batch_size, hi)
        images = torch.from_numpy(source.read(start, stop)).permute(0, 3, 1, 2)  # NHWC -> NCHW
        total += torch.tensor(fn(images, start, stop), dtype=torch.float64)
    if size > 1:
        total = total.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


