"""gmm.py: closed forms against Monte-Carlo, Theorems 1-2 numerically, and a quick run."""
import math

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from corrupt import corrupt_labels

from experiments import gmm


def random_spd(d, rng):
    A = rng.standard_normal((d, d))
    return A @ A.T / d + 0.3 * np.eye(d)


def test_gaussian_entropy_matches_monte_carlo():
    rng = np.random.default_rng(0)
    m, S = rng.standard_normal(4), random_spd(4, rng)
    x = rng.multivariate_normal(m, S, size=200_000)
    mc = -multivariate_normal(m, S).logpdf(x).mean()
    assert gmm.gaussian_entropy(S) == pytest.approx(mc, abs=0.01)


def test_gaussian_w2_matches_optimal_map_and_ot():
    rng = np.random.default_rng(1)
    d = 3
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    S1, S2 = random_spd(d, rng), random_spd(d, rng)
    # Optimal (Monge) map between Gaussians: T(x) = m2 + A (x - m1), A symmetric positive definite.
    r1 = gmm.psd_sqrt(S1)
    r1_inv = np.linalg.inv(r1)
    A = r1_inv @ gmm.psd_sqrt(r1 @ S2 @ r1) @ r1_inv
    x = rng.multivariate_normal(m1, S1, size=200_000)
    y = m2 + (x - m1) @ A
    assert np.cov(y.T) == pytest.approx(S2, abs=0.03)
    w2 = gmm.gaussian_w2sq(m1, S1, m2, S2)
    assert w2 == pytest.approx(((x - y) ** 2).sum(1).mean(), rel=0.01)
    # T is the gradient of a convex function, so pairing x_i with T(x_i) is the optimal transport
    # plan.
    xs, ys = x[:400], y[:400]
    assert gmm.ot_w2sq(xs, ys[::-1]) == pytest.approx(((xs - ys) ** 2).sum(1).mean(), rel=1e-9)
    # 1-D: the quantile coupling of large samples.
    a, b = np.sort(rng.normal(1.0, 2.0, 200_000)), np.sort(rng.normal(-0.5, 0.5, 200_000))
    w2 = gmm.gaussian_w2sq(np.array([1.0]), np.array([[4.0]]), np.array([-0.5]), np.array([[0.25]]))
    assert w2 == pytest.approx(((a - b) ** 2).mean(), rel=0.01)


def test_lemma4_moments_match_samples():
    rng = np.random.default_rng(2)
    means = gmm.make_means(5, 6, 2.0, seed=0)
    x, labels = gmm.draw_training_set(means, 40, rng)
    m, S = gmm.empirical_gaussian(x[labels == 0])
    assert gmm.lemma4(m, S, 0.0)[0] == pytest.approx(m)
    assert gmm.lemma4(m, S, 0.0)[1] == pytest.approx(S)
    g = 0.3
    mg, Sg = gmm.lemma4(m, S, g)
    assert mg == pytest.approx(m / (1 + g * g))
    assert Sg - S == pytest.approx(g * g / (1 + g * g) * (m @ m) * np.eye(6))
    z = rng.standard_normal((1, 200_000, 6))
    samples = gmm.sample_gaussians([(mg, Sg)], z)
    assert samples.mean(0) == pytest.approx(mg, abs=0.02)
    assert np.cov(samples.T) == pytest.approx(Sg, abs=0.03)
    mc = -multivariate_normal(mg, Sg).logpdf(samples).mean()
    assert gmm.gaussian_entropy(Sg) == pytest.approx(mc, abs=0.02)


def test_gamma_for_eta_matches_label_flip_shrinkage():
    """Population check of our eta -> gamma reading: class means of the corrupted sets shrink by
    1/(1+g^2)."""
    K, eta = 5, 0.1
    means = gmm.make_means(K, 3, 3.0, seed=1)
    x, labels = gmm.draw_training_set(means, 20_000, np.random.default_rng(3))
    noisy = corrupt_labels(labels, eta, 0, K)
    g = gmm.gamma_for_eta(eta, K)
    for k in range(K):
        assert x[noisy == k].mean(0) == pytest.approx(means[k] / (1 + g * g), abs=0.04)
    with pytest.raises(ValueError):
        gmm.gamma_for_eta(0.95, K)


def test_theorem1_entropy_gain():
    rng = np.random.default_rng(4)
    for d in (4, 8, 16):
        means = gmm.make_means(3, d, 2.0, seed=d)
        x, labels = gmm.draw_training_set(means, 400, rng)
        m, S = gmm.empirical_gaussian(x[labels == 0])
        lam = np.linalg.eigvalsh(S)
        for g in (0.01, 0.05, 0.2):
            a = g * g / (1 + g * g)
            exact = gmm.gaussian_entropy(gmm.lemma4(m, S, g)[1]) - gmm.gaussian_entropy(S)
            assert exact == pytest.approx(0.5 * np.log1p(a * (m @ m) / lam).sum(), rel=1e-9)
            assert exact > 0
            first = gmm.entropy_gain_first_order(m, S, g)
            assert first >= exact and first == pytest.approx(exact, rel=2 * a * (m @ m) / lam.min())
        # Theta(g^2 d): for small g, gain / (g^2 d) ~ 0.5 ||mu_hat||^2 mean(1/lambda),
        # mean(1/lambda) ~ 1 (n >> d).
        gain = gmm.gaussian_entropy(gmm.lemma4(m, S, 0.05)[1]) - gmm.gaussian_entropy(S)
        assert 0.9 < gain / (0.05 ** 2 * d) / (0.5 * (m @ m)) < 1.2


def test_direction_of_the_effect_at_fixed_seed():
    args = gmm.parse_args(["--classes", "10", "--dim", "16", "--n", "50", "--seed", "0",
                           "--trials", "10"])
    thm = {t["gamma"]: t for t in gmm.theorem_checks(args)}
    assert all(t["gain"] > 0 for t in thm.values())  # Theorem 1: entropy up
    for g in (0.02, 0.05, 0.1):  # Theorem 2: W2 down for gamma = O(1/sqrt(n)), n = 50
        assert thm[g]["dW2"] > 3 * thm[g]["dW2_se"]
        assert thm[g]["dW2_over_g2d_n"] > 1
    # far outside the theorem's regime the shrinkage costs more than it gains
    assert thm[1.0]["dW2"] < 0

    args = gmm.parse_args(["--steps", "0", "--etas", "0,0.025,0.05", "--ot-samples", "200"])
    rows = gmm.eta_sweep(args, log=lambda s: None)
    for key in ("label_H", "embed_H"):
        assert rows[0][key] < rows[1][key] < rows[2][key]
    assert rows[1]["embed_W2c"] < rows[0]["embed_W2c"]
    assert rows[2]["embed_W2c"] < rows[0]["embed_W2c"]


def test_quick_run(tmp_path):
    rows, thm = gmm.main(["--quick", "--etas", "0,0.05", "--out", str(tmp_path)])
    assert [r["eta"] for r in rows] == [0.0, 0.05]
    assert rows[1]["realised"] == pytest.approx(0.05)
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("label_H", "embed_W2c", "dm_H", "dm_W2c",
                                                 "dm_W2ot"))
    assert len(thm) == len(gmm.GAMMAS)
    assert (tmp_path / "gmm.png").stat().st_size > 0
    assert "| eta |" in (tmp_path / "results.md").read_text()
