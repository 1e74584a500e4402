"""What a condition corruption does to a dataset, without training: corrupt its conditions once
(corrupt.py; Sec. 3.1, 3.3 of the paper), write the manifest train.py would write, and print the
realised rate and, for class labels, where the flipped samples went.

    python -m experiments.corrupt_dataset --dataset digits --eta 0.05 --seed 0 --out runs/digits
"""
import argparse
import os

import numpy as np

import corrupt
from support import data, system


def confusion_summary(original, new, class_names):
    """Per-class table: samples, moved out, moved in, most common destination."""
    k = len(class_names)
    confusion = np.bincount(original * k + new, minlength=k * k).reshape(k, k)
    off = confusion - np.diag(np.diag(confusion))
    lines = [f"{'class':>20} {'n':>7} {'out':>6} {'out %':>6} {'in':>6}  top destination"]
    for c in range(k):
        n, out = confusion[c].sum(), off[c].sum()
        top = class_names[off[c].argmax()] if out else "-"
        lines.append(f"{class_names[c]:>20} {n:>7} {out:>6} {100 * out / max(n, 1):>6.2f} "
                     f"{off[:, c].sum():>6}  {top}")
    return "\n".join(lines)


def parse_subset(text, class_names):
    """'0,2,4' or 'T-shirt/top,Pullover' -> class indices."""
    subset = []
    for item in text.split(","):
        item = item.strip()
        if item in class_names:
            subset.append(class_names.index(item))
        elif item.isdigit():
            subset.append(int(item))
        else:
            raise ValueError(f"unknown class {item!r} in --subset; classes: {class_names}")
    return subset


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=system.HelpFormatter)
    parser.add_argument("--dataset", default="digits", choices=data.DATASETS, help="dataset name")
    parser.add_argument("--root", default=None, help="dataset folder or caption TSV file")
    parser.add_argument("--split", default="train", help="digits: train/test/all; "
                                                         "fashion-mnist: train/test")
    parser.add_argument("--eta", type=float, default=None,
                        help="corruption ratio as a fraction (paper: 0.025 ... 0.2); "
                             "not used by --mode rewrite")
    parser.add_argument("--seed", type=int, default=0, help="corruption seed")
    parser.add_argument("--mode", default=None,
                        choices=("symmetric", "asymmetric", "swap", "rewrite"),
                        help="default: symmetric for class datasets, swap for captions")
    parser.add_argument("--subset", default=None,
                        help="asymmetric: comma-separated class indices or names")
    parser.add_argument("--rewritten", default=None,
                        help="rewrite: TSV of index<TAB>rewritten caption")
    parser.add_argument("--out", required=True, help="folder for corruption.tsv")
    args = parser.parse_args(argv)

    dataset = data.load_dataset(args.dataset, args.root, args.split)
    text = dataset.captions is not None
    mode = args.mode or ("swap" if text else "symmetric")
    if text != (mode in ("swap", "rewrite")):
        parser.error(f"--mode {mode} does not apply to the {args.dataset} dataset")
    if args.subset and mode != "asymmetric":
        parser.error("--subset applies to --mode asymmetric only")
    if mode != "rewrite" and args.eta is None:
        parser.error(f"--mode {mode} needs --eta")
    if mode == "symmetric" or mode == "asymmetric":
        subset = parse_subset(args.subset, dataset.class_names) if args.subset else None
        original = dataset.labels
        new = corrupt.corrupt_labels(original, args.eta, args.seed, dataset.num_classes, mode,
                                     subset)
    elif mode == "swap":
        original = dataset.captions
        new = corrupt.swap_captions(original, args.eta, args.seed)
    else:
        if args.rewritten is None:
            parser.error("--mode rewrite needs --rewritten FILE")
        original = dataset.captions
        rewritten = corrupt.load_rewritten_captions(args.rewritten, len(original))
        new = corrupt.apply_rewritten_captions(original, rewritten)
    path = os.path.join(args.out, "corruption.tsv")
    rate = corrupt.write_manifest(path, original, new, eta=args.eta, seed=args.seed, mode=mode)
    changed = round(rate * len(original))
    print(f"{args.dataset} ({len(original)} samples), mode {mode}, eta {args.eta}, "
          f"seed {args.seed}: {changed} changed, realised rate {rate:.4%}")
    if mode == "asymmetric":
        in_subset = np.isin(original, subset).sum()
        print(f"within the subset ({in_subset} samples): {changed / in_subset:.4%}")
    if not text:
        print(confusion_summary(original, new, dataset.class_names))
    print(f"manifest: {path}")


if __name__ == "__main__":
    main()
