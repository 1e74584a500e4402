"""Does slight corruption help on real data we can train here? The Fashion-MNIST eta and CEP grid.

    python sweep.py --out runs/fmnist-sweep --parallel 4      # one GPU (README: the FLOP budget)
    python sweep.py --out /tmp/smoke --smoke                  # the same grid, tiny, on CPU (CI)

Every model has the same architecture, seed, images seen and schedule; only the conditions differ:
symmetric label corruption eta in {0, 2.5, ..., 20} % (Sec. 3.1), asymmetric corruption at 5 %
within {T-shirt/top, Pullover, Coat, Shirt} (Sec. 3.3), CEP-U / CEP-G with gamma 1 (Sec. 5) and the
IP baseline (Table 1). Then a second seed for clean, the best eta and the best CEP, so the effect
can be told from seed noise. Models live in pixel space (32x32, padded): at this size a U-Net on
pixels is cheap, and it keeps a second trained network (the autoencoder) out of every FID.
Each stage calls train.py, sample.py or metrics.py and is skipped when its output exists, so a
killed sweep resumes where it stopped. Evaluation: 1,000 samples per class against the 10K test
images, DPM-Solver++ 50 steps, guidance {1, 1.5, 2, 3, 4}, FID / precision / recall / RMD in the
feature space of a classifier trained here, sample entropy on a small VQ autoencoder trained here.
"""
import argparse
import concurrent.futures
import csv
import json
import os
import subprocess
import sys

GRID = [("clean", [])] + \
    [(f"eta{e:g}", ["--eta", str(e / 100)]) for e in (2.5, 5, 7.5, 10, 15, 20)] + \
    [("asym5", ["--eta", "0.05", "--corruption", "asymmetric", "--corrupt-classes", "0,2,4,6"]),
     ("cep-u", ["--cep", "uniform", "--gamma", "1"]),
     ("cep-g", ["--cep", "gaussian", "--gamma", "1"]),
     ("ip", ["--input-perturbation", "0.1"])]

FULL = dict(steps=12000, batch=128, per_class=1000, guidance="1,1.5,2,3,4", sample_steps=50,
            classifier_steps=2500, vq_steps=3000, vq_eval=2000)
SMOKE = dict(steps=3, batch=8, per_class=2, guidance="1,2", sample_steps=3, classifier_steps=3, vq_steps=2, vq_eval=16)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/fmnist-sweep", help="sweep directory (resumable)")
    p.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST idx files")
    p.add_argument("--smoke", action="store_true", help="the same grid, tiny (CPU, CI)")
    p.add_argument("--parallel", type=int, default=1, help="runs trained / sampled at once (they share the GPU)")
    p.add_argument("--steps", type=int, default=None, help="training steps per model (default 12000; smoke 3)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default 128; smoke 8)")
    p.add_argument("--preset", default="fmnist", help="U-Net preset (unet.py)")
    p.add_argument("--seeds", default="0,1", help="first seed for the grid, second for the repeats")
    p.add_argument("--inception", default=None, help="pytorch-fid Inception weights: also report Inception FID")
    return p.parse_args(argv)


def run(cmd, log):
    """One stage as a subprocess; its output goes to a log file, a failure stops the sweep."""
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"failed: {' '.join(cmd)}\n(see {log})")


def model_run(name, flags, seed, args, size):
    """Train, sample and evaluate one model; every stage is skipped when its output exists."""
    run_dir = os.path.join(args.out, f"{name}-s{seed}")
    log = run_dir + ".log"
    py = sys.executable
    if not done_training(run_dir, size["steps"]):
        resume = ["--resume"] if os.path.exists(os.path.join(run_dir, "ckpt.pt")) else []
        run([py, "train.py", "--dataset", "fashion-mnist", "--data-root", args.data_root, "--image-size", "32",
             "--preset", args.preset, "--steps", str(size["steps"]), "--batch-size", str(size["batch"]),
             "--lr", "2e-4", "--ema-decay", "0.999", "--seed", str(seed), "--out", run_dir, *resume, *flags], log)
    samples = os.path.join(run_dir, "samples")
    scales = size["guidance"].split(",")
    if not all(os.path.exists(os.path.join(samples, f"s{float(s):g}", "samples.npz")) for s in scales):
        run([py, "sample.py", "--ckpt", run_dir, "--out", samples, "--per-class", str(size["per_class"]),
             "--guidance", size["guidance"], "--sampler", "dpm", "--steps", str(size["sample_steps"]),
             "--batch-size", "500", "--no-images"], log)
    for features in feature_spaces(args):
        out = os.path.join(run_dir, "metrics-" + features.split(":")[0])
        if not os.path.exists(os.path.join(out, "metrics.json")):
            metrics = "fid,pr,rmd,entropy" if features.startswith("classifier") else "fid,is"
            run([py, "metrics.py", "--real", "dataset:fashion-mnist:test", "--data-root", args.data_root,
                 "--image-size", "32", "--fake", f"{name}-s{seed}={samples}", "--features", features,
                 "--metrics", metrics, "--vq", os.path.join(args.out, "vq", "ckpt.pt"),
                 "--cache", os.path.join(args.out, "cache"), "--out", out], log)
    return run_dir


def feature_spaces(args):
    spaces = [f"classifier:{os.path.join(args.out, 'classifier.pt')}"]
    return spaces + ([f"inception:{args.inception}"] if args.inception else [])


def done_training(run_dir, steps):
    log = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(log) or not os.path.exists(os.path.join(run_dir, "ckpt.pt")):
        return False
    with open(log) as f:
        return json.loads(f.readlines()[-1])["step"] >= steps


def shared_models(args, size):
    """The evaluation networks, trained once: the feature classifier and the VQ for entropy."""
    py, log = sys.executable, os.path.join(args.out, "shared.log")
    if not os.path.exists(os.path.join(args.out, "classifier.pt")):
        run([py, "metrics.py", "train-classifier", "--dataset", "fashion-mnist", "--data-root", args.data_root,
             "--image-size", "32", "--epochs", "100", "--max-steps", str(size["classifier_steps"]),
             "--out", os.path.join(args.out, "classifier.pt")], log)
    if not os.path.exists(os.path.join(args.out, "vq", "ckpt.pt")):
        run([py, "vae.py", "train", "--dataset", "fashion-mnist", "--data-root", args.data_root, "--image-size", "32",
             "--preset", "small-vq", "--steps", str(size["vq_steps"]), "--eval-images", str(size["vq_eval"]),
             "--out", os.path.join(args.out, "vq")], log)


def results(run_dirs):
    """One row per (model, guidance scale), from each run's metrics.json."""
    rows = []
    for run_dir in run_dirs:
        name = os.path.basename(run_dir)
        for path in sorted(p for p in os.listdir(run_dir) if p.startswith("metrics-")):
            with open(os.path.join(run_dir, path, "metrics.json")) as f:
                for row in json.load(f)["rows"]:
                    rows.append({"model": name, "features": path[len("metrics-"):], **row})
    return rows


def best(rows, names, seed):
    """The model (of `names`) with the lowest FID at any guidance scale (classifier features)."""
    fids = {n: min(r["fid"] for r in rows if r["model"] == f"{n}-s{seed}" and r["features"] == "classifier")
            for n in names}
    return min(fids, key=fids.get)


def write_tables(rows, out):
    keys = ["model", "features", "scale", "fid", "precision", "recall", "rmd_top1", "entropy", "is", "n"]
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    scales = sorted({r["scale"] for r in rows})
    lines = ["| model | " + " | ".join(f"FID s={s:g}" for s in scales) + " | best FID: s | precision | recall | RMD top-1% | entropy |",
             "|---" * (len(scales) + 6) + "|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model and r["features"] == "classifier"]
        by_scale = {r["scale"]: r for r in mine}
        b = min(mine, key=lambda r: r["fid"])
        lines.append(f"| {model} | " + " | ".join(f"{by_scale[s]['fid']:.2f}" if s in by_scale else "" for s in scales)
                     + f" | {b['scale']:g} | {b['precision']:.3f} | {b['recall']:.3f} | {b['rmd_top1']:.2f} | {b['entropy']:.4f} |")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("FID, precision, recall, RMD: classifier features (Fashion-MNIST CNN trained by metrics.py); "
                "entropy: small VQ of vae.py.\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(rows, out, seed):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if r["features"] == "classifier"]
    fid = {(r["model"], r["scale"]): r for r in rows}
    scales = sorted({r["scale"] for r in rows})
    etas = [(0.0, "clean")] + [(e, f"eta{e:g}") for e in (2.5, 5, 7.5, 10, 15, 20)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for s in scales:  # FID against eta, one line per guidance scale (Fig. 2's U-shape)
        pts = [(e, fid[(f"{n}-s{seed}", s)]["fid"]) for e, n in etas if (f"{n}-s{seed}", s) in fid]
        axes[0].plot(*zip(*pts), "o-", label=f"s={s:g}")
    axes[0].set(xlabel="corruption eta (%)", ylabel="FID", title="FID against eta (symmetric)")
    for model in dict.fromkeys(r["model"] for r in rows):  # FID against precision, like Fig. 3
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["scale"])
        axes[1].plot([r["precision"] for r in mine], [r["fid"] for r in mine], "o-", label=model, lw=1)
        if model.rsplit("-s", 1)[0] in ("clean", "cep-u", "cep-g", "ip"):
            axes[2].plot([r["scale"] for r in mine], [r["fid"] for r in mine], "o-", label=model, lw=1)
    axes[1].set(xlabel="precision", ylabel="FID", title="FID against precision (one point per scale)")
    axes[2].set(xlabel="guidance scale", ylabel="FID", title="clean against CEP and IP")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "sweep.png"), dpi=120)


def main(argv=None):
    args = parse_args(argv)
    size = dict(SMOKE if args.smoke else FULL)
    size.update({k: v for k, v in (("steps", args.steps), ("batch", args.batch_size)) if v is not None})
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump({**vars(args), **size, "grid": GRID}, f, indent=1)
    shared_models(args, size)
    seed0, seed1 = (int(s) for s in args.seeds.split(","))
    flags = dict(GRID)
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        dirs = list(pool.map(lambda g: model_run(g[0], g[1], seed0, args, size), GRID))
        rows = results(dirs)
        repeats = ["clean", best(rows, [n for n, _ in GRID if n.startswith("eta")], seed0),
                   best(rows, ["cep-u", "cep-g"], seed0)]
        print(f"second seed for: {', '.join(repeats)}")
        dirs += list(pool.map(lambda n: model_run(n, flags[n], seed1, args, size), repeats))
    rows = results(dirs)
    write_tables(rows, args.out)
    plot(rows, args.out, seed0)
    print(f"wrote {args.out}/results.csv, results.md, sweep.png")


if __name__ == "__main__":
    main()
