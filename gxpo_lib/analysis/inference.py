"""Paired comparisons for seeded studies: paired t, equivalence (TOST), Holm, a two-level bootstrap.

A seeded study pairs what it runs: seed s fixes the prompts, the sampling and the evaluation draws for every
method, so method A's seed-s result is compared with method B's seed-s result. Every function here takes
the two sides already paired (same order of seeds; for the bootstrap also the same problems).

    d = paired_difference([0.50, 0.52, 0.49], [0.47, 0.50, 0.49])    # A - B, paired by seed
    d["mean"], d["ci"], d["p"], equivalence(d, margin=0.02)["p"]
    holm([0.01, 0.04, 0.03])                                           # adjusted p-values, same order
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from gxpo_lib.analysis.stats import _t_central_mass, t_critical


def _t_upper_tail(t: float, df: int) -> float:
    """P(T > t) for Student's t with integer df."""
    tail = (1.0 - _t_central_mass(abs(t), df)) / 2.0
    return tail if t >= 0 else 1.0 - tail


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """The mean of the per-pair differences a_i - b_i, its Student-t interval and the two-sided p-value.

    Returns {"n", "differences", "mean", "sd", "ci": (low, high), "t", "df", "p"}; with identical pairs
    (sd = 0) the interval is the point and p is 1 for a zero mean, 0 otherwise. Raises ValueError for
    unequal lengths or fewer than two pairs.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError(f"a, b: expected two equal-length lists of at least 2 paired values, got {a.shape}, {b.shape}")
    d = a - b
    n, mean, sd = d.size, float(d.mean()), float(d.std(ddof=1))
    df = n - 1
    if sd == 0.0:
        return {"n": n, "differences": d.tolist(), "mean": mean, "sd": 0.0, "ci": (mean, mean),
                "t": math.inf if mean else 0.0, "df": df, "p": 0.0 if mean else 1.0, "level": level}
    se = sd / math.sqrt(n)
    half = t_critical(df, level) * se
    t = mean / se
    return {"n": n, "differences": d.tolist(), "mean": mean, "sd": sd, "ci": (mean - half, mean + half),
            "t": t, "df": df, "p": 1.0 - _t_central_mass(abs(t), df), "level": level}


def equivalence(difference: dict[str, Any], margin: float) -> dict[str, Any]:
    """Two one-sided tests (TOST) that the paired mean difference lies within (-margin, +margin).

    p = the larger of the two one-sided p-values; equivalence at level alpha when p < alpha, i.e. when the
    (1 - 2 alpha) paired interval lies inside the margins. Returns {"p", "ci90", "margin"}.
    """
    if not margin > 0:
        raise ValueError(f"margin={margin!r} is invalid: allowed a number > 0")
    mean, sd, n, df = difference["mean"], difference["sd"], difference["n"], difference["df"]
    if sd == 0.0:
        p = 0.0 if abs(mean) < margin else 1.0
        return {"p": p, "ci90": (mean, mean), "margin": margin}
    se = sd / math.sqrt(n)
    p_lower = _t_upper_tail((mean + margin) / se, df)       # H0: mean <= -margin
    p_upper = 1.0 - _t_upper_tail((mean - margin) / se, df)  # H0: mean >= +margin
    half = t_critical(df, 0.90) * se
    return {"p": max(p_lower, p_upper), "ci90": (mean - half, mean + half), "margin": margin}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order (reject where adjusted p < alpha).

    The family-wise error rate is controlled at alpha over the whole list; None entries stay None.
    """
    indexed = [(p, i) for i, p in enumerate(p_values) if p is not None]
    m = len(indexed)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(indexed)):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def two_level_bootstrap(a: np.ndarray, b: np.ndarray, draws: int = 2000, level: float = 0.95,
                        seed: int = 0) -> tuple[float, float]:
    """Interval for mean(a - b) resampling seeds, then problems within them, keeping every pair.

    a, b: [seeds, problems] per-problem scores (e.g. correct samples / samples), row s of both from seed s,
    column j of both from problem j. Returns the percentile interval at `level`.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 2 or min(a.shape) < 1:
        raise ValueError(f"a, b: expected two equal [seeds, problems] arrays, got {a.shape}, {b.shape}")
    d = a - b
    rng = np.random.default_rng(seed)
    seeds, problems = d.shape
    rows = rng.integers(0, seeds, size=(draws, seeds))
    cols = rng.integers(0, problems, size=(draws, seeds, problems))
    means = d[rows[:, :, None], cols].mean(axis=(1, 2))
    tail = (1.0 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))
