"""metrics.py's report: the table it prints and the plots of a guidance sweep (FID against the
guidance scale, FID against precision: the paper's Fig. 3)."""
import os

COLUMNS = [("fid", "FID"), ("sfid", "sFID"), ("is", "IS"), ("precision", "prec"),
           ("recall", "recall"),
           ("density", "density"), ("coverage", "cover"), ("class_acc", "acc"),
           ("rmd_top1", "RMD1%"),
           ("entropy", "entropy"),
           ("l2_5nn", "L2-5NN"), ("mem_ratio", "mem"), ("clip_score", "CLIP")]


def print_table(rows, extractor_name):
    cols = [(k, h) for k, h in COLUMNS if any(k in r for r in rows)]
    print(f"features: {extractor_name}")
    print(f"{'run':<16}{'scale':>7}{'n':>7}" + "".join(f"{h:>9}" for _, h in cols))
    for r in rows:
        scale = "-" if r["scale"] is None else f"{r['scale']:g}"
        print(f"{r['run'][:16]:<16}{scale:>7}{r['n']:>7}"
              + "".join(f"{r[k]:>9.4g}" if k in r else f"{'':>9}" for k, _ in cols))


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
    plots = {"fid_vs_" + x_key: (x_key, "fid", x_label, "FID"),
             "precision_recall": ("recall", "precision", "recall", "precision")}
    for name, (xk, yk, xlabel, ylabel) in plots.items():
        missing = sorted({r["run"] for r in rows if r.get(xk) is None or r.get(yk) is None})
        if missing:
            print(f"note: no {name}.png: {', '.join(missing)} give no "
                  f"{xlabel if xk == 'scale' else xk} or {yk} (a guidance scale comes from a "
                  f"sample.py folder OUT/s{{scale}}/samples.npz)")
            continue
        fig, ax = plt.subplots(figsize=(5, 4))
        for run, rs in runs.items():
            ax.plot([r[xk] for r in rs], [r[yk] for r in rs], "o-", label=run)
            for r in rs:
                if r["scale"] is not None:
                    ax.annotate(f"{r['scale']:g}", (r[xk], r[yk]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} vs {xlabel} ({extractor_name})", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"{name}.png"), dpi=120)
        plt.close(fig)
