"""Paired statistics of the sweep (experiments/sweep.py): seeds pair the arms, so each arm is
compared with its baseline through the per-seed differences d.

- the mean difference with its 95 % t-interval;
- the exact two-sided sign-flip p-value (all 2^n sign patterns of d: no distribution assumed;
  with n seeds the smallest possible p is 2 / 2^n);
- the smallest true difference the design detects with power 0.8 (paired t, two-sided 5 %);
- Holm's step-down adjustment over the pre-stated primary contrasts.
"""
import itertools
import math

import numpy as np


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


def holm(p_values):
    """Holm's step-down adjusted p-values (family-wise error), in the order given."""
    order = np.argsort(p_values)
    adjusted, running = np.empty(len(p_values)), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted.tolist()
