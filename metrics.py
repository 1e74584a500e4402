r"""Evaluation metrics of the paper (Sec. 3.1, App. B.7, App. C.1), written out by hand.

    python metrics.py --real ref.npz --fake runs/clean/samples --fake cep=runs/cep/samples \
        --features inception:pt_inception-2015-12-05-6726825d.pth --metrics fid,is,pr --out eval/
    torchrun --nproc_per_node=8 metrics.py ...                       # feature extraction sharded

FID (pytorch-fid's TF-Inception, float64 statistics streamed, scipy sqrtm), KID (unbiased, all
pairs), IS (torch-fidelity's way), precision/recall/density/coverage (k = 3, as the prdc
package), sFID (ADM's definition),
top-1 % RMD (Eq. 38-40), sample entropy (Eq. 41), distance to the 5 nearest training images and
the memorization ratio, CLIP score: each a function of feature arrays below. The features come
from a network of support/features.py ("inception:PATH", "clip:DIR", "classifier:PATH"), named
in every report, and the images from a source of support/extract.py: --real/--train/--fake take
an .npz (arr_0 uint8 NHWC: sample.py output, ADM reference batch), a pytorch-fid statistics .npz
(mu, sigma), an image folder or "dataset:NAME[:SPLIT]" (support/data.py).
A sample.py folder OUT/s{scale}/samples.npz gives one row per guidance scale, and the plots.
"""
import argparse
import hashlib
import math
import os
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy import linalg
from tqdm import tqdm

from support import extract, features, report, system


# --------------------------------------------------------------------------------------------
# The metrics
# --------------------------------------------------------------------------------------------

def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), exactly as pytorch-fid computes it."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in dimension: {mu1.shape} vs {mu2.shape} (different "
                         "feature extractors?)")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # singular product: offset the diagonals
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):  # numerical error can leave a tiny imaginary part
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
    scale = np.trace(sigma1) + np.trace(sigma2) + diff @ diff
    if -1e-6 * max(scale, 1.0) <= distance <= 1e-9 * max(scale, 1.0):
        return 0.0  # rounding (e.g. a set against itself with fewer images than dimensions)
    return distance


class FeatureStats:
    """FID's Gaussian fit, streamed: running sum and sum of outer products in float64 (summed
    over ranks), mean and covariance as np.cov (N - 1), as pytorch-fid's np.mean / np.cov."""

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
        if system.rank_and_world()[1] > 1:
            n = torch.tensor([self.n], dtype=torch.float64, device=self.sum.device)
            for t in (n, self.sum, self.outer):
                dist.all_reduce(t)
            self.n = int(n.item())

    def mean_cov(self):
        mu = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.cpu().numpy(), cov.cpu().numpy()


def kernel_inception_distance(real, fake):
    """KID (Binkowski et al. 2018): the unbiased estimate of MMD^2 between the feature sets with
    the kernel k(x, y) = (x.y / D + 1)^3, over all pairs (no subsets: unbiased at any sizes
    m, n). torch-fidelity averages the same estimate over random subsets of equal size."""
    x, y = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    m, n, dim = len(x), len(y), x.shape[1]
    k_xx, k_yy, k_xy = ((a @ b.T / dim + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))  # off-diagonal means
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2 * k_xy.mean())


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
        part, log_part = p[i * n // splits:(i + 1) * n // splits], log_p[i * n // splits:(i + 1)
                                                                         * n // splits]
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


def rmd_scores(feats, labels):
    """RMD(x, y) = M(x, y) - M_agn(x) (Eq. 38-40), every statistic estimated on this (generated)
    set: class means and one shared covariance, and a class-agnostic mean and covariance (1/N, as
    Lee et al. 2018); M(x, y) = -(G - mu_y)^T Sigma^-1 (G - mu_y); pseudo-inverse if singular."""
    g = torch.as_tensor(np.asarray(feats), dtype=torch.float64)
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
        d2 = ((x[i:j] * x[i:j]).sum(1, keepdim=True) + (cb * cb).sum(1)[None] - 2 * x[i:j]
              @ cb.T).clamp_min(0)
        log_p = torch.log_softmax(-d2 / tau, dim=1)
        out.append(-(log_p.exp() * log_p).sum(1))
    return torch.cat(out)


def sample_entropy(latents, codebook, tau=1.0):
    return vector_entropies(latents, codebook, tau).mean().item()


def normalize(feats):
    f = torch.as_tensor(np.asarray(feats), dtype=torch.float64)
    return f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)


def memorization(fake, train, k=5, threshold=0.12, device="cpu"):
    """Average L2 distance of each sample to its k nearest training images and the fraction whose
    nearest training image is closer than `threshold`; features L2-normalised (the paper: CLIP)."""
    d = knn_distances(normalize(fake).to(device), normalize(train).to(device), k)
    return {"l2_5nn": d.mean().item(), "mem_ratio": (d[:, 0] < threshold).double().mean().item()}


@torch.no_grad()
def clip_score_sum(clip, images, captions):
    """sum over the batch of 100 * max(cos(E_image, E_text), 0) (torchmetrics' CLIPScore
    formula)."""
    cos = F.cosine_similarity(clip.embed_images(images).double(),
                              clip.embed_texts(captions).double(), dim=1)
    return (100 * cos.clamp_min(0)).sum().item()


# --------------------------------------------------------------------------------------------
# FID's streamed pass: features of an image source, sharded over ranks, summed in float64
# (every rank gets the statistics, rank 0 the features); reference features cached by (file,
# mtime, network), so a sweep extracts the real images once
# --------------------------------------------------------------------------------------------

def extract_features(extractor, source, batch_size, desc):
    """-> {"n", "mu", "sigma", ["mu_s", "sigma_s"], "features", ["logits_unbiased"]}: the
    statistics on every rank, the features and logits on rank 0 only (None elsewhere)."""
    rank, size = system.rank_and_world()
    if len(source) < size:  # an empty shard would skip the collectives below: a hang
        raise ValueError(f"'{source.path}' has {len(source)} images, fewer than the {size} "
                         "processes")
    lo, hi = rank * len(source) // size, (rank + 1) * len(source) // size
    stats, kept = {}, {"features": [], "logits_unbiased": []}
    for start in tqdm(range(lo, hi, batch_size), desc=desc, disable=rank != 0):
        batch = source.read(start, min(start + batch_size, hi))  # uint8 NHWC
        images = torch.from_numpy(batch).permute(0, 3, 1, 2)
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
            result[key] = system.gather_rows(np.concatenate(parts))  # rank 0
    return result


def reference_features(source, extractor, args, desc, needed):
    """The `needed` statistics/features of a real/training set. Files with Inception
    statistics (pytorch-fid's mu/sigma, ADM's mu/sigma/mu_s/sigma_s) give those, as pytorch-fid
    and ADM use them; images are extracted once and cached under --cache (file, mtime,
    extractor)."""
    rank, world = system.rank_and_world()
    stored = {k: source.extra[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in source.extra}
    stored = stored if extractor.kind == "inception" else {}
    if set(needed) <= stored.keys():
        return stored
    if len(source) == 0:
        raise ValueError(f"'{source.path}' holds no images (arr_0)"
                         + ("" if stored else " and no Inception statistics"))
    key = hashlib.sha1(f"{source.cache_id()}|{extractor.cache_id}".encode()).hexdigest()[:16]
    path = os.path.join(args.cache, f"{key}.npz") if args.cache else None
    hit = [bool(path) and os.path.exists(path)]
    if world > 1:  # rank 0 decides: a hit on some ranks only would split the collectives
        dist.broadcast_object_list(hit, src=0)
    feats = None
    if hit[0]:
        try:
            with np.load(path) as f:
                feats = {k: f[k] for k in f.files}
            if not all(np.isfinite(v).all() for v in feats.values()):
                raise ValueError("non-finite values")  # as damaged as a cut file
            if rank == 0:
                print(f"{desc}: cached features {path} (--cache '' recomputes them)")
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # a damaged entry
            feats = None
            print(f"{desc}: the cached features {path} cannot be read ({type(e).__name__}: "
                  f"{e}); recomputing them")
    if feats is None:
        feats = extract_features(extractor, source, args.batch_size, desc)
        if path and rank == 0:
            os.makedirs(args.cache, exist_ok=True)
            # parallel runs may share it
            system.write_atomic(path, lambda tmp: np.savez(tmp, **feats))
    feats = {**feats, **stored}
    missing = set(needed) - feats.keys()
    if missing:
        raise ValueError(f"'{source.path}' with {extractor.name} gives no {sorted(missing)}")
    return feats


# --------------------------------------------------------------------------------------------
# Evaluation of one sample set, sweeps, table, JSON and plots
# --------------------------------------------------------------------------------------------

METRICS = ("fid", "sfid", "is", "pr", "acc", "rmd", "entropy", "mem", "clip")


def main(argv=None):
    args = parse_args(argv)
    # exact fp32 features
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    rank, _, device = system.setup_distributed(args.device)
    system.set_threads(args.threads)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    try:  # what the user gave: one-line errors
        extractor = features.Extractor(args.features, device)
        runs = [(label, scale, extract.open_images(path, args.data_root, args.image_size))
                for label, scale, path in extract.fake_runs(args.fake)]
        check_request(metrics, extractor, runs, args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"metrics.py: {e}") from None
    extras = {}
    if "entropy" in metrics:
        extras["vq"] = features.load_vq(args.vq, args.vq_preset, device, args.unsafe_pickle)
    if "clip" in metrics:
        extras["clip"] = features.CLIP(args.clip).to(device)
    real = train = None
    needed = {"fid": ["mu", "sigma"], "sfid": ["mu_s", "sigma_s"], "pr": ["features"]}
    needed = [key for m in metrics for key in needed.get(m, [])]
    if needed:
        source = extract.open_images(args.real, args.data_root, args.image_size)
        real = reference_features(source, extractor, args, "real", needed)
        check_reference(real)
        size_notes(source, runs)
    if "mem" in metrics:
        source = extract.open_images(args.train, args.data_root, args.image_size)
        train = reference_features(source, extractor, args, "train", ["features"])
    rows = []
    for label, scale, source in runs:
        t0 = time.time()
        row = evaluate(source, extractor, real, train, metrics, args, extras,
                       label if scale is None else f"{label} s={scale:g}")
        rows.append({"run": label, "scale": scale, "path": source.path, **row,
                     "seconds": round(time.time() - t0, 1)})
    if rank == 0:
        report.print_table(rows, extractor.name)
        floor = real_vs_real(real, rows)
        if floor:
            print(f"real vs real: FID {floor['fid']:.3f} of {floor['n']} reference images against "
                  f"the other {floor['rest']} (what a perfect model scores at this n)")
        system.out_folder(args.out)
        summary = {"features": extractor.name, "real": args.real, "train": args.train,
                   "metrics": metrics,
                   "options": {"k": args.k, "is_splits": args.is_splits, "tau": args.tau,
                               "mem_threshold": args.mem_threshold,
                               "mem_features": "L2-normalised",
                               "clip_score": "100 * max(cos, 0), mean over samples",
                               "rmd": "mean of the top 1 % scores"},
                   "rows": rows, "real_vs_real": floor}
        system.write_json(os.path.join(args.out, "metrics.json"), summary)
        if "rmd_scores" in extras:
            np.savez(os.path.join(args.out, "rmd_scores.npz"),
                     **{f"{r['run']}_s{r['scale']}": s for r, s in zip(rows, extras["rmd_scores"])})
        report.plot_sweeps(rows, args.out, extractor.name)
        print(f"wrote {os.path.join(args.out, 'metrics.json')}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return rows


def evaluate(source, extractor, real, train, metrics, args, extras, desc):
    """All requested metrics of one sample set: every rank extracts its shard, rank 0 computes."""
    feats = extract_features(extractor, source, args.batch_size, desc)
    row, device = {"n": feats["n"]}, extractor.device
    if system.rank_and_world()[0] == 0:
        if "fid" in metrics:
            row["fid"] = frechet_distance(feats["mu"], feats["sigma"], real["mu"], real["sigma"])
        if "sfid" in metrics:
            row["sfid"] = frechet_distance(feats["mu_s"], feats["sigma_s"], real["mu_s"],
                                           real["sigma_s"])
        if "is" in metrics:
            row["is"], row["is_std"] = inception_score(feats["logits_unbiased"], args.is_splits)
        if "pr" in metrics:
            row.update(precision_recall(real["features"], feats["features"], args.k, device))
        if "rmd" in metrics:
            scores = rmd_scores(feats["features"], source.labels)
            row["rmd_top1"] = top_fraction_mean(scores, 0.01)
            extras.setdefault("rmd_scores", []).append(scores)
        if "mem" in metrics:
            row.update(memorization(feats["features"], train["features"], 5, args.mem_threshold,
                                    device))
    if "entropy" in metrics:
        vq, codebook = extras["vq"]

        def entropy_sum(x, start, stop):
            h = vector_entropies(features.vq_latents(vq, x.to(device)), codebook, args.tau)
            return h.sum().item(), h.numel()
        row["entropy"] = extract.distributed_pass(source, args.batch_size, entropy_sum,
                                                  desc + " entropy")
    if "acc" in metrics:  # how often the feature classifier sees the class a sample was drawn for
        def correct(x, start, stop):
            with torch.no_grad():
                predicted = extractor.net.predict(x.to(device)).cpu()
            return (predicted == torch.as_tensor(source.labels[start:stop])).sum().item(), len(x)
        row["class_acc"] = extract.distributed_pass(source, args.batch_size, correct, desc + " acc")
    if "clip" in metrics:
        clip = extras["clip"]
        row["clip_score"] = extract.distributed_pass(source, args.batch_size,
                                                     lambda x, start, stop: (
            clip_score_sum(clip, x, [str(c) for c in source.captions[start:stop]]), stop - start),
            desc + " clip")
    return row


def check_request(metrics, extractor, sources, args):
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {', '.join(METRICS)}")
    if {"is", "sfid"} & set(metrics) and extractor.kind != "inception":
        raise ValueError("IS and sFID need --features inception:PATH (its logits / mixed_6 "
                         "features)")
    if "acc" in metrics and extractor.kind != "classifier":
        raise ValueError("acc needs --features classifier:PATH (a classifier of the sampled "
                         "classes: python -m support.features train-classifier)")
    for label, _, src in sources:
        if "acc" in metrics and src.labels is None:
            raise ValueError(f"acc needs the conditioning labels: '{src.path}' has no 'labels'")
        classes = extractor.net.head.out_features if extractor.kind == "classifier" else None
        if "acc" in metrics and classes and int(np.max(src.labels)) >= classes:
            raise ValueError(f"'{src.path}' has labels up to {int(np.max(src.labels))}, the "
                             f"classifier {extractor.name} knows {classes} classes: is it the "
                             "classifier of these samples?")
        if "rmd" in metrics and src.labels is None:
            raise ValueError(f"RMD needs the conditioning labels: '{src.path}' has no 'labels'")
        if "clip" in metrics and src.captions is None:
            raise ValueError(f"CLIP score needs the prompts: '{src.path}' has no 'captions'")
    for label, _, src in sources:
        if {"fid", "sfid"} & set(metrics) and len(src) < 2:
            raise ValueError(f"FID needs at least 2 images: '{src.path}' has {len(src)}")
        if "is" in metrics and len(src) < args.is_splits:
            raise ValueError(f"IS in {args.is_splits} splits needs at least {args.is_splits} "
                             f"images: '{src.path}' has {len(src)} (--is-splits)")
        if "pr" in metrics and len(src) <= args.k:
            raise ValueError(f"precision/recall with k={args.k} needs more than {args.k} images: "
                             f"'{src.path}' has {len(src)}")
    if "mem" in metrics and not args.train:
        raise ValueError("mem needs --train (the training images)")
    if "entropy" in metrics and not args.vq:
        raise ValueError("entropy needs --vq (the VQ autoencoder checkpoint of vae.py)")
    if "clip" in metrics and not args.clip:
        raise ValueError("clip needs --clip DIR (a local CLIP model directory)")


def size_notes(reference, runs):
    """Samples of another size than the reference are resized to the feature network's input
    like any image, so the score holds, but the mismatch is usually a wrong reference: say so."""
    def size(source):
        return tuple(source.read(0, 1).shape[1:3]) if len(source) else None
    want = size(reference)
    if want is None:  # statistics only (pytorch-fid's mu / sigma): no image size to compare
        return
    for label, _, source in runs:
        if size(source) not in (want, None):
            print(f"note: {source.path} holds {'x'.join(map(str, size(source)))} images, the "
                  f"reference {reference.path} {'x'.join(map(str, want))}: both are resized to "
                  "the feature network's input; is this the reference these samples belong to?")


def real_vs_real(real, rows):
    """FID of n random reference images against the rest of the reference, n the samples' (what
    a perfect model's n samples score against a reference of about this size: FID's small-n bias
    is in it), when the reference holds twice n or more."""
    feats = (real or {}).get("features")
    n = min((r["n"] for r in rows if "fid" in r), default=0)
    if feats is None or n < 2 or len(feats) < 2 * n:
        return None
    order = np.random.default_rng(0).permutation(len(feats))
    a, b = feats[order[:n]].astype(np.float64), feats[order[n:]].astype(np.float64)
    fid = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    return {"n": n, "rest": len(b), "fid": fid}


def check_reference(real):
    """A reference set whose features do not vary (all images alike) makes every FID large."""
    if real is not None and "sigma" in real and np.trace(real["sigma"]) <= 1e-8:
        print("warning: the reference set's features do not vary (identical or blank images?); "
              "its FIDs measure the distance to one point")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=system.HelpFormatter)
    p.add_argument("--real", required=True,
                   help="reference set: .npz (arr_0 and/or mu, sigma), image folder or "
                        "dataset:NAME[:SPLIT] (split default: test)")
    p.add_argument("--fake", required=True, action="append",
                   help="[LABEL=]PATH of samples: .npz, image folder, or a sample.py folder OUT "
                        "with OUT/s{scale}/samples.npz (one row per scale); repeat to overlay runs")
    p.add_argument("--features", required=True,
                   help="inception:PATH (pytorch-fid's .pth), clip:DIR or classifier:PATH")
    p.add_argument("--metrics", default="fid,pr",
                   help=f"comma-separated subset of {','.join(METRICS)} (pr = precision, recall, "
                        "density, coverage; acc = class accuracy through --features classifier)")
    p.add_argument("--train", default=None,
                   help="training images for 'mem' (distance to the 5 nearest, memorization ratio)")
    p.add_argument("--vq", default=None, help="VQ autoencoder checkpoint (vae.py) for 'entropy'")
    p.add_argument("--vq-preset", default=None,
                   help="vae.py preset (e.g. vq-f4) when --vq is CompVis/diffusers weights")
    p.add_argument("--clip", default=None,
                   help="local CLIP model directory for 'clip' (paper: CLIP ViT-B/16)")
    p.add_argument("--tau", type=float, default=1.0,
                   help="sample-entropy temperature (Eq. 41; the paper gives none)")
    p.add_argument("--k", type=int, default=3,
                   help="nearest neighbours for precision/recall (paper: 3)")
    p.add_argument("--is-splits", type=int, default=10, help="IS splits (paper: 10)")
    p.add_argument("--mem-threshold", type=float, default=0.12,
                   help="memorization: nearest training image closer than this")
    p.add_argument("--data-root", default=None,
                   help="root for dataset:NAME sources (e.g. the Fashion-MNIST idx dir)")
    p.add_argument("--image-size", type=int, default=None,
                   help="image size for dataset:NAME sources (as train.py's --image-size)")
    p.add_argument("--batch-size", type=int, default=100,
                   help="images per forward pass per process")
    p.add_argument("--cache", default="runs/metrics-cache",
                   help="directory of cached reference features ('' = no cache)")
    p.add_argument("--out", default="metrics_out",
                   help="output folder: metrics.json, plots, RMD scores")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--threads", type=int, default=0,
                   help=system.THREADS_HELP)
    p.add_argument("--unsafe-pickle", action="store_true",
                   help="--vq: " + system.UNSAFE_PICKLE_HELP)
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
