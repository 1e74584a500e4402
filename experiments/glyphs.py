"""Many classes of real images, offline: CJK ideographs rendered from the fonts of Debian packages.

The paper's positive results all have 1,000 classes or free text, with more classes than
embedding dimensions (IN-1K: 1,000 classes, a 512-d embedding). This builds such a setting at a
size this CPU holds: 128 characters (classes, twice the `digits` U-Net's 64-d class embedding),
each drawn in every distinct font design that really has it (images). Nothing rendered is
committed: the fonts are free Debian packages (all in main) and this script renders them.

    python -m experiments.glyphs --install           # apt-get the font packages (root)
    python -m experiments.glyphs --out runs/glyphs   # render: glyphs.npz, glyphs.json, fonts.png

How (each step recorded in glyphs.json):
- faces: every face of every font file of PACKAGES (a .ttc holds several);
- characters: CJK Unified Ideographs (U+4E00-U+9FFF) that the cmap of every face with at least
  MIN_COVERAGE of them maps, and whose rendering in every face has ink and differs from that
  face's missing-glyph box (some fonts draw a fallback for what they lack); faces FreeType
  cannot draw, or that draw most of a probe as blanks or boxes, are set aside;
- designs: faces compared on a seeded sample of those characters; a face is dropped when its
  glyphs correlate above THRESHOLD with a face kept before it (regular / proportional twins,
  the language variants of one family, near-identical weights);
- classes: a seeded draw of K of the characters.
Glyphs are white on black, rendered at 4x, the ink centred, shrunk only when it would not fit,
then averaged down to 32x32. Mirrored glyphs are other characters: no flips anywhere.
"""
import argparse
import os
import subprocess

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from support import system

PACKAGES = (  # Debian main, free licences; about 630 MB installed
    "fonts-arphic-bkai00mp", "fonts-arphic-bsmi00lp", "fonts-arphic-gbsn00lp",
    "fonts-arphic-gkai00mp", "fonts-arphic-ukai", "fonts-arphic-uming", "fonts-babelstone-han",
    "fonts-cns11643-kai", "fonts-cns11643-sung", "fonts-cwtex-fs", "fonts-cwtex-heib",
    "fonts-cwtex-kai", "fonts-cwtex-ming", "fonts-cwtex-yen", "fonts-dejima-mincho",
    "fonts-droid-fallback", "fonts-hanazono", "fonts-horai-umefont", "fonts-ipaexfont-gothic",
    "fonts-ipaexfont-mincho", "fonts-ipafont-gothic", "fonts-ipafont-mincho",
    "fonts-ipamj-mincho", "fonts-kiloji", "fonts-klee", "fonts-konatu", "fonts-kouzan-mouhitsu",
    "fonts-aoyagi-kouzan-t", "fonts-aoyagi-soseki", "fonts-lxgw-wenkai", "fonts-migmix",
    "fonts-misaki", "fonts-mona", "fonts-monapo", "fonts-morisawa-bizud-gothic",
    "fonts-morisawa-bizud-mincho", "fonts-motoya-l-cedar", "fonts-motoya-l-maruberi",
    "fonts-oradano-mincho-gsrr", "fonts-sawarabi-gothic", "fonts-sawarabi-mincho", "fonts-seto",
    "fonts-smiley-sans", "fonts-takao-gothic", "fonts-takao-mincho", "fonts-umeplus",
    "fonts-umeplus-cl", "fonts-vlgothic", "fonts-wqy-microhei", "fonts-wqy-zenhei",
    "fonts-yusei-magic", "fonts-unifont", "fonts-baekmuk", "fonts-unfonts-core", "fonts-noto-cjk",
    "fonts-mplus")
CJK = range(0x4E00, 0xA000)  # CJK Unified Ideographs
MIN_COVERAGE = 2000  # faces with fewer ideographs (Latin or Hangul faces) are not glyph fonts
THRESHOLD = 0.9  # correlation above which two faces are one design
SIZE, OVERSAMPLE = 32, 4
MISSING = chr(0x10FFFD)  # a private-use code point no font maps: its missing-glyph box


def install(packages=PACKAGES):
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *packages],
                   check=True)


def font_files(packages):
    """(package, path) of every font file the installed packages hold (links resolved)."""
    found = []
    for package in packages:
        listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True)
        if listing.returncode != 0:
            raise SystemExit(f"font package {package} is not installed: run `python -m "
                             "experiments.glyphs --install` (as root)")
        paths = sorted({os.path.realpath(p) for p in listing.stdout.split()
                        if p.lower().endswith((".ttf", ".otf", ".ttc")) and os.path.isfile(p)})
        found += [(package, p) for p in paths]
    return found


def faces(packages):
    """Every face with at least MIN_COVERAGE ideographs: dicts of package, path, index, name and
    the set of ideographs its cmap maps."""
    from fontTools.ttLib import TTCollection, TTFont  # fontTools reads the cmaps
    out = []
    for package, path in font_files(packages):
        count = len(TTCollection(path).fonts) if path.lower().endswith(".ttc") else 1
        for index in range(count):
            font = TTFont(path, fontNumber=index, lazy=True)
            mapped = {c for c in (font.getBestCmap() or {}) if c in CJK}
            if len(mapped) >= MIN_COVERAGE:
                out.append(dict(package=package, path=path, index=index, mapped=mapped,
                                name=font["name"].getDebugName(4)))
    return out


def render(face, chars):
    """uint8 [len(chars), SIZE, SIZE]: white glyphs on black, the ink centred."""
    big = SIZE * OVERSAMPLE
    font = ImageFont.truetype(face["path"], int(big * 0.875), index=face["index"])
    glyphs = []
    for ch in chars:
        canvas = Image.new("L", (2 * big, 2 * big))
        ImageDraw.Draw(canvas).text((big, big), ch, fill=255, font=font, anchor="mm")
        box = canvas.getbbox()
        glyph = Image.new("L", (big, big))
        if box is not None:
            ink = canvas.crop(box)
            fit = min(1.0, (big - 2 * OVERSAMPLE) / max(ink.size))  # a 1-pixel margin
            if fit < 1:
                ink = ink.resize((max(1, round(ink.width * fit)), max(1, round(ink.height * fit))),
                                 Image.LANCZOS)
            glyph.paste(ink, ((big - ink.width) // 2, (big - ink.height) // 2))
        glyphs.append(np.asarray(glyph.resize((SIZE, SIZE), Image.BOX)))
    return np.stack(glyphs)


def renders(face, chars):
    """Whether FreeType can draw the face (some fonts' hinting programs fail: 'invalid
    opcode')."""
    try:
        render(face, chars)
        return True
    except OSError:
        return False


def drawable(face_list, candidates):
    """The candidates every face draws with ink and not as its missing-glyph box."""
    keep = np.ones(len(candidates), dtype=bool)
    for face in face_list:
        images = render(face, candidates + [MISSING]).astype(np.int16)
        inked = images[:-1].reshape(len(candidates), -1).max(1) > 0
        fallback = (np.abs(images[:-1] - images[-1]).reshape(len(candidates), -1).max(1) == 0)
        keep &= inked & ~fallback
    return [c for c, k in zip(candidates, keep) if k]


def correlation(a, b):
    """Mean Pearson correlation of two faces' glyphs of the same characters ([n, H, W] each)."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    return float(((a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1) + 1e-12)).mean())


def distinct(face_list, images, threshold=THRESHOLD):
    """Indices of the faces kept (in order, each unlike every face kept before it) and, for each
    dropped face, the kept face it matched and their correlation."""
    kept, dropped = [], {}
    for i in range(len(face_list)):
        scores = [(correlation(images[i], images[j]), j) for j in kept]
        best = max(scores, default=(-1.0, None))
        if best[0] > threshold:
            dropped[i] = best
        else:
            kept.append(i)
    return kept, dropped


def build(out, classes=128, seed=0, packages=PACKAGES, probe=64):
    """Render the glyph set into OUT/glyphs.npz (images uint8 [fonts, classes, 32, 32], chars)
    and OUT/glyphs.json (faces kept and dropped, the counts at each step)."""
    face_list = faces(packages)
    if not face_list:
        raise SystemExit(f"no installed face of {len(packages)} packages has {MIN_COVERAGE} "
                         "ideographs")
    shared = sorted(set.intersection(*(f["mapped"] for f in face_list)))
    rng = np.random.default_rng(seed)
    order = [chr(c) for c in rng.permutation(shared)]
    broken = [f for f in face_list if not renders(f, order[:probe])]
    # a cmap that maps ideographs the face then draws blank or as its missing-glyph box
    hollow = [f for f in face_list if f not in broken
              and len(drawable([f], order[:probe])) < probe // 2]
    face_list = [f for f in face_list if f not in broken + hollow]
    sample = drawable(face_list, order[:probe])  # the characters the designs are compared on
    kept, dropped = distinct(face_list, [render(f, sample) for f in face_list])
    designs = [face_list[i] for i in kept]
    chars, start = [], 0
    while len(chars) < classes and start < len(order):  # the first K drawable, in seeded order
        chars += drawable(designs, order[start:start + 2 * classes])[:classes - len(chars)]
        start += 2 * classes
    if len(chars) < classes:
        raise SystemExit(f"only {len(chars)} characters are drawn by all {len(designs)} designs")
    images = np.stack([render(f, chars) for f in designs])  # [fonts, classes, H, W]
    os.makedirs(out, exist_ok=True)
    system.write_atomic(os.path.join(out, "glyphs.npz"),
                        lambda tmp: np.savez(tmp, images=images, chars=np.array(chars)))
    describe = lambda f: {k: f[k] for k in ("package", "path", "index", "name")}  # noqa: E731
    record = {"packages": list(packages), "faces": len(face_list), "shared_ideographs": len(shared),
              "unrenderable": [describe(f) for f in broken],
              "draw_fallbacks": [describe(f) for f in hollow],
              "designs": [describe(f) for f in designs], "threshold": THRESHOLD, "seed": seed,
              "dropped": [{**describe(face_list[i]), "like": face_list[j]["name"], "r": r}
                          for i, (r, j) in dropped.items()],
              "chars": "".join(chars), "size": SIZE}
    system.write_json(os.path.join(out, "glyphs.json"), record)
    plot_fonts(images, [f["name"] for f in designs], os.path.join(out, "fonts.png"))
    return images, chars, record


def plot_fonts(images, names, path, per_font=16):
    """One row per design: its first glyphs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = np.concatenate([np.concatenate(list(f[:per_font]), axis=1) for f in images])
    fig, ax = plt.subplots(figsize=(per_font * 0.5 + 2.5, len(images) * 0.5 + 0.5))
    ax.imshow(rows, cmap="gray", vmin=0, vmax=255)
    ax.set(xticks=[], yticks=SIZE * np.arange(len(names)) + SIZE / 2)
    ax.set_yticklabels(names, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load(out):
    """(images uint8 [fonts, classes, 32, 32], chars) as build wrote them."""
    path = os.path.join(out, "glyphs.npz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no glyph set at {path}: `python -m experiments.glyphs --out "
                                f"{out}`")
    with np.load(path) as f:
        return f["images"], [str(c) for c in f["chars"]]


# ----------------------------------------------------------------------------- the sweep's split

def split(size):
    """The glyph setting of experiments/sweep.py: images uint8 [classes x designs, 1, 32, 32]
    (index k * designs + f), labels, and per class a seeded random split of its designs into
    train / classifier / reference (size["fonts"]) and floor (the rest); unseen (the copy rate's
    other images): the first as many non-training designs as train has."""
    root = size["data_root"]
    if not os.path.exists(os.path.join(root, "glyphs.npz")):
        build(root, size["classes"], packages=size.get("packages", PACKAGES))
    glyphs, _ = load(root)  # [designs, classes, H, W]
    designs, classes = glyphs.shape[:2]
    n = size["fonts"]
    if n["train"] + n["classifier"] + n["reference"] >= designs:
        raise SystemExit(f"{root} holds {designs} designs: too few for {n} and a floor")
    images = torch.from_numpy(glyphs.transpose(1, 0, 2, 3).reshape(-1, 1, *glyphs.shape[2:]))
    labels = np.repeat(np.arange(classes), designs)
    rng = np.random.default_rng(0)
    parts = {k: [] for k in ("train", "classifier", "reference", "floor", "unseen")}
    for k in range(classes):
        order = k * designs + rng.permutation(designs)
        ends = np.cumsum([n["train"], n["classifier"], n["reference"]])
        for name, chunk in zip(("train", "classifier", "reference", "floor"),
                               np.split(order, ends)):
            parts[name].append(chunk)
        parts["unseen"].append(order[n["train"]:2 * n["train"]])
    return images, labels, {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


def write_folder(images, labels, folder):
    """The images as a class folder of PNGs (FOLDER/<class>/<i>.png), for train_vae.py."""
    for i, (image, label) in enumerate(zip(images, labels)):
        os.makedirs(os.path.join(folder, f"{label:03d}"), exist_ok=True)
        Image.fromarray(image[0].numpy()).save(os.path.join(folder, f"{label:03d}", f"{i}.png"))
    return folder


class Shifted(torch.utils.data.Dataset):
    """A dataset whose images move by up to `pixels` in x and y, drawn afresh at every read
    (torch's global generator): the feature classifier's augmentation, as fonts place glyphs
    differently."""

    def __init__(self, dataset, pixels):
        self.dataset, self.pixels = dataset, pixels

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        dy, dx = torch.randint(0, 2 * self.pixels + 1, (2,)).tolist()
        p, (h, w) = self.pixels, image.shape[-2:]
        padded = torch.nn.functional.pad(image, (p, p, p, p), value=-1.0)  # black background
        return padded[..., dy:dy + h, dx:dx + w], label


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=system.HelpFormatter)
    p.add_argument("--install", action="store_true", help="apt-get the font packages, then stop")
    p.add_argument("--out", default="runs/glyphs", help="folder for glyphs.npz / .json / fonts.png")
    p.add_argument("--classes", type=int, default=128, help="characters (classes) to render")
    p.add_argument("--seed", type=int, default=0, help="seed of the characters' draw")
    args = p.parse_args(argv)
    if args.install:
        return install()
    images, chars, record = build(args.out, args.classes, args.seed)
    print(f"{len(record['designs'])} designs (of {record['faces']} faces) x {len(chars)} "
          f"characters (of {record['shared_ideographs']} shared) -> {args.out}/glyphs.npz")


if __name__ == "__main__":
    main()
