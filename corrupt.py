"""Condition corruption (Sec. 3.1, 3.3 and Table 7 of the paper) and its manifest.

A fixed property of the dataset, decided once by a seed:
    corrupt_labels      symmetric / asymmetric class-label flips, exactly round(eta * N) samples
    swap_captions       swap the captions of random pairs until a fraction eta has moved
    load_rewritten_captions / apply_rewritten_captions   LLM re-writing from a user-given file
    resample_corruption "random data corruption" of Table 7, re-drawn at every training step
    write_manifest / read_manifest   the TSV of changed samples kept in the run directory
Every random number of the fixed corruptions is the i-th draw of a stream seeded by (seed, stream
id), so it depends only on the seed and the sample index: not on the number of processes (each
process computes the whole corruption itself; the functions have no rank input), and a sample
corrupted at a small eta is corrupted the same way at every larger eta. To see what a
corruption does to a dataset without training: `python -m experiments.corrupt_dataset`.
"""
import math
import os

import numpy as np
import torch


# ----------------------------------------------------------------------------- corruption

def count_for(eta, n):
    """round(eta * n), halves rounded up."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"corruption ratio eta must be in [0, 1], not {eta}")
    return int(math.floor(eta * n + 0.5))


def index_uniforms(seed, stream, n):
    """n uniforms in [0, 1); the i-th depends only on (seed, stream, i), not on n.

    The streams are spawned children of SeedSequence(seed) under a fixed key, so they never
    coincide with default_rng(seed) itself (nor, e.g., with default_rng([seed, 0]), which numpy
    maps to the same state as default_rng(seed)).
    """
    key = (0x436F7272, stream)  # "Corr"
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key)).random(n)


def class_prior(labels, num_classes):
    """The dataset's class frequencies, float64 [num_classes]."""
    labels = np.asarray(labels, dtype=np.int64)
    return np.bincount(labels, minlength=num_classes).astype(np.float64) / len(labels)


def draw_other_class(true_labels, u, prior):
    """For each sample a class != its true label, drawn from `prior` renormalised without it.

    Inverse CDF of the prior with the true class's mass removed: that class (and any class of
    zero mass) is a flat step of the CDF, which searchsorted(side="right") never lands on.
    """
    new = np.empty_like(true_labels)
    for y in np.unique(true_labels):
        p = prior.copy()
        p[y] = 0.0
        if p.sum() <= 0:
            raise ValueError(f"class {y} has no other class of positive prior mass to move to")
        cdf = np.cumsum(p)
        cdf /= cdf[-1]  # exactly 1.0 at the end, so u < 1 never runs past the last class
        rows = true_labels == y
        new[rows] = np.searchsorted(cdf, u[rows], side="right")
    return new


def corrupt_labels(labels, eta, seed, num_classes, mode="symmetric", subset=None):
    """Fixed class-label corruption (Sec. 3.1): a new int64 label array.

    symmetric: round(eta * N) samples drawn without replacement each move to a *different*
        class drawn from the class prior renormalised without the true class; the realised
        ratio is exactly round(eta * N) / N.
    asymmetric: only samples of the classes in `subset` are corrupted; each moves to another
        class of the subset, drawn from the prior restricted to the subset minus the true class.
    The k samples with the smallest per-index uniforms are picked, and sample i's new class
    uses its own per-index uniform: both depend on (seed, i), never on how the data is sharded.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    prior = class_prior(labels, num_classes)
    if mode == "symmetric":
        candidates = np.arange(len(labels))
    elif mode == "asymmetric":
        subset = np.unique(np.asarray(subset if subset is not None else [], dtype=np.int64))
        if len(subset) < 2 or subset.min() < 0 or subset.max() >= num_classes:
            raise ValueError(f"asymmetric corruption needs a subset of at least 2 classes in "
                             f"[0, {num_classes}), got {subset.tolist()}")
        candidates = np.flatnonzero(np.isin(labels, subset))
        outside = np.setdiff1d(np.arange(num_classes), subset)
        prior[outside] = 0.0  # moves stay within the subset
    else:
        raise ValueError(f"mode must be symmetric or asymmetric, not {mode!r}")
    # asymmetric: eta is the ratio among the subset's samples, round(eta * N_subset) (our reading)
    k = count_for(eta, len(candidates))
    order = np.argsort(index_uniforms(seed, 0, len(labels))[candidates], kind="stable")
    chosen = np.sort(candidates[order[:k]])
    new = labels.copy()
    u = index_uniforms(seed, 1, len(labels))
    new[chosen] = draw_other_class(labels[chosen], u[chosen], prior)
    return new


def resample_corruption(labels, eta, prior, generator):
    """'Random data corruption' (Table 7): re-drawn at every training step.

    Each label independently, with probability eta, moves to a different class drawn from the
    prior renormalised without the true class. All draws are made for the whole batch (on the
    generator's device), so pass the global batch and slice a rank's part afterwards.
    """
    device = generator.device
    y = labels.to(device)
    prior = torch.as_tensor(prior, dtype=torch.float64, device=device)
    flip = torch.rand(len(y), generator=generator, device=device) < eta
    probs = prior.expand(len(y), -1).clone()
    probs[torch.arange(len(y), device=device), y] = 0.0
    if (probs.sum(1) <= 0).any():
        raise ValueError("a label has no other class of positive prior mass to move to")
    other = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return torch.where(flip, other, y).to(labels.device)


def swap_captions(captions, eta, seed):
    """Caption swap (Sec. 3.3): a permutation of `captions` in which a fraction eta has moved.

    Repeatedly take two pairs not yet moved and swap their captions: round(eta * N / 2) pairs,
    so the moved count is the even number nearest eta * N. Pairs are consecutive samples in the
    order of per-index uniforms (seed, i), so the pairs of a smaller eta stay at a larger one.
    """
    captions = list(captions)
    pairs = count_for(eta, len(captions) / 2)
    order = np.argsort(index_uniforms(seed, 2, len(captions)), kind="stable")[:2 * pairs]
    new = list(captions)
    for a, b in order.reshape(-1, 2):
        new[a], new[b] = captions[b], captions[a]
    return new


def load_rewritten_captions(path, num_captions=None):
    """LLM re-writing (Sec. 3.3): a user-given TSV of index<TAB>rewritten caption -> {index:
    caption}.

    The paper had GPT-4 rewrite captions; that needs a language model, so here the rewritten
    captions come from a file. Blank lines and lines starting with '#' are skipped.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"rewritten caption file {path} not found "
                                f"(expected index<TAB>caption lines)")
    rewritten = {}
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line or line.startswith("#"):
                continue
            index, _, caption = line.partition("\t")
            if not _ or not index.strip().isdigit():
                raise ValueError(f"{path}:{line_number}: expected index<TAB>caption")
            index = int(index)
            if index in rewritten:
                raise ValueError(f"{path}:{line_number}: index {index} given twice")
            if num_captions is not None and index >= num_captions:
                raise ValueError(f"{path}:{line_number}: index {index} out of range "
                                 f"(the dataset has {num_captions} captions)")
            rewritten[index] = caption
    return rewritten


def apply_rewritten_captions(captions, rewritten):
    """Replace the captions named in `rewritten` ({index: caption}); a new list."""
    new = list(captions)
    for index, caption in rewritten.items():
        if not 0 <= index < len(new):
            raise ValueError(f"rewritten caption index {index} out of range ({len(new)} captions)")
        new[index] = caption
    return new


# ----------------------------------------------------------------------------- manifest

def escape(text):
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def unescape(text):
    table = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            out.append(table.get(text[i + 1], text[i + 1]))
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def write_manifest(path, original, new, eta=None, seed=None, mode=None):
    """Write the changed samples as a TSV (index, original, new) with a '#' header line.

    Conditions are class labels (ints) or captions (strings; tab / newline / backslash escaped).
    Written atomically (a temporary file, then one rename). Returns the realised corruption rate
    (changed / N).
    """
    if len(original) != len(new):
        raise ValueError(f"original has {len(original)} conditions, new has {len(new)}")
    kind = "captions" if len(original) and isinstance(original[0], str) else "labels"
    if kind == "labels":
        changed = np.flatnonzero(np.asarray(original) != np.asarray(new))
    else:
        changed = [i for i in range(len(original)) if original[i] != new[i]]
    rate = len(changed) / max(len(original), 1)
    fmt = escape if kind == "captions" else lambda v: str(int(v))
    lines = [f"# kind={kind} eta={eta} seed={seed} mode={mode} n={len(original)} "
             f"changed={len(changed)} rate={rate:.6f}", "index\toriginal\tnew"]
    lines += [f"{i}\t{fmt(original[i])}\t{fmt(new[i])}" for i in changed]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.atomic-tmp{os.getpid()}"  # as support/system.py names a save in progress
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return rate


def read_manifest(path):
    """Read a manifest -> {"meta": header dict (strings), "index", "original", "new"}.

    For labels the three columns are int64 arrays, for captions index is int64 and the others
    are lists of strings.
    """
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if not lines[0].startswith("# ") or lines[1] != "index\toriginal\tnew":
        raise ValueError(f"{path} is not a corruption manifest (see write_manifest)")
    meta = dict(item.split("=", 1) for item in lines[0][2:].split())
    rows = [line.split("\t") for line in lines[2:] if line]
    index = np.array([int(r[0]) for r in rows], dtype=np.int64)
    if meta["kind"] == "labels":
        original = np.array([int(r[1]) for r in rows], dtype=np.int64)
        new = np.array([int(r[2]) for r in rows], dtype=np.int64)
    else:
        original, new = [unescape(r[1]) for r in rows], [unescape(r[2]) for r in rows]
    return {"meta": meta, "index": index, "original": original, "new": new}
