"""sweep.py: its statistics against closed forms and scipy; the whole experiment, tiny."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
from scipy import stats

import train
from experiments import paired, sweep


def test_sign_flip_p_value_enumerates_all_flips():
    assert paired.sign_flip_p([1, 2, 3]) == pytest.approx(2 / 8)  # only +++ and --- reach 6
    assert paired.sign_flip_p([1, -1]) == 1.0
    assert paired.sign_flip_p([0.5] * 6) == pytest.approx(2 / 64)  # the smallest p with 6 seeds
    d = [0.3, -0.1, 0.7, 0.2, 0.4]
    sums = [abs(sum(s * x for s, x in zip(signs, d))) for signs in np.ndindex(*(2,) * 5)
            for signs in [[1 - 2 * b for b in signs]]]
    assert paired.sign_flip_p(d) == pytest.approx(np.mean(np.array(sums) >= sum(d) - 1e-12))


def test_paired_stats_interval_matches_scipy_and_mde_has_power_080():
    rng = np.random.default_rng(0)
    clean = rng.normal(10, 1, 6)
    arm = clean + rng.normal(-0.5, 0.3, 6)
    s = paired.paired_stats(arm, clean)
    ci = stats.ttest_rel(arm, clean).confidence_interval(0.95)
    assert (s["lo"], s["hi"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert s["diff"] == pytest.approx(np.mean(arm - clean))
    # at a true difference of mde the two-sided 5 % paired t-test has power close to 0.8
    n, se = 6, np.std(arm - clean, ddof=1) / np.sqrt(6)
    t_crit = stats.t.ppf(0.975, n - 1)
    shift = s["mde"] / se
    power = 1 - stats.nct.cdf(t_crit, n - 1, shift) + stats.nct.cdf(-t_crit, n - 1, shift)
    assert 0.75 < power < 0.85


def test_holm_adjusts_step_down():
    assert paired.holm([0.01, 0.04]) == pytest.approx([0.02, 0.04])
    assert paired.holm([0.03, 0.02]) == pytest.approx([0.04, 0.04])  # monotone in the p order
    assert paired.holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])


def test_the_split_is_stratified_seeded_disjoint_and_shared_with_train():
    size = {**sweep.SETTINGS["digits"]}
    images, labels, parts = sweep.split(size)
    again = sweep.split(size)[2]
    assert all(np.array_equal(parts[k], again[k]) for k in parts)  # fixed by its seeds
    used = np.concatenate([parts[k] for k in ("train", "classifier", "reference", "floor")])
    assert len(used) == len(set(used.tolist())) == len(labels) == 1797  # disjoint, complete
    assert set(parts["unseen"]) <= set(parts["classifier"])  # never scored by the classifier
    assert np.bincount(labels[parts["train"]]).tolist() == [30] * 10
    assert np.bincount(labels[parts["unseen"]]).tolist() == [30] * 10
    for k in ("classifier", "reference", "floor"):  # thirds of every class
        rest = np.bincount(labels) - 30
        assert (np.abs(np.bincount(labels[parts[k]]) - rest / 3) <= 1).all(), k
    full = train.data.load_dataset("digits")  # train.py draws the same training images
    assert parts["train"].tolist() == train.data.per_class_indices(full.labels, 30, 0).tolist()
    assert parts["train"].max() > 1000  # not the first writers of the split


def test_smoke_experiment_runs_and_resumes(tmp_path, capsys):
    """The whole experiment, tiny; a training killed at step 2 of 4 is resumed, and a second run
    redoes nothing."""
    assert sweep.parse_args(["--smoke"]).out == "runs/sweep-digits-smoke"  # not the real sweep's
    out = str(tmp_path / "sweep")
    size = {**sweep.SETTINGS["digits"], **sweep.SMOKE}
    killed = os.path.join(out, "clean-s0")
    train.main(sweep.train_flags([], 0, {**size, "steps": 2}, killed))
    assert sweep.checkpoint_step(killed) == 2
    no_yardstick = {"fingerprint": "0" * 16}
    assert sweep.steps_left(("clean", 0, size, out), no_yardstick) == size["steps"] - 2
    assert sweep.steps_left(("cads", 0, size, out), no_yardstick) == 0
    argv = ["--out", out, "--smoke", "--workers", "1", "--seeds", "3", "--mechanism-seeds", "2",
            "--other-seeds", "1"]
    rows, summary = sweep.main(argv)
    assert sweep.checkpoint_step(killed) == size["steps"]
    assert "resuming at step 2" in capsys.readouterr().out  # not restarted
    seeds = {}
    for r in rows:
        seeds.setdefault(r["arm"], set()).add(r["seed"])
    assert {a: len(seeds[a]) for a in sweep.PRIMARY} == {a: 3 for a in sweep.PRIMARY}
    assert {a: len(seeds[a]) for a in sweep.MECHANISM} == {a: 2 for a in sweep.MECHANISM}
    assert all(len(seeds[a]) == 1 for a in sweep.OTHER)
    assert not os.path.exists(os.path.join(out, "cads-s0"))  # CADS samples the clean model
    with open(os.path.join(out, "results.csv")) as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and {r["scale"] for r in table} == {"1.0", "2.0"}
    assert all(0 <= float(r["precision"]) <= 1 and 0 <= float(r["copy_share"]) <= 1
               for r in table)
    n = {r["scale"]: int(r["n"]) for r in table}
    assert n == {"2.0": 10 * size["samples"][2.0], "1.0": 10 * size["samples"][1.0]}
    d16 = [r for r in table if r["arm"] == "cep-g-d16"][0]
    assert float(d16["delta_rms"]) == 1.0 and float(d16["delta_over_dist"]) > 0
    primary = [r for r in summary if "p_holm" in r]
    assert sorted(r["arm"] for r in primary) == sorted(sweep.CONTRASTS)
    assert all(r["n"] == 3 and r["p_holm"] >= r["p"] and r["scale"] == 2.0 for r in primary)
    mech = [r for r in summary if r["arm"] == "cep-g-d16" and r["metric"] == "fid"]
    assert all(r["baseline"] == "clean-d16" and r["n"] == 2 for r in mech)
    report = open(os.path.join(out, "results.md")).read()
    assert "**Primary contrasts**" in report and "| real held-out |" in report
    assert "**" not in report.split("**fid**")[1].split("**kid**")[0]  # < 4 seeds: no bold
    for name in ("summary.csv", "sweep.png", "grids_s0_s2.png", "reference.npz", "split.npz",
                 "sweep.json"):
        assert os.path.exists(os.path.join(out, name))
    before = os.path.getmtime(os.path.join(out, "clean-s0", "ckpt.pt"))
    npz = os.path.join(out, "clean-s0", "samples", "s2", "samples.npz")
    sample_time = os.path.getmtime(npz)
    samples = os.path.join(out, "clean-s0", "samples")
    assert sweep.samples_done(samples, size, cads=False, seed=0)
    for changed in ({"steps": size["steps"] + 1}, {"sample_steps": 7},
                    {"samples": {2.0: 5, 1.0: 2}}):
        assert not sweep.samples_done(samples, {**size, **changed}, cads=False, seed=0)
    cut = str(tmp_path / "cut")
    shutil.copytree(samples, cut)
    with open(os.path.join(cut, "s2", "samples.npz"), "r+b") as f:
        f.truncate(100)  # cut short (by something other than sample.py, which writes atomically)
    assert not sweep.samples_done(cut, size, cads=False, seed=0)
    again, _ = sweep.main(argv)  # every artefact is complete: nothing is trained or sampled again
    assert "0 training steps left" in capsys.readouterr().out  # no rate from evaluated jobs
    assert os.path.getmtime(os.path.join(out, "clean-s0", "ckpt.pt")) == before
    assert os.path.getmtime(npz) == sample_time
    assert [r["fid"] for r in again] == [r["fid"] for r in rows]


def test_job_records_resume_a_sweep_on_a_fresh_machine(tmp_path):
    """The records and the feature classifier, copied to a new folder: the yardstick is rebuilt
    there around that classifier, the recorded jobs are not run again, and a record of another
    yardstick is rerun and gives its row."""
    out, moved = str(tmp_path / "sweep"), str(tmp_path / "moved")
    argv = ["--smoke", "--workers", "1", "--seeds", "2", "--mechanism-seeds", "0"]
    rows, _ = sweep.main([*argv, "--out", out])
    record = json.load(open(os.path.join(out, "jobs", "eta5-s1.json")))
    assert record["rows"] == [r for r in rows if (r["arm"], r["seed"]) == ("eta5", 1)]
    assert os.path.exists(os.path.join(out, "jobs", "clean-s0-grid.npz"))
    shutil.copytree(os.path.join(out, "jobs"), os.path.join(moved, "jobs"),
                    ignore=shutil.ignore_patterns("*-grid.npz"))  # records without grids:
    sweep.plot_grids(moved)  # no grid to draw, no error
    assert not os.path.exists(os.path.join(moved, "grids_s0_s2.png"))
    shutil.copytree(os.path.join(out, "jobs"), os.path.join(moved, "jobs"), dirs_exist_ok=True)
    shutil.copy2(os.path.join(out, "classifier.pt"), moved)
    fitted = os.path.getmtime(os.path.join(moved, "classifier.pt"))
    record["key"]["yardstick"] = "0" * 16  # as if made against another yardstick
    json.dump(record, open(os.path.join(moved, "jobs", "eta5-s1.json"), "w"))
    size = {**sweep.SETTINGS["digits"], **sweep.SMOKE}
    ref = np.load(os.path.join(out, "reference.npz"))
    assert sweep.steps_left(("eta5", 1, size, moved), ref) == size["steps"]  # to run again
    assert sweep.steps_left(("eta5", 0, size, moved), ref) == 0
    again, _ = sweep.main([*argv, "--out", moved])
    assert [d for d in os.listdir(moved) if d.endswith(("-s0", "-s1"))] == ["eta5-s1"]
    timeless = lambda rs: [{k: v for k, v in r.items() if k != "minutes"} for r in rs]  # noqa: E731
    assert timeless(again) == timeless(rows)  # every number, the rerun job's included
    assert os.path.exists(os.path.join(moved, "grids_s0_s2.png"))
    assert os.path.getmtime(os.path.join(moved, "classifier.pt")) == fitted  # not fit again
    ref, ref_moved = (np.load(os.path.join(d, "reference.npz")) for d in (out, moved))
    assert ref["fingerprint"] == ref_moved["fingerprint"]
    assert ref["classifier_accuracy"] == ref_moved["classifier_accuracy"]


def test_latent_setting_smoke_runs_the_paper_pipeline_and_resumes(tmp_path):
    """Fashion-MNIST through the LDM pipeline, tiny: autoencoder, the training set cached as
    latents (both flips), training on latents, sampling and decoding, metrics against
    reconstructed held-out images; a second run redoes nothing."""
    out = str(tmp_path / "latent")
    argv = ["--setting", "fmnist-latent", "--smoke", "--out", out, "--workers", "1", "--seeds", "2"]
    rows, summary = sweep.main(argv)
    report = json.load(open(os.path.join(out, "autoencoder", "report.json")))
    assert report["steps"] == sweep.SMOKE_FIRST_STAGE["steps"] and report["scale"] > 0
    cache = sweep.data.LatentCache(os.path.join(out, "latents"))
    assert cache.latents.shape == (30, 2, 4, 8, 8)  # the training set, both flips (as committed)
    split = dict(np.load(os.path.join(out, "split.npz")))
    parts = [split[k] for k in ("train", "unseen", "classifier", "reference", "floor")]
    assert sum(map(len, parts)) == len(set(np.concatenate(parts).tolist()))  # disjoint
    assert sum(map(len, parts[:3])) == 60000  # the training split, whole
    assert min(split["reference"].min(), split["floor"].min()) >= 60000  # the test split
    assert np.array_equal(cache.labels, sweep.data.load_dataset(
        "fashion-mnist", sweep.SETTINGS["fmnist-latent"]["data_root"]).labels[split["train"]])
    config = json.load(open(os.path.join(out, "clean-s0", "config.json")))
    assert config["space"] == "latent" and config["vae_sha256"] == cache.meta["weights_sha256"]
    assert config["flip"]  # drawn per sample, as the committed results were trained
    with np.load(os.path.join(out, "clean-s0", "samples", "s2", "samples.npz")) as f:
        assert f["arr_0"].shape == (30, 32, 32, 1)  # decoded by the autoencoder
    assert {r["arm"] for r in rows} == set(sweep.PRIMARY) and len(rows) == 12
    results = open(os.path.join(out, "results.md")).read()
    assert "real held-out (reconstructed)" in results and "held-out PSNR" in results
    assert "real held-out, half mirrored (reconstructed)" in results  # the floor of flipped data
    again, _ = sweep.main(argv)
    assert [r["fid"] for r in again] == [r["fid"] for r in rows]


def test_glyph_setting_smoke_fixes_the_budget_first(tmp_path):
    """Many classes, tiny: six characters in the designs of four small font packages, a seeded
    split of every class's designs, no flips; the budget ladder trains clean seed 0 alone before
    any arm; the control arm runs; the scan's scales are sampled on the first seed only."""
    out = str(tmp_path / "glyphs")
    argv = ["--setting", "glyphs-latent", "--smoke", "--out", out, "--workers", "1", "--seeds",
            "2", "--control-seeds", "1"]
    rows, summary = sweep.main(argv)
    record = json.load(open(os.path.join(out, "glyphs", "glyphs.json")))
    designs = len(record["designs"])
    assert designs >= 4 and len(record["chars"]) == 6 and record["dropped"]  # twins removed
    split = dict(np.load(os.path.join(out, "split.npz")))
    parts = [split[k] for k in ("train", "classifier", "reference", "floor")]
    assert sorted(np.concatenate(parts).tolist()) == list(range(6 * designs))  # disjoint, whole
    labels = np.repeat(np.arange(6), designs)
    assert [np.bincount(labels[p]).tolist() for p in parts[:3]] == [[1] * 6] * 3
    cache = sweep.data.LatentCache(os.path.join(out, "latents"))
    assert cache.latents.shape == (6, 1, 4, 8, 8) and not cache.flip  # mirrored glyphs: no
    config = json.load(open(os.path.join(out, "clean-s0", "config.json")))
    assert not config["flip"] and config["num_classes"] == 6
    ladder = json.load(open(os.path.join(out, "ladder.json")))
    assert [r["steps"] for r in ladder][0] == 2 and "copy_share" in ladder[0]
    budget = sweep.budget_rule(ladder) or sweep.SMOKE_GLYPHS["ladder"][-1]
    assert sweep.checkpoint_step(os.path.join(out, "clean-s0")) == budget
    control = json.load(open(os.path.join(out, "emb-drop-s0", "config.json")))
    assert control["embedding_dropout"] == 0.1
    assert {(r["arm"], r["seed"], r["scale"]) for r in rows} == {
        *((a, s, 2.0) for a in sweep.PRIMARY for s in (0, 1)),
        *((a, 0, 1.0) for a in sweep.PRIMARY), ("emb-drop", 0, 2.0), ("emb-drop", 0, 1.0)}
    results = open(os.path.join(out, "results.md")).read()
    for part in ("Budget ladder", "Best guidance scale", "between classes", "reconstructions"):
        assert part in results, part
    assert os.path.exists(os.path.join(out, "ladder.png"))


def test_budget_rule_takes_the_first_doubling_that_gains_at_most_30_percent():
    rows = [{"steps": s, "fid": f} for s, f in ((2, 100.0), (4, 60.0), (8, 43.0), (16, 40.0))]
    assert sweep.budget_rule(rows) == 8  # 43 / 60 = 0.717 >= 0.7; 60 / 100 = 0.6 is not
    assert sweep.budget_rule(rows[:2]) is None
    assert sweep.budget_rule([{"steps": 2, "fid": 10.0}, {"steps": 4, "fid": 12.0}]) == 4
