"""The datasets and the latent cache: every image a run trains on or is scored against.

load_dataset(name) returns (image float32 CHW in [-1, 1], condition) per index:
    digits          scikit-learn's bundled 1,797 real 8x8 digits; needs no setup (the default).
    fashion-mnist   the idx files of the Debian package dataset-fashion-mnist.
    folder          an ImageNet-style class folder (root/<class>/<image>), ADM center crop.
    captions        a TSV of path<TAB>caption (the common CC3M export), ADM center crop.
digits and fashion-mnist live in memory as one uint8 tensor `.images` [N, C, H, W] so that
train.py can index whole batches. __getitem__ reads the condition from `.labels` / `.captions`.

The order in which train.py reads them (one seeded permutation per epoch, the same for any number
of processes) is here too. The latent cache (`python -m support.encode`) holds every image encoded
by an f4 autoencoder, as LDM trains on latents (App. B.3), and with --flip its horizontal mirror
too (LDM flips ImageNet; mirrored footwear or glyphs are other images, so it is a choice):
LatentCache reads it.
"""
import functools
import gzip
import hashlib
import json
import math
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from support import system


DATASETS = ("digits", "fashion-mnist", "folder", "captions")
FILE_DATASETS = ("folder", "captions")  # read from files, no splits of their own
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DIGITS_TEST_FRACTION = 0.1  # digits has no official split: a fixed seeded 90/10 split
DEFAULT_FILE_IMAGE_SIZE = 256  # the paper's ImageNet / CC3M resolution


# ----------------------------------------------------------------------------- pixels

def to_float(images):
    """uint8 images (any shape) -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_uint8(x):
    """float images in [-1, 1] (any shape) -> uint8, clamped and rounded."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ----------------------------------------------------------------------------- datasets


class InMemoryDataset(torch.utils.data.Dataset):
    """Class-labelled images held as one uint8 tensor [N, C, H, W] (digits, Fashion-MNIST)."""

    def __init__(self, images, labels, class_names):
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.captions = None
        self.paths = None
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.channels, self.image_size = images.shape[1], images.shape[2]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return to_float(self.images[i]), int(self.labels[i])


class FileDataset(torch.utils.data.Dataset):
    """Images read from files on demand, with class labels (folder) or captions (TSV). Grayscale
    folders stay one channel (see file_channels); transparent images are composited onto white."""

    def __init__(self, paths, image_size, labels=None, class_names=None, captions=None):
        self.paths = list(paths)
        self.images = None  # loaded lazily, one file per __getitem__
        self.image_size, self.channels = image_size, file_channels(self.paths)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.class_names = None if class_names is None else list(class_names)
        self.num_classes = None if class_names is None else len(class_names)
        self.captions = None if captions is None else list(captions)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        image = read_image(self.paths[i], self.image_size, self.channels)
        condition = int(self.labels[i]) if self.labels is not None else self.captions[i]
        return image, condition


GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def is_grayscale(im):
    """A grayscale mode, or colour pixels whose channels are all equal (grey saved as RGB)."""
    if im.mode in GRAY_MODES:
        return True
    rgb = np.asarray(im.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def to_8bit(im):
    """16-bit grey images (PNG mode I;16, or I) scaled to 8 bits; PIL's convert would clip every
    value above 255 to white. Other modes as they are."""
    if not (im.mode.startswith("I;16") or im.mode == "I"):
        return im
    values = np.asarray(im, dtype=np.float64)
    if im.mode == "I" and values.max() <= 255:  # 8-bit values stored as 32-bit integers
        return Image.fromarray(values.astype(np.uint8), "L")
    return Image.fromarray(np.clip(np.rint(values / 257), 0, 255).astype(np.uint8), "L")


IMAGE_ERRORS = (OSError, ValueError, Image.DecompressionBombError)  # what PIL raises for a file


def file_channels(paths, probe=2000):
    """1 when the files are all grayscale, else 3: three equal channels would triple the work and
    leave the model a direction the data never uses. Every file is looked at up to `probe` files,
    else `probe` files spread evenly over the sorted list (every class of a class folder). Warns
    once when some have transparency (composited onto white, not stripped of their alpha)."""
    gray, transparent = [], False
    ordered = sorted(paths)
    spread = np.unique(np.linspace(0, len(ordered) - 1, min(probe, len(ordered))).round())
    for path in [ordered[int(i)] for i in spread]:
        try:
            with Image.open(path) as im:
                transparent |= im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
                gray.append(is_grayscale(im))
        except IMAGE_ERRORS:  # named when it is read (--check-images lists them all)
            continue
    if transparent:
        print("note: some images have transparency; they are composited onto a white background")
    return 1 if gray and all(gray) else 3


def unreadable_images(paths):
    """[(path, error)] of the files PIL cannot decode (every file is read: slow on large sets)."""
    bad = []
    for path in tqdm(paths, desc="check images", leave=False):
        try:
            with Image.open(path) as im:
                im.load()
        except IMAGE_ERRORS as e:
            bad.append((path, str(e)))
    return bad


def center_crop_arr(pil_image, image_size):
    """ADM's center crop (guided-diffusion, also DiT): box-halve, bicubic resize, crop."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size),
                                 resample=Image.BICUBIC)
    arr = np.array(pil_image)
    y, x = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[y:y + image_size, x:x + image_size]


class UnreadableImage(RuntimeError):
    """An image file that cannot be read (named in the message)."""


def read_image(path, image_size, channels=3):
    """One image file -> float32 [channels, S, S] in [-1, 1]; transparent pixels are composited
    onto white; an unreadable file names itself."""
    try:
        with Image.open(path) as im:
            im = to_8bit(im).convert("RGBA")  # every mode, palettes with transparency included
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(white, im).convert("L" if channels == 1 else "RGB")
    except IMAGE_ERRORS as e:  # PIL.UnidentifiedImageError is an OSError
        raise RuntimeError(f"cannot read image file {path}: {e}") from e
    arr = center_crop_arr(im, image_size)
    arr = arr[:, :, None] if arr.ndim == 2 else arr  # [S, S, C]
    return to_float(torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1))


def resize_uint8(images, size):
    """Antialiased bilinear resize of uint8 [N, C, H, W] images (e.g. digits 8x8 -> 16x16)."""
    x = F.interpolate(to_float(images), size=(size, size), mode="bilinear", antialias=True,
                      align_corners=False)
    return to_uint8(x)


def load_digits_dataset(split="train"):
    """scikit-learn's bundled digits: 1,797 real 8x8 images, values 0..16, 10 classes."""
    from sklearn.datasets import load_digits
    if split not in ("train", "test", "all"):
        raise ValueError(f"digits split must be train, test or all, not {split!r}")
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
    labels = digits.target.astype(np.int64)
    if split != "all":
        order = np.random.default_rng(0).permutation(len(labels))
        n_test = round(DIGITS_TEST_FRACTION * len(labels))
        keep = np.sort(order[:n_test] if split == "test" else order[n_test:])
        images, labels = images[keep], labels[keep]
    return InMemoryDataset(torch.from_numpy(images)[:, None], labels, [str(d) for d in range(10)])


def read_idx(path):
    """An idx file (MNIST format, optionally gzipped) -> numpy uint8 array."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # a cut-short or damaged .gz
        raise ValueError(f"cannot read {path}: {e}") from None
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # 0x0000 08 ndim: unsigned byte data
        raise ValueError(f"{path} is not an idx file of unsigned bytes (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = [int.from_bytes(data[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim)]
    if len(data) - 4 - 4 * ndim != math.prod(shape):
        raise ValueError(f"{path} is truncated: {len(data) - 4 - 4 * ndim} of {math.prod(shape)} "
                         "bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(root=None, split="train", pad=False):
    """Fashion-MNIST from its idx files: 60,000 train / 10,000 test 28x28 images, 10 classes.

    pad=True zero-pads 28x28 -> 32x32 (background is 0) so an f4 autoencoder / a U-Net with
    several 2x downsamplings gets a size divisible by a power of two.
    """
    root = root or FASHION_MNIST_ROOT
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"fashion-mnist split must be train or test, not {split!r}")
    arrays = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        path = os.path.join(root, f"{prefix}-{kind}.gz")
        if not os.path.exists(path) and os.path.exists(path[:-3]):
            path = path[:-3]  # already gunzipped
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"Fashion-MNIST file {path} not found. Install the Debian package (apt-get install "
                f"dataset-fashion-mnist, files in {FASHION_MNIST_ROOT}) or put the four *-ubyte.gz "
                f"files of https://github.com/zalandoresearch/fashion-mnist into {root}")
        arrays.append(read_idx(path))
    images, labels = torch.from_numpy(arrays[0].copy())[:, None], arrays[1].astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST in {root}: {len(images)} images but {len(labels)} labels")
    if pad:
        images = F.pad(images, (2, 2, 2, 2))
    return InMemoryDataset(images, labels, FASHION_MNIST_CLASSES)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def load_image_folder(root, image_size):
    """An ImageNet-style folder root/<class>/<image>; labels follow sorted class names. A class
    folder may be a link; inside a class, linked folders are not followed (a link to a parent
    would read the whole tree again under this class), linked files are read."""
    if root is None or not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} not found (expected root/<class>/<image>, "
                                f"e.g. the ImageNet train folder)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    paths, labels, skipped = [], [], 0
    for label, name in enumerate(classes):
        for folder, dirs, files in sorted(os.walk(os.path.join(root, name), followlinks=False)):
            skipped += sum(os.path.islink(os.path.join(folder, d)) for d in dirs)
            found = sorted(f for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
            paths += [os.path.join(folder, f) for f in found]
            labels += [label] * len(found)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders "
                                f"under {root}")
    if skipped:
        print(f"note: {skipped} linked folders inside the classes of {root} are not followed")
    return FileDataset(paths, image_size, labels=labels, class_names=classes)


def load_caption_tsv(path, image_size):
    """A TSV of image_path<TAB>caption per line; paths are relative to the TSV's folder."""
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"caption file {path} not found (expected a TSV of "
                                f"image_path<TAB>caption lines, e.g. a CC3M export)")
    base = os.path.dirname(os.path.abspath(path))
    paths, captions = [], []
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not part of a path
            lines = f.read().split("\n")  # str.splitlines would split captions at U+2028
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 ({e.reason} at byte {e.start}): save it as "
                         "UTF-8") from None
    for line_number, line in enumerate(lines, 1):
        line = line.removesuffix("\r")
        if not line:
            continue
        if "\t" not in line:
            raise ValueError(f"{path}:{line_number}: expected image_path<TAB>caption")
        image_path, caption = line.split("\t", 1)
        paths.append(os.path.join(base, image_path))
        captions.append(caption)
    if not paths:
        raise ValueError(f"caption file {path} has no entries")
    empty = sum(not c.strip() for c in captions)
    if empty:
        print(f"note: {empty} of the {len(captions)} captions in {path} are empty: they train as "
              "the null condition of classifier-free guidance")
    return FileDataset(paths, image_size, captions=captions)


def add_dataset_arguments(parser):
    """The flags of load_dataset on a command line (support/encode.py, experiments/train_vae.py)."""
    parser.add_argument("--dataset", required=True,
                        help=f"load_dataset name: {', '.join(DATASETS)} (data.py)")
    parser.add_argument("--data-root", default=None, help="dataset location (see data.py)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="resize images to this size (data.load_dataset)")
    parser.add_argument("--pad", action="store_true",
                        help="fashion-mnist: zero-pad 28x28 to 32x32 (8x8 latents at f4)")


def load_dataset(name, root=None, split="train", image_size=None, pad=False):
    """The datasets of this repo by name (see DATASETS).

    root: fashion-mnist folder (default /usr/share/datasets/fashion-mnist), the class folder,
        or the caption TSV file; unused for digits.
    split: digits "train" (90 %), "test" (10 %) or "all"; fashion-mnist "train" or "test";
        unused for folder / captions (point root at the split you want).
    image_size: output size; None keeps digits 8 and Fashion-MNIST 28 (32 with pad) and uses 256
        for file datasets. In-memory datasets are resized (antialiased bilinear) when it differs.
    pad: fashion-mnist only, zero-pad 28 -> 32 (for f4 autoencoders / U-Net downsampling).
    """
    if pad and name != "fashion-mnist":
        raise ValueError("pad applies to fashion-mnist only")
    if name == "digits":
        dataset = load_digits_dataset(split)
    elif name == "fashion-mnist":
        dataset = load_fashion_mnist(root, split, pad)
    elif name == "folder":
        return load_image_folder(root, image_size or DEFAULT_FILE_IMAGE_SIZE)
    elif name == "captions":
        return load_caption_tsv(root, image_size or DEFAULT_FILE_IMAGE_SIZE)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if image_size is not None and image_size != dataset.image_size:
        dataset = InMemoryDataset(resize_uint8(dataset.images, image_size), dataset.labels,
                                  dataset.class_names)
    return dataset


def per_class_indices(labels, n, seed):
    """n indices of every class, drawn at random without replacement by `seed` (a stratified
    split fixed by its seed, not by the dataset's order: scikit-learn's digits are stored in
    blocks of writers, so the first n of a class come from a few writers only). Sorted."""
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    if n < 1 or counts.min() < n:
        raise ValueError(f"--train-per-class must be in [1, {counts.min()}], got {n}")
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), n, replace=False)
                                   for c in range(len(counts))]))


def per_class_subset(ds, n, seed):
    """(the in-memory dataset restricted to per_class_indices(ds.labels, n, seed), those
    indices)."""
    if not isinstance(ds, InMemoryDataset):
        raise ValueError("--train-per-class applies to the in-memory datasets (digits, "
                         "fashion-mnist)")
    keep = per_class_indices(ds.labels, n, seed)
    return InMemoryDataset(ds.images[torch.from_numpy(keep)], ds.labels[keep], ds.class_names), keep


def train_test_split(name, root, image_size=None, pad=False, seed=0):
    """(train, test) of a dataset: its own splits, or for file datasets (folders and caption
    files have none) a seeded 10 % held out of the folder (Subsets that keep num_classes)."""
    train = load_dataset(name, root, "train", image_size, pad)
    if name not in FILE_DATASETS:
        return train, load_dataset(name, root, "test", image_size, pad)
    order = np.random.default_rng(seed).permutation(len(train))
    held = max(1, len(train) // 10)
    parts = []
    for indices in (order[held:], order[:held]):
        part = torch.utils.data.Subset(train, sorted(indices.tolist()))
        part.num_classes = train.num_classes
        parts.append(part)
    print(f"{name} has no test split: testing on a held-out 10 % ({held} images)")
    return tuple(parts)


# ----------------------------------------------------------------------------- training order
# One seeded permutation per epoch, whatever the number of processes; each step's global batch
# is cut into the ranks' micro-batches (train.py).

@functools.lru_cache(maxsize=4)
def epoch_permutation(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(system.seed_of(seed, epoch)))


def global_indices(step, global_batch, n, seed):
    """Dataset indices of the global batch at `step`: one seeded permutation per epoch."""
    k = torch.arange(step * global_batch, (step + 1) * global_batch)
    epochs, pos = k // n, k % n
    out = torch.empty_like(k)
    for e in epochs.unique().tolist():
        out[epochs == e] = epoch_permutation(n, seed, e)[pos[epochs == e]]
    return out


class StepBatches(torch.utils.data.Sampler):
    """This rank's micro-batches of every global batch from `start` on (a resumed loader is
    exact). The global batch is cut into world x accum chunks; rank r takes chunks r*accum.. ."""

    def __init__(self, start, steps, batch, world, rank, n, seed, accum=1):
        self.start, self.steps, self.batch, self.accum = start, steps, batch, accum
        self.world, self.rank, self.n, self.seed = world, rank, n, seed

    def __iter__(self):
        for step in range(self.start, self.steps):
            idx = global_indices(step, self.batch * self.world * self.accum, self.n, self.seed)
            for chunk in range(self.rank * self.accum, (self.rank + 1) * self.accum):
                yield idx[chunk * self.batch:(chunk + 1) * self.batch].tolist()

    def __len__(self):
        return (self.steps - self.start) * self.accum


class ImagesOnly(torch.utils.data.Dataset):
    """The dataset's images (conditions come from the corrupted array, not the dataset)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i][0]


# ----------------------------------------------------------------------------- the latent cache
def cache_files(out):
    return {k: os.path.join(out, f) for k, f in dict(meta="meta.json", latents="latents.npy",
                                                     done="done.npy",
                                                     labels="labels.npy",
                                                     captions="captions.json").items()}


def spread_images(dataset, n=1024):
    """n images spread evenly over the dataset (folders are sorted by class) to measure the KL
    scale."""
    return torch.stack([dataset[int(i)][0] for i in np.linspace(0, len(dataset) - 1,
                                                                min(n, len(dataset)))])


def create_cache(model, dataset, out, meta, batch_size, dtype, views):
    """Rank 0: allocate latents [N, views, C, h, w] (views 2: the image and its mirror) and the
    per-chunk done flags; the meta records the model's latent scale."""
    if model.scale is None:
        raise ValueError("the KL autoencoder's latent scale is not set (vae.measure_scale)")
    files = cache_files(out)
    system.out_folder(out)
    with torch.no_grad():
        z = model.latent(dataset[0][0][None].to(next(model.parameters()).device))
    shape = (len(dataset), views, *z.shape[1:])
    np.lib.format.open_memmap(files["latents"], mode="w+", dtype=dtype, shape=shape).flush()
    reserve_disk(files["latents"])  # else a full disk kills the writes to the map with SIGBUS
    chunks = math.ceil(len(dataset) / batch_size)
    np.lib.format.open_memmap(files["done"], mode="w+", dtype=np.bool_, shape=(chunks,)).flush()
    if getattr(dataset, "captions", None) is not None:
        system.write_json(files["captions"], list(dataset.captions))  # caption id = dataset index
    else:
        np.save(files["labels"], np.asarray(dataset.labels, dtype=np.int64))
    system.write_json(files["meta"], {
        **meta, "scale": model.scale, "shape": list(shape), "dtype": np.dtype(dtype).name,
        "chunk": batch_size, "num_classes": getattr(dataset, "num_classes", None),
        "class_names": getattr(dataset, "class_names", None), "complete": False})


def contents_digest(dataset):
    """A hash of what a dataset holds, file names (as given), labels, class names and captions:
    a cache records it, so a folder changed since (a class renamed) is noticed."""
    labels = getattr(dataset, "labels", None)
    contents = {"paths": getattr(dataset, "paths", None), "labels": None if labels is None
                else np.asarray(labels).tolist(), "captions": getattr(dataset, "captions", None),
                "class_names": getattr(dataset, "class_names", None)}
    return hashlib.sha256(json.dumps(contents).encode()).hexdigest()[:16]


def cache_differences(old, meta, dataset, batch_size):
    """What differs between a cache's recorded meta and this command's, one phrase each
    (settings a cache did not yet record are not compared)."""
    differences = [f"{k}: cache {old[k]!r}, now {v!r}" for k, v in meta.items()
                   if k in old and k != "contents_sha256" and old[k] != v]
    if old["shape"][0] != len(dataset):
        differences.append(f"{old['shape'][0]} images in the cache, {len(dataset)} now")
    names = getattr(dataset, "class_names", None) or []
    if old.get("class_names") and old["class_names"] != names:
        renamed = [f"{a} -> {b}" for a, b in zip(old["class_names"], names) if a != b][:3]
        differences.append("class names " + (", ".join(renamed) or f"{len(old['class_names'])} "
                                             f"then, {len(names)} now"))
    changed = old.get("contents_sha256", meta["contents_sha256"]) != meta["contents_sha256"]
    if changed and not differences:
        differences.append("the same number of images, but other files, labels or captions")
    if old["chunk"] != batch_size:
        differences.append(f"--batch-size: cache {old['chunk']}, now {batch_size}")
    return differences


def reserve_disk(path):
    """Allocate a sparse file's blocks now, or stop with one line when the disk has no room."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as e:
            raise SystemExit(f"no room for {path} ({size / 2 ** 30:.2f} GiB: {e.strerror}): "
                             "free some, or choose another --out") from None


@torch.no_grad()
def encode_dataset(model, dataset, out, meta, batch_size=64, dtype=np.float16, num_workers=0,
                   rank=0, world=1, device="cpu"):
    """Encodes every image (and, when meta["flip"], its horizontal mirror) into out/latents.npy.
    Chunk k (images k*B..) is done by rank k % world; done.npy[k] is set after the chunk is
    flushed, so a killed run restarts at the first chunk not recorded (any world size). meta must
    name preset, weights, dataset and flip."""
    files = cache_files(out)
    meta = json.loads(json.dumps({**meta, "contents_sha256": contents_digest(dataset)}))
    if rank == 0:
        if os.path.exists(files["meta"]):
            old = {"flip": True, **json.load(open(files["meta"]))}  # older caches: both flips
            differences = cache_differences(old, meta, dataset, batch_size)
            if differences:
                raise SystemExit(f"{out} holds a different cache ({'; '.join(differences)}): "
                                 "choose another --out, or the same settings to resume it")
        else:
            create_cache(model, dataset, out, meta, batch_size, dtype, 2 if meta["flip"] else 1)
    if world > 1:
        dist.barrier()
    meta = json.load(open(files["meta"]))
    model.scale = meta["scale"]
    latents = np.load(files["latents"], mmap_mode="r+")
    done = np.load(files["done"], mmap_mode="r+")
    mine = range(rank, len(done), world)
    todo = [k for k in mine if not done[k]]
    chunks = [list(range(k * batch_size, min((k + 1) * batch_size, len(dataset)))) for k in todo]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=chunks, num_workers=num_workers)
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"encode (rank {rank})",
               disable=rank != 0, dynamic_ncols=True)
    for k, (x, _) in zip(todo, loader):
        x = x.to(device)
        views = [x, x.flip(-1)] if latents.shape[1] == 2 else [x]
        z = torch.stack([model.encode(v) for v in views], dim=1)  # [B, views, C, h, w]
        latents[k * batch_size:k * batch_size + len(x)] = z.cpu().numpy().astype(latents.dtype)
        latents.flush()
        done[k] = True
        done.flush()
        bar.update()
    bar.close()
    if world > 1:
        dist.barrier()
    if rank == 0 and done.all():
        system.write_json(files["meta"], {**meta, "complete": True})


def read_cache_file(path, read):
    """read(path), or one line naming the file when it is cut short or damaged."""
    try:
        return read(path)
    except (OSError, ValueError) as e:  # numpy and json raise these for a cut file
        raise ValueError(f"{path} cannot be read ({e}): the latent cache is damaged; encode it "
                         "again into a new folder") from None


class LatentCache(torch.utils.data.Dataset):
    """What `support/encode.py` wrote: cache[i] -> (latents [views, C, h, w] float32, label or
    caption), views 2 when the mirror was cached (.flip); .latents (the memmap), .labels (int64
    [N]) or .captions (list[str]), .scale, .num_classes, .class_names (None in caches written
    before they were recorded), .meta."""

    def __init__(self, path):
        files = cache_files(path)
        if not os.path.exists(files["meta"]):
            raise FileNotFoundError(f"no latent cache at {path}: write one with `python -m "
                                    f"support.encode ... --out {path}`")
        self.path = path
        self.meta = read_cache_file(files["meta"], lambda f: json.load(open(f)))
        if not self.meta.get("complete"):
            raise ValueError(f"latent cache {path} is incomplete: rerun the same `support.encode` "
                             "command to resume it")
        self.scale, self.num_classes = self.meta["scale"], self.meta["num_classes"]
        self.class_names = self.meta.get("class_names")
        self.latents = read_cache_file(files["latents"], lambda f: np.load(f, mmap_mode="r"))
        recorded = self.meta.get("shape", list(self.latents.shape))
        if self.latents.ndim != 5 or list(self.latents.shape) != recorded:
            raise ValueError(f"{files['latents']} holds an array of shape "
                             f"{list(self.latents.shape)}, not the [N, views, C, h, w] = "
                             f"{recorded} its meta.json records: the cache is damaged or not "
                             "support.encode's; encode it again into a new folder")
        self.flip = self.latents.shape[1] == 2  # caches written before --flip hold both
        self.labels = self.captions = None
        if os.path.exists(files["labels"]):
            self.labels = read_cache_file(files["labels"], np.load)
        if os.path.exists(files["captions"]):
            self.captions = read_cache_file(files["captions"], lambda f: json.load(open(f)))
        conditions = self.labels if self.labels is not None else self.captions
        if conditions is None or len(conditions) != len(self.latents):
            found = "no labels.npy or captions.json" if conditions is None else (
                f"{len(conditions)} conditions for {len(self.latents)} latents")
            raise ValueError(f"latent cache {path} holds {found}: it is damaged; encode it again "
                             "into a new folder")

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, i):
        z = torch.from_numpy(np.array(self.latents[i], dtype=np.float32))
        if not torch.isfinite(z).all():  # else a NaN loss would blame the learning rate
            raise RuntimeError(f"cannot read latent {i} of {self.path}: it holds NaN or inf; the "
                               "cache is damaged: encode it again into a new folder")
        return z, (self.captions[i] if self.captions is not None else int(self.labels[i]))


