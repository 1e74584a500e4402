"""Does slight corruption help? The paper's comparison (Sec. 3, 5) with paired seeds and statistics.

    python sweep.py                               # the CPU experiment: 8x8 digits, 2 cores
    python sweep.py --setting fmnist --workers 4  # the same design on Fashion-MNIST 32x32 (a GPU)
    python sweep.py --smoke --out /tmp/smoke         # the same code, tiny (CI, under a minute)

Arms, all with the same architecture, images seen and schedule: clean; symmetric label flips eta in
{2.5, 5, 10, 20} % (Sec. 3.1); CEP-U and CEP-G with gamma 1 (Sec. 5.1, Eq. 8), then gamma 0.3 and 3
for whichever of the two has the lower mean FID at guidance 2; IP with lambda 0.1 (Table 1); and,
on the clean models at sampling time only, CADS (condition noise annealed over the sampling steps).
Paired seeds: seed k fixes the initial weights, the data order, every t / noise / dropout draw, the
corruption (corruption seed = k) and the sampling noise, in every arm; CEP and IP draw after the
shared draws of a step, so switching them on changes nothing else.

The regime where the effect can appear is a small training set trained long (the clean model
starts to copy training images). Every arm is scored against held-out real images, never the
training images, in the feature space of a small classifier trained here: FID, precision and
recall (k = 3), the classifier's accuracy on the conditioning label, top-1 % RMD (Eq. 38-40), and
memorisation (distance of each sample to its nearest training image in pixel space; the ratio of
samples closer than the 5th percentile of held-out real images' distances). Per arm against clean:
mean paired difference, 95 % t-interval, exact sign-flip p-value, seed-to-seed spread, and the
smallest difference the design could have detected (paired t, two-sided 5 %, power 80 %).
Each (arm, seed) is one job, skipped when its artefacts are complete (the checkpoint's own step,
the samples' recorded settings, the metrics' config), so a killed sweep resumes where it stopped.
"""
import argparse
import concurrent.futures
import csv
import itertools
import math
import multiprocessing
import os
import time
import warnings
import zipfile

import numpy as np
import torch

import data
import features
import metrics
import sample
import system
import train

SETTINGS = {  # images seen = steps x batch; every arm of a setting gets the same budget
    "digits": dict(dataset="digits", data_root=None, image_size=None, train_per_class=30,
                   preset="digits", steps=1000, batch=64, lr=1e-3, per_class=50,
                   guidance=(1.0, 2.0, 4.0), sample_steps=25, classifier_epochs=30),
    "fmnist": dict(dataset="fashion-mnist", data_root="/usr/share/datasets/fashion-mnist",
                   image_size=32, train_per_class=500, preset="fmnist", steps=12000, batch=128,
                   lr=2e-4, per_class=1000, guidance=(1.0, 2.0, 4.0), sample_steps=50,
                   classifier_epochs=3),
}
SMOKE = dict(train_per_class=3, steps=4, batch=8, per_class=3, guidance=(1.0, 2.0),
             sample_steps=3, classifier_epochs=1)
ARMS = {"clean": [], **{f"eta{e:g}": ["--eta", str(e / 100)] for e in (2.5, 5, 10, 20)},
        "cep-u": ["--cep", "uniform", "--gamma", "1"],
        "cep-g": ["--cep", "gaussian", "--gamma", "1"],
        "ip": ["--input-perturbation", "0.1"]}
MAIN_ARMS = ("clean", "eta5", "cep-g")  # the arms with the most seeds
CADS = ["--cads", "--cads-tau", "0.6,0.9", "--cads-scale", "0.25"]  # Sadat et al.'s defaults
METRICS = ("fid", "precision", "recall", "class_acc", "rmd_top1", "nn_train", "mem_ratio")
LOWER_IS_BETTER = {"fid": True, "nn_train": False, "mem_ratio": True}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=system.HelpFormatter)
    p.add_argument("--setting", default="digits", choices=SETTINGS,
                   help="digits: 8x8 pixels, CPU-sized (default); fmnist: 32x32, GPU-sized")
    p.add_argument("--out", default=None,
                   help="sweep directory, resumable (default runs/sweep-SETTING)")
    p.add_argument("--seeds", type=int, default=6, help="seeds of clean, eta 5 %% and CEP-G")
    p.add_argument("--other-seeds", type=int, default=2, help="seeds of every other arm")
    p.add_argument("--workers", type=int, default=2, help="jobs at once, one thread each")
    p.add_argument("--smoke", action="store_true", help="the same code, tiny (CI)")
    args = p.parse_args(argv)
    if args.seeds < 2 or args.other_seeds < 1 or args.workers < 1:
        raise SystemExit("--seeds must be >= 2, --other-seeds and --workers >= 1")
    args.out = args.out or f"runs/sweep-{args.setting}"
    return args


# ----------------------------------------------------------------------------- data and features

def reference(out, size):
    """Training subset, held-out images and the feature classifier, made once: reference.npz."""
    path = os.path.join(out, "reference.npz")
    if os.path.exists(path):
        return dict(np.load(path))
    full = data.load_dataset(size["dataset"], size["data_root"], "train", size["image_size"])
    test = data.load_dataset(size["dataset"], size["data_root"], "test", size["image_size"])
    used = data.first_per_class(full, size["train_per_class"])
    held_mask = np.ones(len(full), bool)  # held out: the test split and the unused training images
    for c in range(full.num_classes):
        held_mask[np.flatnonzero(full.labels == c)[:size["train_per_class"]]] = False
    held = torch.cat([full.images[torch.from_numpy(held_mask)], test.images])
    clf_path = os.path.join(out, "classifier.pt")
    accuracy = features.main([
        "train-classifier", "--dataset", size["dataset"], "--epochs",
        str(size["classifier_epochs"]), "--out", clf_path,
        *(["--data-root", size["data_root"]] if size["data_root"] else []),
        *(["--image-size", str(size["image_size"])] if size["image_size"] else [])])
    ref = dict(train=nhwc(used.images), held=nhwc(held), test_accuracy=accuracy)
    ref["held_features"] = classifier_features(features.load_classifier(clf_path), ref["held"])
    ref["mem_threshold"] = np.quantile(nn_distance(ref["held"], ref["train"]), 0.05)
    system.write_atomic(path, lambda tmp: np.savez(tmp, **ref))
    return ref


def nhwc(images):
    return images.permute(0, 2, 3, 1).numpy()


def classifier_features(clf, images, batch=500):
    """Penultimate-layer features of the domain classifier, float64 [N, 128]."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        parts = [clf.embed(x[i:i + batch])["features"] for i in range(0, len(x), batch)]
    return torch.cat(parts).double().numpy()


def nn_distance(images, train_images):
    """Per-pixel RMS distance of each image to its nearest training image (pixels in [0, 1])."""
    a = torch.from_numpy(images.reshape(len(images), -1)).double() / 255
    b = torch.from_numpy(train_images.reshape(len(train_images), -1)).double() / 255
    return (torch.cdist(a, b).min(1).values / math.sqrt(a.shape[1])).numpy()


def evaluate(npz_path, ref, clf_path):
    """Every metric of one sample set against the held-out images and the training subset."""
    warnings.filterwarnings("ignore", message="Matrix is singular")  # dead ReLU features
    with np.load(npz_path) as f:
        images, labels = f["arr_0"], f["labels"]
    clf = features.load_classifier(clf_path)
    feats = classifier_features(clf, images)
    held = ref["held_features"]
    with torch.no_grad():
        x = features.to_model_input(torch.from_numpy(images).permute(0, 3, 1, 2), clf.channels)
        predicted = clf(x).argmax(1).numpy()
    d = nn_distance(images, ref["train"])
    pr = metrics.precision_recall(held, feats, k=3)
    return {"fid": metrics.frechet_distance(feats.mean(0), np.cov(feats, rowvar=False),
                                            held.mean(0), np.cov(held, rowvar=False)),
            "precision": pr["precision"], "recall": pr["recall"],
            "class_acc": float((predicted == labels).mean()),
            "rmd_top1": metrics.top_fraction_mean(metrics.rmd_scores(feats, labels), 0.01),
            "nn_train": float(d.mean()), "mem_ratio": float((d < ref["mem_threshold"]).mean()),
            "n": len(images)}


# ----------------------------------------------------------------------------- one job

def train_flags(arm_flags, seed, size, run_dir):
    data = ["--dataset", size["dataset"]] \
        + (["--data-root", size["data_root"]] if size["data_root"] else []) \
        + (["--image-size", str(size["image_size"])] if size["image_size"] else [])
    return [*data, "--train-per-class", str(size["train_per_class"]), "--preset", size["preset"],
            "--steps", str(size["steps"]), "--batch-size", str(size["batch"]),
            "--lr", str(size["lr"]), "--ema-decay", "0.999",
            "--seed", str(seed), "--corruption-seed", str(seed),
            "--ckpt-every", str(max(1, size["steps"] // 4)),
            "--log-every", str(max(1, size["steps"] // 20)),
            "--num-workers", "0", "--threads", "1", "--out", run_dir, *arm_flags]


def checkpoint_step(run_dir):
    path = os.path.join(run_dir, "ckpt.pt")
    if not os.path.exists(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=True)["step"]


def samples_done(out, size, cads):
    """Every scale's npz exists, is complete (written atomically) and has this sweep's settings
    and model (the checkpoint step it was sampled from)."""
    for scale in size["guidance"]:
        path = os.path.join(out, f"s{scale:g}", "samples.npz")
        if not os.path.exists(path):
            return False
        try:
            with np.load(path) as f:
                same_sampler = str(f["sampler"]) == f"dpm:{size['sample_steps']}"
                same_model = "ckpt_step" in f.files and int(f["ckpt_step"]) == size["steps"]
                same_cads = (str(f["cads"]) != "off") == cads
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # cut short or foreign: redo
            return False
        if not (same_sampler and same_model and same_cads):
            return False
    return True


def run_job(job):
    """Train (or resume), sample every scale (and CADS for clean), evaluate: one (arm, seed)."""
    torch.set_num_threads(1)  # the evaluation; train and sample get --threads 1
    arm, flags, seed, size, out, ref_path = job
    run_dir = os.path.join(out, f"{arm}-s{seed}")
    step = checkpoint_step(run_dir)
    if step != size["steps"]:
        if step is not None and step > size["steps"]:
            raise SystemExit(f"{run_dir} was trained for {step} steps, more than {size['steps']}")
        resume = ["--resume"] if step is not None else []
        train.main(train_flags(flags, seed, size, run_dir) + resume)
    ref = dict(np.load(ref_path))
    clf_path = os.path.join(out, "classifier.pt")
    rows = []
    for variant, extra in [("dpm", [])] + ([("cads", CADS)] if arm == "clean" else []):
        samples = os.path.join(run_dir, "samples" if variant == "dpm" else "samples-cads")
        if not samples_done(samples, size, variant == "cads"):
            scales = ",".join(f"{s:g}" for s in size["guidance"])
            sample.main(["--ckpt", run_dir, "--out", samples, "--per-class", str(size["per_class"]),
                         "--guidance", scales, "--sampler", "dpm",
                         "--steps", str(size["sample_steps"]), "--batch-size", "250", "--no-images",
                         "--seed", str(seed), "--threads", "1", *extra])
        for scale in size["guidance"]:
            row = evaluate(os.path.join(samples, f"s{scale:g}", "samples.npz"), ref, clf_path)
            name = arm if variant == "dpm" else "cads"
            rows.append({"arm": name, "seed": seed, "scale": scale, **row})
    return rows


# ----------------------------------------------------------------------------- statistics

def sign_flip_p(d):
    """Exact two-sided sign-flip p-value of the mean of paired differences d (all 2^n flips)."""
    d = np.asarray(d, float)
    flips = np.array(list(itertools.product([1, -1], repeat=len(d))))
    return float((np.abs(flips @ d) >= abs(d.sum()) - 1e-12).mean())


def paired_stats(arm_values, clean_values):
    """Mean paired difference arm - clean, its 95 % t-interval, the sign-flip p-value and the
    smallest true difference the design detects with power 0.8 (two-sided 5 %)."""
    from scipy import stats
    d = np.asarray(arm_values, float) - np.asarray(clean_values, float)
    n = len(d)
    if n < 2:
        return dict(n=n, diff=float(d.mean()), lo=math.nan, hi=math.nan, p=math.nan, mde=math.nan)
    se = d.std(ddof=1) / math.sqrt(n)
    t = stats.t.ppf(0.975, n - 1)
    mde = (t + stats.t.ppf(0.8, n - 1)) * se
    return dict(n=n, diff=float(d.mean()), lo=float(d.mean() - t * se), hi=float(d.mean() + t * se),
                p=sign_flip_p(d), mde=float(mde))


def summarise(rows):
    """Per (arm, scale, metric): mean, seed-to-seed std, and the paired comparison with clean."""
    by = {}
    for r in rows:
        by.setdefault((r["arm"], r["scale"]), {})[r["seed"]] = r
    out = []
    for (arm, scale), seeds in sorted(by.items(), key=lambda kv: (arm_order(kv[0][0]), kv[0][1])):
        clean = by.get(("clean", scale), {})
        shared = sorted(set(seeds) & set(clean))
        for m in METRICS:
            values = [seeds[s][m] for s in sorted(seeds)]
            row = dict(arm=arm, scale=scale, metric=m, seeds=len(values),
                       mean=float(np.mean(values)),
                       std=float(np.std(values, ddof=1)) if len(values) > 1 else math.nan)
            if arm != "clean":
                row.update(paired_stats([seeds[s][m] for s in shared],
                                        [clean[s][m] for s in shared]))
            out.append(row)
    return out


def arm_order(arm):
    names = ["clean", "eta2.5", "eta5", "eta10", "eta20", "cep-u", "cep-g", "ip", "cads"]
    return (names.index(arm) if arm in names else len(names), arm)


# ----------------------------------------------------------------------------- report

def write_report(rows, summary, out, ref, meta):
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, ["arm", "seed", "scale", *METRICS, "n"])
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(out, "summary.csv"), "w", newline="") as f:
        keys = ["arm", "scale", "metric", "seeds", "mean", "std",
                "n", "diff", "lo", "hi", "p", "mde"]
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows({k: r.get(k, "") for k in keys} for r in summary)
    lines = [f"Classifier test accuracy {float(ref['test_accuracy']):.3f}; memorisation "
             f"threshold {float(ref['mem_threshold']):.4f} (5th percentile of held-out images' "
             f"distance to the training set); {meta}.", ""]
    for m in ("fid", "precision", "recall", "class_acc", "nn_train", "mem_ratio", "rmd_top1"):
        lines += metric_table(summary, m) + [""]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines))
    return "\n".join(lines)


def metric_table(summary, metric):
    """One Markdown table: rows = arms, columns = scales; mean ± std, then diff [CI] p vs clean."""
    mine = [r for r in summary if r["metric"] == metric]
    scales = sorted({r["scale"] for r in mine})
    lines = [f"**{metric}** (mean ± seed std; arm - clean: mean difference [95 % CI], "
             "sign-flip p, smallest detectable difference)", "",
             "| arm | seeds | " + " | ".join(f"s={s:g}" for s in scales) + " |",
             "|---|---|" + "---|" * len(scales)]
    for arm in sorted({r["arm"] for r in mine}, key=arm_order):
        cells = []
        for s in scales:
            r = next((r for r in mine if r["arm"] == arm and r["scale"] == s), None)
            if r is None:
                cells.append("")
                continue
            cell = f"{r['mean']:.3f} ± {r['std']:.3f}"
            if arm != "clean" and r["n"] >= 2:
                mark = "**" if r["lo"] > 0 or r["hi"] < 0 else ""
                cell += (f"<br>{mark}{r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]{mark} "
                         f"p={r['p']:.2f} mde={r['mde']:.3f}")
            cells.append(cell)
        seeds = max(r["seeds"] for r in mine if r["arm"] == arm)
        lines.append(f"| {arm} | {seeds} | " + " | ".join(cells) + " |")
    return lines


def plot(summary, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    get = {(r["arm"], r["scale"], r["metric"]): r for r in summary}
    scales = sorted({r["scale"] for r in summary})
    arms = sorted({r["arm"] for r in summary}, key=arm_order)
    fig, ax = plt.subplots(2, 2, figsize=(12, 9))
    etas = [(0, "clean"), (2.5, "eta2.5"), (5, "eta5"), (10, "eta10"), (20, "eta20")]
    for s in scales:  # the paper's U-shape? (Fig. 2)
        pts = [(e, get[(a, s, "fid")]) for e, a in etas if (a, s, "fid") in get]
        ax[0, 0].errorbar([e for e, _ in pts], [r["mean"] for _, r in pts], fmt="o-", capsize=3,
                          yerr=[r["std"] for _, r in pts], label=f"s={s:g}")
    ax[0, 0].set(xlabel="symmetric label corruption eta (%)",
                 ylabel="FID (held-out, mean ± seed std)",
                 title="FID against eta, one line per guidance scale")
    for arm in arms:  # Fig. 3: FID against precision, one point per scale
        pts = [(get[(arm, s, "precision")]["mean"], get[(arm, s, "fid")]["mean"]) for s in scales
               if (arm, s, "fid") in get]
        ax[0, 1].plot(*zip(*pts), "o-", label=arm, lw=1)
    ax[0, 1].set(xlabel="precision", ylabel="FID", title="FID against precision (points: s = "
                 + ", ".join(f"{s:g}" for s in scales) + ")")
    s_mid = scales[len(scales) // 2]
    x = np.arange(len(arms))
    for k, (m, label) in enumerate([("mem_ratio", "memorisation ratio"), ("recall", "recall")]):
        vals = [get.get((a, s_mid, m), {"mean": np.nan, "std": 0}) for a in arms]
        ax[1, 0].bar(x + (k - 0.5) * 0.4, [v["mean"] for v in vals], 0.4,
                     yerr=[v["std"] for v in vals], capsize=2, label=label)
    ax[1, 0].set(xticks=x, title=f"memorisation and diversity at s={s_mid:g} (mean ± seed std)")
    ax[1, 0].set_xticklabels(arms, rotation=30)
    others = [a for a in arms if a != "clean"]
    for k, s in enumerate(scales):  # paired differences with their intervals
        rows = [get[(a, s, "fid")] for a in others if (a, s, "fid") in get]
        y = np.arange(len(rows)) + (k - 1) * 0.25
        xerr = [[r["diff"] - r["lo"] for r in rows], [r["hi"] - r["diff"] for r in rows]]
        ax[1, 1].errorbar([r["diff"] for r in rows], y, xerr=xerr, fmt="o", capsize=3,
                          label=f"s={s:g}")
    many = [r for r in summary if r["metric"] == "fid" and r["arm"] != "clean" and r["n"] > 2]
    reach = 1.5 * max([abs(r[k]) for r in many for k in ("lo", "hi")] or [1.0])
    ax[1, 1].set_xlim(-reach, reach)  # 2-seed t-intervals (1 degree of freedom) run off the axis
    ax[1, 1].axvline(0, color="k", lw=0.8)
    ax[1, 1].set(yticks=np.arange(len(others)),
                 xlabel="FID(arm) - FID(clean), paired, 95 % CI (2-seed intervals clipped)",
                 title="paired differences against clean (left = better)")
    ax[1, 1].set_yticklabels(others)
    for a in ax.flat:
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "sweep.png"), dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- driver

def jobs_for(args, size, arms, seeds):
    ref_path = os.path.join(args.out, "reference.npz")
    return [(arm, ARMS[arm] if arm in ARMS else arms[arm], seed, size, args.out, ref_path)
            for seed in seeds for arm in arms]


def run_all(jobs, args, done_rows, t_start, total):
    """Run jobs (in a pool of spawned one-thread workers), printing progress and time left."""
    if args.workers == 1:
        results = map(run_job, jobs)
    else:
        spawn = multiprocessing.get_context("spawn")  # fresh processes: one thread each
        pool = concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=spawn)
        results = pool.map(run_job, jobs)
    for job, rows in zip(jobs, results):
        done_rows += rows
        finished = len({(r["arm"], r["seed"]) for r in done_rows if r["arm"] != "cads"})
        elapsed = time.time() - t_start
        left = elapsed / max(finished, 1) * (total - finished)
        print(f"[sweep] {job[0]}-s{job[2]} done: {finished}/{total} jobs, {elapsed / 60:.1f} min, "
              f"about {left / 60:.0f} min left", flush=True)
    return done_rows


def main(argv=None):
    args = parse_args(argv)
    size = {**SETTINGS[args.setting], **(SMOKE if args.smoke else {})}
    os.makedirs(args.out, exist_ok=True)
    system.write_json(os.path.join(args.out, "sweep.json"),
                      {**vars(args), **size, "arms": ARMS, "cads": CADS})
    t_start = time.time()
    ref = reference(args.out, size)
    other_seeds = range(args.other_seeds)
    early = ["cep-u", "cep-g", "clean", "eta5"]  # the CEP choice of the gamma sweep needs these
    first = jobs_for(args, size, early, other_seeds) \
        + jobs_for(args, size, [a for a in ARMS if a not in early], other_seeds) \
        + jobs_for(args, size, list(MAIN_ARMS), range(args.other_seeds, args.seeds))
    total = len(first) + 2 * len(other_seeds)
    rows = run_all(first, args, [], t_start, total)
    def mean_fid(arm):
        return np.mean([r["fid"] for r in rows
                        if r["arm"] == arm and r["scale"] == 2.0 and r["seed"] in other_seeds])
    better = min(("cep-u", "cep-g"), key=mean_fid)
    kind = "uniform" if better == "cep-u" else "gaussian"
    gamma_arms = {f"{better}-g{g:g}": ["--cep", kind, "--gamma", str(g)] for g in (0.3, 3)}
    print(f"[sweep] gamma sweep for {better} (lower mean FID at s=2)", flush=True)
    rows = run_all(jobs_for(args, size, gamma_arms, other_seeds), args, rows, t_start, total)
    summary = summarise(rows)
    minutes = (time.time() - t_start) / 60
    meta = (f"{args.setting}: {size['train_per_class']} training images per class, "
            f"{size['steps']} steps x {size['batch']}, {size['per_class']} samples per class, "
            f"DPM-Solver++ {size['sample_steps']} steps; gamma sweep on {better}; "
            f"this run took {minutes:.0f} min")
    print(write_report(rows, summary, args.out, ref, meta))
    plot(summary, args.out)
    print(f"[sweep] wrote {args.out}/results.csv, summary.csv, results.md, sweep.png "
          f"({minutes:.1f} min)")
    return rows, summary


if __name__ == "__main__":
    main()
