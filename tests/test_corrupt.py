"""Tests for corrupt.py: condition corruption (Sec. 3.1, 3.3, Table 7) and its manifest."""
import os

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import corrupt
from experiments import corrupt_dataset


def imbalanced_labels(n=200_000, seed=0):
    prior = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    return np.random.default_rng(seed).choice(len(prior), size=n, p=prior), prior


# ----------------------------------------------------------------------------- symmetric

@pytest.mark.parametrize("eta", [0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2])
def test_symmetric_rate_is_exact_and_never_keeps_the_true_label(eta):
    labels = np.random.default_rng(1).integers(0, 10, size=1797)
    new = corrupt.corrupt_labels(labels, eta, seed=3, num_classes=10)
    assert new.dtype == np.int64 and new.shape == labels.shape
    changed = new != labels
    assert changed.sum() == int(np.floor(eta * len(labels) + 0.5))
    assert ((new >= 0) & (new < 10)).all()


def test_symmetric_new_labels_follow_the_prior_without_the_true_class():
    labels, _ = imbalanced_labels()
    prior = corrupt.class_prior(labels, 6)
    new = corrupt.corrupt_labels(labels, 0.2, seed=0, num_classes=6)
    moved = new != labels
    assert moved.sum() == 40_000
    for y in range(6):
        rows = moved & (labels == y)
        counts = np.bincount(new[rows], minlength=6)
        assert counts[y] == 0
        expected = np.delete(prior, y) / np.delete(prior, y).sum() * rows.sum()
        assert chisquare(np.delete(counts, y), expected).pvalue > 1e-3
    # which samples move does not depend on the class: each class loses ~eta of its samples
    rates = np.array([moved[labels == y].mean() for y in range(6)])
    assert np.abs(rates - 0.2).max() < 0.02


def test_zero_prior_classes_are_never_drawn():
    labels = np.array([0, 2] * 500)  # class 1 and 3 absent from the data
    new = corrupt.corrupt_labels(labels, 0.5, seed=0, num_classes=4)
    assert set(np.unique(new[new != labels])) <= {0, 2}
    assert (new != labels).sum() == 500


def test_corruption_is_fixed_by_the_seed_and_independent_of_world_size():
    labels = np.random.default_rng(2).integers(0, 10, size=5000)
    a = corrupt.corrupt_labels(labels, 0.05, seed=7, num_classes=10)
    assert np.array_equal(a, corrupt.corrupt_labels(labels, 0.05, seed=7, num_classes=10))
    assert not np.array_equal(a, corrupt.corrupt_labels(labels, 0.05, seed=8, num_classes=10))
    # The function has no rank input: every rank computes the whole corruption and takes its
    # shard, so the union of the shards is the same for any world size.
    for world in (1, 2, 3, 8):
        shards = [corrupt.corrupt_labels(labels, 0.05, 7, 10)[r::world] for r in range(world)]
        merged = np.empty_like(a)
        for r, shard in enumerate(shards):
            merged[r::world] = shard
        assert np.array_equal(merged, a)
    # Per index: a sample's random numbers are the i-th draws of seeded streams, so a prefix of
    # the data sees the same numbers, and the samples moved at a small eta move identically at
    # a larger eta (nested corruption levels).
    assert np.array_equal(corrupt.index_uniforms(7, 0, 5000)[:100],
                          corrupt.index_uniforms(7, 0, 100))
    b = corrupt.corrupt_labels(labels, 0.10, seed=7, num_classes=10)
    moved = a != labels
    assert np.array_equal(b[moved], a[moved])


def test_manifest_is_identical_across_reruns(tmp_path):
    labels = np.random.default_rng(2).integers(0, 10, size=3000)
    paths = [tmp_path / f"run{k}" / "corruption.tsv" for k in range(2)]
    for path in paths:
        new = corrupt.corrupt_labels(labels, 0.075, seed=1, num_classes=10)
        corrupt.write_manifest(str(path), labels, new, eta=0.075, seed=1, mode="symmetric")
    assert paths[0].read_bytes() == paths[1].read_bytes()
    m = corrupt.read_manifest(str(paths[0]))
    assert m["meta"]["changed"] == "225" and m["meta"]["mode"] == "symmetric"
    assert np.array_equal(m["index"], np.flatnonzero(new != labels))
    assert np.array_equal(m["original"], labels[m["index"]])
    assert np.array_equal(m["new"], new[m["index"]])
    assert not [p for p in os.listdir(paths[0].parent) if "tmp" in p]


# ----------------------------------------------------------------------------- asymmetric

def test_asymmetric_stays_within_the_subset():
    labels, _ = imbalanced_labels(n=50_000)
    subset = [1, 3, 4]
    new = corrupt.corrupt_labels(labels, 0.1, seed=0, num_classes=6, mode="asymmetric",
                                 subset=subset)
    in_subset = np.isin(labels, subset)
    assert np.array_equal(new[~in_subset], labels[~in_subset])
    moved = new != labels
    assert moved.sum() == int(np.floor(0.1 * in_subset.sum() + 0.5))
    assert np.isin(new[moved], subset).all()
    # destinations follow the prior restricted to the subset minus the true class
    prior = corrupt.class_prior(labels, 6)
    rows = moved & (labels == 1)
    counts = np.bincount(new[rows], minlength=6)[[3, 4]]
    expected = prior[[3, 4]] / prior[[3, 4]].sum() * rows.sum()
    assert chisquare(counts, expected).pvalue > 1e-3


def test_bad_arguments_give_clear_errors():
    labels = np.array([0, 1, 2, 3])
    with pytest.raises(ValueError, match="at least 2 classes"):
        corrupt.corrupt_labels(labels, 0.5, 0, 4, mode="asymmetric", subset=[1])
    with pytest.raises(ValueError, match="mode"):
        corrupt.corrupt_labels(labels, 0.5, 0, 4, mode="pairflip")
    with pytest.raises(ValueError, match="eta"):
        corrupt.corrupt_labels(labels, 1.5, 0, 4)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        corrupt.corrupt_labels(labels, 0.5, 0, 3)


# ----------------------------------------------------------------------------- captions

@pytest.mark.parametrize("n,eta", [(1000, 0.05), (1000, 0.075), (999, 0.025), (7, 0.0)])
def test_swapped_captions_are_a_permutation_with_the_requested_count(n, eta):
    captions = [f"caption {i}" for i in range(n)]
    new = corrupt.swap_captions(captions, eta, seed=0)
    assert sorted(new) == sorted(captions)
    moved = sum(a != b for a, b in zip(captions, new))
    assert moved % 2 == 0 and abs(moved - eta * n) <= 1
    assert new == corrupt.swap_captions(captions, eta, seed=0)
    index = {c: i for i, c in enumerate(captions)}
    for i, c in enumerate(new):  # swaps: the partner of a moved sample holds its caption
        assert captions[index[c]] == new[i] and new[index[c]] == captions[i]


def test_rewritten_captions_and_caption_manifest(tmp_path):
    captions = ["a cat", "a dog\twith a tab", "a bird", "x\\y"]
    path = tmp_path / "rewritten.tsv"
    path.write_text("# GPT-4 level 3\n1\ta wolf\n3\tnew\\nline?\n", encoding="utf-8")
    rewritten = corrupt.load_rewritten_captions(str(path), len(captions))
    new = corrupt.apply_rewritten_captions(captions, rewritten)
    assert new == ["a cat", "a wolf", "a bird", "new\\nline?"]
    manifest = tmp_path / "corruption.tsv"
    corrupt.write_manifest(str(manifest), captions, new, mode="rewrite")
    m = corrupt.read_manifest(str(manifest))
    assert m["index"].tolist() == [1, 3]
    assert m["original"] == ["a dog\twith a tab", "x\\y"] and m["new"] == ["a wolf", "new\\nline?"]
    path.write_text("9\tout of range\n", encoding="utf-8")
    with pytest.raises(ValueError, match="out of range"):
        corrupt.load_rewritten_captions(str(path), len(captions))


# ----------------------------------------------------------------------------- per-step corruption

def test_resample_corruption_rate_and_destinations():
    labels, prior = imbalanced_labels(n=100_000)
    labels = torch.from_numpy(labels)
    g = torch.Generator().manual_seed(0)
    new = corrupt.resample_corruption(labels, 0.1, torch.tensor(prior), g)
    flipped = new != labels
    assert abs(flipped.float().mean().item() - 0.1) < 4 * (0.1 * 0.9 / len(labels)) ** 0.5
    rows = flipped & (labels == 0)
    counts = torch.bincount(new[rows], minlength=6).numpy()
    assert counts[0] == 0
    expected = prior[1:] / prior[1:].sum() * rows.sum().item()
    assert chisquare(counts[1:], expected).pvalue > 1e-3
    # same generator state -> same draw; a new step (new state) -> a new draw
    again = corrupt.resample_corruption(labels, 0.1, prior, torch.Generator().manual_seed(0))
    assert torch.equal(new, again)
    assert not torch.equal(new, corrupt.resample_corruption(labels, 0.1, prior, g))


def test_cli_writes_the_manifest(tmp_path, capsys):
    corrupt_dataset.main(["--dataset", "digits", "--eta", "0.05", "--seed", "0", "--out",
                          str(tmp_path)])
    out = capsys.readouterr().out
    assert "realised rate 5.0093%" in out  # round(0.05 * 1617) = 81 of the 90 % train split
    m = corrupt.read_manifest(str(tmp_path / "corruption.tsv"))
    assert len(m["index"]) == 81 and m["meta"]["seed"] == "0"
    assert (m["original"] != m["new"]).all()
