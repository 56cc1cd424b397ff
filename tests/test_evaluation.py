"""Tests for gxpo_lib.rl.evaluation: pass@k against brute force, bootstrap intervals, the speed-up table."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest

from gxpo_lib.rl.evaluation import (
    PassAtK,
    bootstrap_ci,
    pass_at_k,
    pass_at_k_table,
    sampled_pass_at_1,
    speedup_to_peak,
)


def _brute_force(n: int, c: int, k: int) -> Fraction:
    """Fraction of all k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_equals_enumeration_over_all_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(_brute_force(n, c, k)), abs=1e-12)


def test_pass_at_k_edges_and_large_n():
    assert pass_at_k(16, 0, 4) == 0.0
    assert pass_at_k(16, 16, 1) == 1.0
    assert pass_at_k(16, 13, 4) == 1.0  # n - c < k
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(np.int64(10), np.int64(3), 1) == pytest.approx(0.3)
    # no overflow where C(n, k) is astronomically large
    assert 0 < pass_at_k(2000, 1, 1000) == pytest.approx(0.5)


@pytest.mark.parametrize("args, needle", [((4, 1, 5), "k=5 is invalid"), ((4, 5, 1), "c=5 is invalid"),
                                          ((4, -1, 1), "c=-1 is invalid"), ((0, 0, 1), "n=0 is invalid"),
                                          ((4, 1, 0), "k=0 is invalid"), ((4.0, 1, 1), "n=4.0 is invalid"),
                                          ((4, True, 1), "c=True is invalid")])
def test_pass_at_k_errors(args, needle):
    with pytest.raises(ValueError, match=needle):
        pass_at_k(*args)


def test_sampled_pass_at_1():
    assert sampled_pass_at_1([True, False, True, True]) == 0.75
    assert sampled_pass_at_1([[1, 0], [1, 1], [0, 0]]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="0/1"):
        sampled_pass_at_1([0.3, 1.0])


def test_bootstrap_contains_the_mean_and_shrinks_with_more_problems():
    rng = np.random.default_rng(0)
    small, large = rng.random(40), rng.random(4000)
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 5  # width ~ 1/sqrt(P): 10x fewer problems, ~10x wider
    assert bootstrap_ci(small, seed=3) == bootstrap_ci(small, seed=3)
    assert bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)
    assert bootstrap_ci(small, alpha=0.5)[1] - bootstrap_ci(small, alpha=0.5)[0] < hi_s - lo_s
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci(small, alpha=1.5)
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])


def test_pass_at_k_table():
    rng = np.random.default_rng(1)
    correct = rng.random((50, 8)) < rng.random((50, 1))
    table = pass_at_k_table(correct)
    assert list(table) == [1, 2, 4, 8]
    assert table[1].mean == pytest.approx(sampled_pass_at_1(correct))
    assert table[8].mean == pytest.approx(correct.any(axis=1).mean())
    means = [table[k].mean for k in table]
    assert means == sorted(means)
    for row in table.values():
        assert isinstance(row, PassAtK) and row.ci_low <= row.mean <= row.ci_high
        assert (row.n_problems, row.n_samples) == (50, 8)
    assert list(pass_at_k_table(correct, ks=[3])) == [3]
    with pytest.raises(ValueError, match="k=9"):
        pass_at_k_table(correct, ks=[1, 9])
    with pytest.raises(ValueError, match="2-D"):
        pass_at_k_table(correct[0])


def _curve(values, steps_per_eval=10, seconds_per_step=2.0, passes_per_step=1):
    return [{"step": (i + 1) * steps_per_eval, "seconds": (i + 1) * steps_per_eval * seconds_per_step,
             "cumulative_backward_passes": (i + 1) * steps_per_eval * passes_per_step, "value": v}
            for i, v in enumerate(values)]


def test_speedup_to_peak_on_hand_made_curves():
    grpo = _curve([0.20, 0.30, 0.35, 0.40, 0.38, 0.40])  # peak 0.40 first reached at step 40
    gxpo = _curve([0.25, 0.41, 0.45], seconds_per_step=3.0, passes_per_step=3)  # 0.41 at step 20
    out = speedup_to_peak(grpo, gxpo)
    assert out["target"] == 0.40
    assert out["step_reference"] == 40 and out["step_method"] == 20 and out["step_speedup"] == 2.0
    assert out["seconds_speedup"] == pytest.approx(80 / 60)
    assert out["cumulative_backward_passes_speedup"] == pytest.approx(40 / 60)


def test_speedup_not_reached_unsorted_and_errors():
    grpo = _curve([0.2, 0.5])
    slow = _curve([0.1, 0.3, 0.49])
    out = speedup_to_peak(grpo, slow, x_keys=("step",))
    assert out == {"target": 0.5, "step_reference": 20.0, "step_method": None, "step_speedup": None}
    # records may come in any order; exactly equal to the target counts as reached
    out = speedup_to_peak(list(reversed(grpo)), _curve([0.5]), x_keys=("step",))
    assert out["step_speedup"] == 2.0
    assert speedup_to_peak(grpo, grpo)["step_speedup"] == 1.0
    with pytest.raises(ValueError, match="seconds"):
        speedup_to_peak([{"step": 1, "value": 0.1}], grpo)
    with pytest.raises(ValueError, match="empty"):
        speedup_to_peak([], grpo)
