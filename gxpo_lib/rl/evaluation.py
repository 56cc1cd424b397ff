"""Evaluation metrics: unbiased pass@k, sampled pass@1, bootstrap intervals, speed-up to GRPO's peak.

pass@k is the unbiased estimator of Chen et al. 2021 (``openai/human-eval``'s ``estimate_pass_at_k``):
with n samples of which c are correct, pass@k = 1 - C(n - c, k) / C(n, k). Sampled pass@1 (the mean of
c / n, "mean@n") is the paper's headline metric. Intervals are percentile bootstraps over *problems*.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

X_KEYS = ("step", "seconds", "cumulative_backward_passes")   # budgets spent up to an evaluation
CORRECT_THRESHOLD = 0.95  # a reward at or above this counts as solved (the authors' threshold)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: the chance that k of the n samples, drawn without replacement,
    include at least one of the c correct ones.

    Computed as 1 - prod_{i = n-c+1}^{n} (1 - k / i), which equals 1 - C(n-c, k) / C(n, k) without huge
    binomials; 1.0 when n - c < k.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name}={value!r} is invalid: allowed an integer")
    if n < 1:
        raise ValueError(f"n={n} is invalid: allowed an integer >= 1 (samples per problem)")
    if not 0 <= c <= n:
        raise ValueError(f"c={c} is invalid: allowed 0 <= c <= n={n} (correct samples)")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} is invalid: allowed 1 <= k <= n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def sampled_pass_at_1(correct) -> float:
    """Mean fraction of correct samples.

    Args:
        correct: ``[n]`` booleans for one problem, or ``[P, n]`` for P problems (mean over problems of
            each problem's c / n).
    """
    arr = _as_correct(correct, ndim=(1, 2))
    return float(arr.mean())


def bootstrap_ci(
    values: Sequence[float], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of ``values`` (one value per problem).

    Args:
        values: per-problem scores (e.g. each problem's pass@k).
        n_boot: resamples (with replacement, each of len(values)).
        alpha: 1 - coverage; 0.05 gives a 95% interval.
        seed: for the resampling.

    Returns:
        ``(low, high)``.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"values with shape {arr.shape} is invalid: allowed a non-empty 1-D sequence")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha!r} is invalid: allowed 0 < alpha < 1")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot={n_boot!r} is invalid: allowed an integer >= 1")
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, arr.size, size=(n_boot, arr.size))].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


@dataclass(frozen=True)
class PassAtK:
    """pass@k over a problem set: the mean over problems and its bootstrap interval."""

    k: int
    mean: float
    ci_low: float
    ci_high: float
    n_problems: int
    n_samples: int


def pass_at_k_table(
    correct_matrix, ks: Sequence[int] | None = None, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> dict[int, PassAtK]:
    """pass@k for several k from one ``[P, n]`` matrix of per-sample correctness.

    Args:
        correct_matrix: ``[P, n]`` booleans (or 0/1): problem p's sample j was correct.
        ks: the k values (each in [1, n]); default 1, 2, 4, ... up to n.
        n_boot, alpha, seed: for ``bootstrap_ci`` over problems.

    Returns:
        ``{k: PassAtK}``.
    """
    arr = _as_correct(correct_matrix, ndim=(2,))
    n_problems, n = arr.shape
    ks = [2**i for i in range(int(math.log2(n)) + 1)] if ks is None else list(ks)
    counts = arr.sum(axis=1)
    table = {}
    for k in ks:
        if not 1 <= k <= n:
            raise ValueError(f"k={k} is invalid: allowed 1 <= k <= n={n} (samples per problem)")
        per_problem = [pass_at_k(n, int(c), int(k)) for c in counts]
        low, high = bootstrap_ci(per_problem, n_boot=n_boot, alpha=alpha, seed=seed)
        table[int(k)] = PassAtK(int(k), float(np.mean(per_problem)), low, high, n_problems, n)
    return table


def speedup_to_peak(
    reference_curve: Sequence[Mapping[str, float]],
    method_curve: Sequence[Mapping[str, float]],
    metric: str = "value",
    x_keys: Sequence[str] = X_KEYS,
) -> dict[str, float | None]:
    """The paper's speed-up table entry: how much sooner a method reaches GRPO's best validation value.

    Take the reference's (GRPO's) best ``metric``; for each curve, the first evaluation (in x order)
    at or above it; report reference x / method x for every x key.

    Args:
        reference_curve, method_curve: evaluation records, e.g. ``{"step": 50, "seconds": 812.0,
            "cumulative_backward_passes": 150, "value": 0.41}``; each needs ``metric`` and every key of
            ``x_keys``.
        metric: the validation metric's key.
        x_keys: the budgets to compare (steps, wall-clock seconds, backward passes so far: the running
            total, as eval rows carry it).

    Returns:
        ``{"target": best reference value, "<x>_reference": ..., "<x>_method": ..., "<x>_speedup": ...}``
        for each x; the method's entries and speed-ups are None when it never reaches the target, and a
        speed-up is None when the method's x is 0.
    """
    ref = _curve(reference_curve, metric, x_keys, "reference_curve")
    meth = _curve(method_curve, metric, x_keys, "method_curve")
    target = max(row[metric] for row in ref)
    ref_hit, meth_hit = _first_at_or_above(ref, metric, target), _first_at_or_above(meth, metric, target)
    out: dict[str, float | None] = {"target": float(target)}
    for x in x_keys:
        ref_x = float(ref_hit[x])
        meth_x = None if meth_hit is None else float(meth_hit[x])
        out[f"{x}_reference"] = ref_x
        out[f"{x}_method"] = meth_x
        out[f"{x}_speedup"] = None if not meth_x else ref_x / meth_x
    return out


def _first_at_or_above(curve: list[Mapping[str, float]], metric: str, target: float):
    """First record (curves are sorted by their first x key) whose metric reaches the target."""
    return next((row for row in curve if row[metric] >= target), None)


def _curve(curve, metric: str, x_keys: Sequence[str], name: str) -> list[Mapping[str, float]]:
    """Validate the records and sort them by the first x key."""
    rows = list(curve)
    if not rows:
        raise ValueError(f"{name} is empty")
    if not x_keys:
        raise ValueError("x_keys must name at least one budget key")
    for i, row in enumerate(rows):
        missing = [key for key in (metric, *x_keys) if key not in row or row[key] is None]
        if missing:
            raise ValueError(f"{name}[{i}] lacks {missing}; every record needs {metric!r} and {list(x_keys)}")
    return sorted(rows, key=lambda row: row[x_keys[0]])


def _as_correct(values, ndim: tuple[int, ...]) -> np.ndarray:
    """Correctness as a bool array; values must be booleans or exactly 0/1."""
    arr = np.asarray(values)
    if arr.ndim not in ndim or arr.size == 0:
        raise ValueError(f"correctness with shape {arr.shape} is invalid: allowed a non-empty "
                         f"{' or '.join(f'{d}-D' for d in ndim)} array")
    if arr.dtype != bool and not np.isin(arr, (0, 1)).all():
        raise ValueError("correctness is invalid: allowed booleans or 0/1; threshold rewards first "
                         "(e.g. reward >= 0.95)")
    return arr.astype(bool)


def correct_counts(sampler, scorer, problems: Sequence[dict], samples: int, seed: int) -> tuple[list[int], list[float]]:
    """Sample `samples` completions per problem and grade them: (correct count per problem, lengths per sample)."""
    rollouts = sampler.sample([p["prompt"] for p in problems], samples, seed=seed, score_policy=False)
    picked = [problems[i] for i in rollouts.prompt_index]
    scored = scorer.score(rollouts.completions, [p["answer"] for p in picked], [p["prompt"] for p in picked])
    correct = np.asarray(scored.rewards).reshape(len(problems), samples) >= CORRECT_THRESHOLD
    return [int(c) for c in correct.sum(axis=1)], rollouts.completion_mask.sum(1).float().tolist()


def summarize_counts(counts: Sequence[int], samples: int, lengths: Sequence[float], seed: int) -> dict:
    """pass@k for k = 1, 2, 4, ... <= samples with bootstrap intervals over problems, and the mean length.

    Returns {"pass@k": float, "pass@k_ci": [low, high], ..., "response_length": float, "correct_counts":
    [int per problem, in the problems' order]} (the counts let two runs be paired problem by problem).
    """
    result: dict = {}
    k = 1
    while k <= samples:
        per_problem = [pass_at_k(samples, int(c), k) for c in counts]
        low, high = bootstrap_ci(per_problem, seed=seed)
        result[f"pass@{k}"] = float(np.mean(per_problem))
        result[f"pass@{k}_ci"] = [float(low), float(high)]
        k *= 2
    result["response_length"] = float(np.mean(lengths))
    result["correct_counts"] = [int(c) for c in counts]
    return result


def evaluate(sampler, scorer, problems: Sequence[dict], samples: int, seed: int, *, shares: int = 1,
             world=None) -> dict:
    """Sampled pass@1 (mean over `samples` per problem) and unbiased pass@k with bootstrap intervals.

    `sampler` follows the `Sampler` protocol, `scorer` is a `RewardScorer`; see `summarize_counts`.
    `shares` > 1 or a torchrun `world` (`gxpo_lib.core.distributed.World`): `sharded_counts`; every rank
    returns the same result.
    """
    if shares == 1 and world is None:
        counts, lengths = correct_counts(sampler, scorer, problems, samples, seed)
    else:
        shares = max(shares, world.size if world is not None else 1)
        counts, lengths = sharded_counts(sampler, scorer, problems, samples, seed, shares, world)
    return summarize_counts(counts, samples, lengths, seed)


def sharded_counts(sampler, scorer, problems: Sequence[dict], samples: int, seed: int, shares: int,
                   world=None) -> tuple[list[int], list[float]]:
    """`correct_counts` of `problems` cut into `shares` consecutive shares of ceil(P / shares) problems, each
    sampled with its own seed (`distributed.share_seed`) by the rank it falls to (shares / world size each;
    all of them in one process), then gathered in problem order on every rank. A short last share is padded
    with problem 0, whose results are dropped: every rank then runs as many forwards as the others, which
    FSDP2's all-gathers need."""
    from gxpo_lib.core.distributed import gather, share_seed

    rank, size = (0, 1) if world is None else (world.rank, world.size)
    per = -(-len(problems) // shares)
    counts: list[int] = []
    lengths: list[float] = []
    for share in range(rank * shares // size, (rank + 1) * shares // size):
        part = list(problems[share * per:(share + 1) * per])
        real = len(part)
        got, got_lengths = correct_counts(sampler, scorer, part + [problems[0]] * (per - real), samples,
                                          share_seed(seed, share, shares))
        counts += got[:real]
        lengths += got_lengths[:real * samples]
    gathered = gather((counts, lengths), world)
    return [c for part, _ in gathered for c in part], [x for _, part in gathered for x in part]
