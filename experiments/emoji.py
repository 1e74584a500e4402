"""Real colour images for trying "your own data" offline: the Noto Color Emoji font's bitmaps.

    apt-get install fonts-noto-color-emoji        # the font (Debian); fonttools is a PyPI package
    python -m experiments.emoji --out data/emoji  # 6 classes, 418 images
    python train.py --dataset folder --data-root data/emoji --image-size 16 --steps 3000

Writes one folder per class (OUT/face/grinning-face.png, ...), each emoji as the font draws it
(136x128, transparent background, padded to a square so nothing is cropped; train.py composites
transparency onto white), and OUT/captions.tsv with the emoji's Unicode names as captions
("grinning face", "fire engine") for --dataset captions. The classes are Unicode blocks, so a
classifier can check what a model samples (README, "Your own data").
"""
import argparse
import io
import os
import unicodedata

from PIL import Image

from support import system

FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
CLASSES = {  # class: code point ranges (Unicode emoji blocks)
    "face": [(0x1F600, 0x1F64F)],
    "animal": [(0x1F400, 0x1F43F), (0x1F980, 0x1F9AE)],
    "food": [(0x1F345, 0x1F37F), (0x1F950, 0x1F96F)],
    "transport": [(0x1F680, 0x1F6C5)],
    "sport": [(0x1F3C0, 0x1F3D3), (0x26BD, 0x26BE), (0x1F93A, 0x1F94F)],
    "clock": [(0x1F550, 0x1F567)],
}


def emoji_bitmaps(font_path):
    """{code point: PIL RGBA image} of every single-code-point emoji the font has a bitmap for."""
    from fontTools.ttLib import TTFont
    try:
        font = TTFont(font_path)
    except FileNotFoundError:
        raise SystemExit(f"{font_path} not found: install the font (Debian: apt-get install "
                         "fonts-noto-color-emoji) or pass --font") from None
    if "CBDT" not in font:
        raise SystemExit(f"{font_path} has no colour bitmaps (no CBDT table): pass the Noto Color "
                         "Emoji font (NotoColorEmoji.ttf)")
    strike = font["CBDT"].strikeData[0]  # glyph name -> bitmap (PNG bytes)
    return {cp: Image.open(io.BytesIO(strike[glyph].imageData)).convert("RGBA")
            for cp, glyph in font.getBestCmap().items() if glyph in strike}


def square(image):
    """The bitmap centred on a transparent square."""
    side = max(image.size)
    canvas = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=system.HelpFormatter)
    p.add_argument("--out", required=True, help="folder to write the class folders into")
    p.add_argument("--font", default=FONT, help="the Noto Color Emoji font file")
    args = p.parse_args(argv)
    bitmaps = emoji_bitmaps(args.font)
    lines, counts = [], {}
    for name, ranges in CLASSES.items():
        os.makedirs(os.path.join(args.out, name), exist_ok=True)
        chosen = sorted(cp for cp in bitmaps if any(a <= cp <= b for a, b in ranges))
        for cp in chosen:
            caption = unicodedata.name(chr(cp), f"u{cp:x}").lower()
            path = os.path.join(name, caption.replace(" ", "-") + ".png")
            square(bitmaps[cp]).save(os.path.join(args.out, path))
            lines.append(f"{path}\t{caption}\n")
        counts[name] = len(chosen)
    with open(os.path.join(args.out, "captions.tsv"), "w", encoding="utf-8") as f:
        f.writelines(lines)
    print(f"wrote {len(lines)} emoji in {len(counts)} classes to {args.out} "
          f"({', '.join(f'{k} {v}' for k, v in counts.items())}) and captions.tsv")


if __name__ == "__main__":
    main()
