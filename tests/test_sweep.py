"""sweep.py --smoke: the whole Fashion-MNIST grid, tiny, on CPU (train, sample, evaluate, table, plot)."""
import csv
import os

import sweep


def test_smoke_grid_runs_and_resumes(tmp_path):
    out = str(tmp_path / "sweep")
    sweep.main(["--out", out, "--smoke", "--parallel", "2"])
    with open(os.path.join(out, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    models = {r["model"] for r in rows}
    assert {f"{name}-s0" for name, _ in sweep.GRID} <= models
    assert "clean-s1" in models and len(models) == len(sweep.GRID) + 3  # the second seeds
    assert {r["scale"] for r in rows} == {"1.0", "2.0"}
    assert all(float(r["fid"]) >= 0 and 0 <= float(r["precision"]) <= 1 for r in rows)
    assert os.path.exists(os.path.join(out, "sweep.png")) and os.path.exists(os.path.join(out, "results.md"))
    before = os.path.getmtime(os.path.join(out, "clean-s0", "ckpt.pt"))
    sweep.main(["--out", out, "--smoke", "--parallel", "2"])  # everything exists: nothing is redone
    assert os.path.getmtime(os.path.join(out, "clean-s0", "ckpt.pt")) == before
