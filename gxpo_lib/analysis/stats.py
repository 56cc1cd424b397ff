"""Numbers from runs: curves, seed bands with Student-t or bootstrap intervals, the paper's speed-up table
(with seed-bootstrap intervals), the activity table (how long GXPO extrapolated), the final pass@k table,
and the mechanism summary (what GXPO's jump did on average).

Every interval here is over seeds (a group's runs), except a single run's final evaluation, whose interval
is the trainer's bootstrap over problems.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from gxpo_lib.analysis.records import Run, is_number, mean_or_none, nan_if_none
from gxpo_lib.analysis.runs import DEFAULT_BY, Group, group_runs
from gxpo_lib.rl.evaluation import bootstrap_ci, speedup_to_peak
from gxpo_lib.validation import check_choice

# x axes: ``backward_passes`` is each step's own count (1 GRPO, 3 active GXPO, K+1 SFPO), never an axis;
# ``cumulative_backward_passes`` is the running total, the axis "against backward passes".
X_CHOICES = ("step", "seconds", "cpu_seconds", "hours", "cpu_hours", "cumulative_backward_passes")
SPEEDUP_X = ("step", "cpu_seconds", "cumulative_backward_passes")   # time: the runs' own CPU seconds (load-robust)
_PASS_KEY = re.compile(r"^pass@(\d+)$")


# ---------------------------------------------------------------------------------------------------
# Curves and seed bands
# ---------------------------------------------------------------------------------------------------
def check_x(x: str, choices: Sequence[str] = X_CHOICES, name: str = "x") -> str:
    """`x` if it is one of `choices`, else ValueError naming the setting; the per-step ``backward_passes``
    gets a pointer to ``cumulative_backward_passes`` (the running total, the only passes axis)."""
    try:
        return check_choice(name, x, choices)
    except ValueError as error:
        if x == "backward_passes" and "cumulative_backward_passes" in choices:
            raise ValueError(f"{error} (backward_passes is each step's own count; use "
                             "'cumulative_backward_passes' for the running total)") from None
        raise


def curve(run: Run, metric: str, x: str = "step", rows: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of one run, sorted by x, rows without a finite value dropped.

    Args:
        metric: a row key, e.g. ``"pass@1"`` (eval rows) or ``"reward_mean"`` (train rows).
        x: ``"step"``, ``"seconds"`` (training wall-clock), ``"cpu_seconds"`` (the training process's CPU
            time, where the trainer logs it: what the method cost whatever else loaded the machine),
            ``"hours"``, ``"cpu_hours"`` or ``"cumulative_backward_passes"`` (the running total; train and
            eval rows both carry it).
        rows: ``"eval"``, ``"train"`` or ``"auto"`` (eval rows if any holds `metric`, else train rows).
    """
    check_x(x)
    if rows not in ("auto", "eval", "train"):
        raise ValueError(f"rows={rows!r} is invalid: allowed 'auto', 'eval' or 'train'")
    if rows == "auto":
        rows = "eval" if any(is_number(r.get(metric)) for r in run.eval) else "train"
    source = run.eval if rows == "eval" else run.train
    points = [(x_value(r, x), r.get(metric)) for r in source]
    points = sorted((float(a), float(b)) for a, b in points if is_number(a) and is_number(b))
    if not points:
        return np.zeros(0), np.zeros(0)
    xs, ys = map(np.asarray, zip(*points))
    return xs, ys


def x_value(row: dict, x: str):
    """A row's position on the x axis (hours from seconds; every other x is the row's own key)."""
    if x in ("hours", "cpu_hours"):
        seconds = row.get("seconds" if x == "hours" else "cpu_seconds")
        return seconds / 3600.0 if is_number(seconds) else None
    return row.get(x)


def metric_range(metric: str) -> tuple[float, float]:
    """The values `metric` can take, so intervals can be clipped to them: pass@k, accuracy and fractions
    in [0, 1], cosines in [-1, 1], counts, norms and times at least 0; anything else unbounded."""
    name = metric.lower()
    if name.startswith("pass@") or name == "accuracy" or name.endswith(("_frac", "_share")):
        return 0.0, 1.0
    if name.startswith("cos"):
        return -1.0, 1.0
    if name.endswith(("seconds", "hours", "norm", "passes", "steps", "_step")) or name in ("step", "seeds"):
        return 0.0, math.inf
    return -math.inf, math.inf


def clip_interval(lo: float, hi: float, low: float, high: float) -> tuple[float, float]:
    """(lo, hi) intersected with [low, high]; NaN stays NaN (a t interval is symmetric, the quantity may
    not be: three seeds of a pass@1 near 0 give a lower end below 0, which no run can have)."""
    return (lo if math.isnan(lo) else min(max(lo, low), high), hi if math.isnan(hi) else max(min(hi, high), low))


def t_critical(df: int, level: float = 0.95) -> float:
    """Two-sided Student-t critical value: P(|T| <= t) = level for T with `df` degrees of freedom.

    The CDF uses the exact finite series for integer df (Abramowitz & Stegun 26.7.3-4); bisection inverts it.
    """
    if isinstance(df, bool) or not isinstance(df, (int, np.integer)) or df < 1:
        raise ValueError(f"df={df!r} is invalid: allowed an integer >= 1")
    if not 0 < level < 1:
        raise ValueError(f"level={level!r} is invalid: allowed a number in (0, 1)")
    low, high = 0.0, 1.0
    while _t_central_mass(high, int(df)) < level:
        high *= 2.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_central_mass(mid, int(df)) < level else (low, mid)
    return (low + high) / 2


def _t_central_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer df (A&S 26.7.3 and 26.7.4)."""
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 1:
        total, term = 0.0, c
        for j in range(1, (df - 1) // 2 + 1):  # cos + 2/3 cos^3 + (2*4)/(3*5) cos^5 + ... up to cos^(df-2)
            total += term
            term *= c * c * (2 * j) / (2 * j + 1)
        return (2 / math.pi) * (theta + s * total)
    total, term = 0.0, 1.0
    for j in range(1, df // 2 + 1):  # 1 + 1/2 cos^2 + (1*3)/(2*4) cos^4 + ... up to cos^(df-2)
        total += term
        term *= c * c * (2 * j - 1) / (2 * j)
    return s * total


def _interval(values: np.ndarray, interval: str, level: float) -> tuple[float, float]:
    """Interval for the mean over seeds; NaN with fewer than two seeds."""
    if values.size < 2:
        return math.nan, math.nan
    mean = float(values.mean())
    if interval == "t":
        half = t_critical(values.size - 1, level) * float(values.std(ddof=1)) / math.sqrt(values.size)
        return mean - half, mean + half
    return bootstrap_ci(values.tolist(), n_boot=2000, alpha=1 - level, seed=0)


def band(runs: Sequence[Run], metric: str, x: str = "step", interval: str = "t", level: float = 0.95,
         rows: str = "auto", bounds: tuple[float, float] | None | str = "auto"):
    """Mean over seeds and a `level` interval for the mean, on a common x grid.

    The grid is the sorted union of every run's x values. Each run is linearly interpolated onto the grid
    points inside its own x range (never extrapolated), so where all runs share their x values (steps,
    GRPO's passes) the values are exact; ``n`` says how many runs a point averages.

    Args:
        interval: ``"t"`` (Student-t over seeds: mean ± t_{n-1} · s / sqrt(n)) or ``"bootstrap"``
            (percentile bootstrap over seeds, `gxpo_lib.rl.evaluation.bootstrap_ci`; coarse with few seeds).
            Fewer than two runs at a point give NaN bounds.
        bounds: the interval is clipped to these (``"auto"``: `metric_range`, e.g. pass@1 in [0, 1];
            None: not clipped).

    Returns:
        A DataFrame with columns ``x, mean, lo, hi, n`` (x named by `x`).
    """
    import pandas as pd

    check_x(x)
    if interval not in ("t", "bootstrap"):
        raise ValueError(f"interval={interval!r} is invalid: allowed 't' or 'bootstrap'")
    curves = [c for c in (curve(run, metric, x, rows) for run in runs) if c[0].size]
    if not curves:
        return pd.DataFrame(columns=[x, "mean", "lo", "hi", "n"])
    grid = np.unique(np.concatenate([xs for xs, _ in curves]))
    low, high = metric_range(metric) if bounds == "auto" else bounds or (-math.inf, math.inf)
    out = []
    for point in grid:
        values = np.asarray([np.interp(point, xs, ys) for xs, ys in curves if xs[0] <= point <= xs[-1]])
        lo, hi = clip_interval(*_interval(values, interval, level), low, high)
        out.append({x: float(point), "mean": float(values.mean()), "lo": lo, "hi": hi, "n": int(values.size)})
    return pd.DataFrame(out)


def seed_mean_curve(runs: Sequence[Run], metric: str = "pass@1", include_initial: bool = False) -> list[dict]:
    """Evaluations averaged over seeds per step: metric, seconds, CPU seconds and cumulative backward passes
    (``cumulative_backward_passes``) are each the mean over the runs, at the steps every run evaluated (the
    step-0 evaluation only with `include_initial`); ``cpu_seconds`` is None where a run did not log it."""
    per_run = [{r["step"]: r for r in run.eval if is_number(r.get(metric))} for run in runs]
    if not per_run:
        return []
    steps = sorted(set.intersection(*(set(p) for p in per_run)))
    if not include_initial:
        steps = [s for s in steps if s > 0]
    curve_rows = []
    for step in steps:
        rows = [p[step] for p in per_run]
        curve_rows.append({
            "step": step, metric: float(np.mean([r[metric] for r in rows])),
            "seconds": mean_or_none([r.get("seconds") for r in rows]),
            "cpu_seconds": mean_or_none([r.get("cpu_seconds") for r in rows]),
            "cumulative_backward_passes": mean_or_none([r.get("cumulative_backward_passes") for r in rows]),
        })
    return [r for r in curve_rows if r["seconds"] is not None and r["cumulative_backward_passes"] is not None]


# ---------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------
def speedup_table(runs: Sequence[Run], reference: str = "grpo", metric: str = "pass@1",
                  by: Sequence[str] = DEFAULT_BY, include_initial: bool = False, resamples: int = 0,
                  level: float = 0.95, seed: int = 0):
    """The paper's speed-up table: how much sooner each method reaches the reference's (GRPO's) peak.

    Per group of seeds, evaluations are averaged over seeds at each step (`seed_mean_curve`; CPU seconds
    and backward passes are averaged too). The reference's best averaged ``metric`` is the target; for
    every group, the first averaged evaluation at or above it gives its steps, CPU seconds and backward
    passes; a ratio is the reference's value divided by the method's
    (`gxpo_lib.rl.evaluation.speedup_to_peak`), so above 1 means faster. Time is the training process's CPU
    seconds, never wall-clock: a run that shared its machine with others took longer on the clock without
    costing more. Where a run did not log CPU seconds (older folders, the authors' logs) the time columns
    are NaN and ``note`` says so. The step-0 evaluation is left out (it is the shared starting model, not
    something a method reached) unless `include_initial`. A group is compared with a reference group that
    has the same model, data and budget settings (`Group.context`).

    **Intervals over seeds** (``resamples > 0``): the seeds of the method's group and of its reference
    group are resampled with replacement, independently, `resamples` times; each draw recomputes the whole
    entry on its own seed-averaged curves (so the target moves with GRPO's resampled peak). A draw in which
    the method misses the target within the budget counts as a speed-up of 0 ("not reached"), so a lower
    bound of 0 says the method failed to reach GRPO's peak in more than (1 - level) / 2 of the draws.
    ``reached_share`` is the fraction of draws that reached it. With five seeds a percentile bootstrap is
    coarse: read the interval as the spread the seeds allow, not as an exact coverage guarantee.

    Returns:
        A DataFrame, one row per group: ``group, algorithm, seeds, reference, target``, the reference's
        ``ref_step, ref_cpu_seconds, ref_cumulative_backward_passes``, the method's ``step, cpu_seconds,
        cumulative_backward_passes`` (NaN if not reached), ``speedup_steps, speedup_cpu_seconds,
        speedup_backward_passes`` and ``status``:
        ``"reference"``, ``"reached"``, ``"not reached"``, ``"no evaluations"`` or ``"no reference"`` (no
        matching reference run; ``note`` then names the settings that differ from the first reference
        group). ``df.attrs["reference_improved"]`` maps each reference group to whether its peak beat its
        initial evaluation. With ``resamples``: ``speedup_<x>_lo, speedup_<x>_hi`` for each ratio and
        ``reached_share``. `format_speedups` renders it like the paper.
    """
    import pandas as pd

    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 0:
        raise ValueError(f"resamples={resamples!r} is invalid: allowed an integer >= 0 (0: no intervals)")
    if not 0 < level < 1:
        raise ValueError(f"level={level!r} is invalid: allowed a number in (0, 1)")
    groups = group_runs(runs, by)
    references = [g for g in groups if g.algorithm == reference]
    improved = {g.label: _improved(g, metric) for g in references}
    rows = []
    for group in groups:
        ref = _matching_reference(group, references)
        is_ref = group.algorithm == reference
        row = _speedup_row(group, ref, metric, include_initial, is_ref=is_ref)
        if ref is None and references:
            nearest = references[0]
            row["note"] = f"differs from {nearest.label}: {_context_difference(group, nearest)}"
        if resamples and ref is not None and not is_ref and row["status"] in ("reached", "not reached"):
            row.update(_speedup_intervals(group, ref, metric, include_initial, resamples, level, seed))
        rows.append(row)
    columns = _SPEEDUP_COLUMNS + (_INTERVAL_COLUMNS if resamples else [])
    df = pd.DataFrame(rows, columns=columns)
    df.attrs["metric"], df.attrs["reference_improved"] = metric, improved
    df.attrs["level"] = level
    return df


_SPEEDUP_COLUMNS = ["group", "algorithm", "seeds", "reference", "target", "ref_step", "ref_cpu_seconds",
                    "ref_cumulative_backward_passes", "step", "cpu_seconds", "cumulative_backward_passes",
                    "speedup_steps", "speedup_cpu_seconds", "speedup_backward_passes", "status", "note"]
# speed-up column suffix -> the x key of `speedup_to_peak`
_RATIO_X = {"steps": "step", "cpu_seconds": "cpu_seconds", "backward_passes": "cumulative_backward_passes"}
_INTERVAL_COLUMNS = [f"speedup_{name}_{end}" for name in _RATIO_X for end in ("lo", "hi")] + ["reached_share"]


def _speedup_intervals(group: Group, ref: Group, metric: str, include_initial: bool, resamples: int,
                       level: float, seed: int) -> dict[str, float]:
    """Percentile intervals of the three ratios over seed resamples (see `speedup_table`)."""
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {name: [] for name in _RATIO_X}
    reached = 0
    for _ in range(resamples):
        method_runs = [group.runs[i] for i in rng.integers(len(group.runs), size=len(group.runs))]
        ref_runs = [ref.runs[i] for i in rng.integers(len(ref.runs), size=len(ref.runs))]
        ref_curve = seed_mean_curve(ref_runs, metric, include_initial)
        method_curve = seed_mean_curve(method_runs, metric, include_initial)
        if not ref_curve or not method_curve:
            continue
        x_keys = _x_keys(ref_curve, method_curve)
        result = speedup_to_peak(ref_curve, method_curve, metric=metric, x_keys=x_keys)
        hit = result["step_method"] is not None
        reached += hit
        for name, x in _RATIO_X.items():
            if x in x_keys:
                draws[name].append(nan_if_none(result[f"{x}_speedup"]) if hit else 0.0)
    tails = (100 * (1 - level) / 2, 100 * (1 + level) / 2)
    out: dict[str, float] = {"reached_share": reached / resamples}
    for name, values in draws.items():
        finite = np.asarray(values, dtype=float)
        finite = finite[np.isfinite(finite)]
        lo, hi = np.percentile(finite, tails) if finite.size else (math.nan, math.nan)
        out[f"speedup_{name}_lo"], out[f"speedup_{name}_hi"] = float(lo), float(hi)
    return out


def _x_keys(*curves: list[dict]) -> tuple[str, ...]:
    """`SPEEDUP_X`, less CPU seconds where a curve lacks them (runs that did not log them)."""
    has_cpu = all(r.get("cpu_seconds") is not None for c in curves for r in c)
    return SPEEDUP_X if has_cpu else tuple(x for x in SPEEDUP_X if x != "cpu_seconds")


def _matching_reference(group: Group, references: list[Group]) -> Group | None:
    """The reference group with the same curve-shaping settings (those both groups record must agree)."""
    if any(group is ref for ref in references):
        return group
    mine = group.context
    for ref in references:
        theirs = ref.context
        if all(mine[k] == theirs[k] for k in set(mine) & set(theirs)):
            return ref
    return None


def _context_difference(group: Group, ref: Group) -> str:
    """The curve-shaping settings in which `group` differs from `ref`, e.g. ``steps 20 vs 60``."""
    mine, theirs = group.context, ref.context
    return ", ".join(f"{k} {mine[k]} vs {theirs[k]}" for k in sorted(set(mine) & set(theirs))
                     if mine[k] != theirs[k])


def _speedup_row(group: Group, ref: Group | None, metric: str, include_initial: bool, is_ref: bool) -> dict:
    """One table row (see `speedup_table`)."""
    row = dict.fromkeys(_SPEEDUP_COLUMNS, math.nan)
    row.update(group=group.label, algorithm=group.algorithm, seeds=len(group.runs),
               reference=ref.label if ref else None, note="")
    ref_curve = seed_mean_curve(ref.runs, metric, include_initial) if ref else []
    method_curve = seed_mean_curve(group.runs, metric, include_initial)
    if ref is None or not ref_curve or not method_curve:
        row["status"] = "no reference" if ref is None or not ref_curve else "no evaluations"
        return row
    x_keys = _x_keys(ref_curve, method_curve)
    if "cpu_seconds" not in x_keys:
        row["note"] = "no CPU seconds logged: time not compared"
    result = speedup_to_peak(ref_curve, method_curve, metric=metric, x_keys=x_keys)
    reached = result["step_method"] is not None
    row.update(target=result["target"], ref_step=result["step_reference"],
               ref_cpu_seconds=nan_if_none(result.get("cpu_seconds_reference")),
               ref_cumulative_backward_passes=result["cumulative_backward_passes_reference"])
    if reached:
        row.update(step=result["step_method"], cpu_seconds=nan_if_none(result.get("cpu_seconds_method")),
                   cumulative_backward_passes=result["cumulative_backward_passes_method"],
                   speedup_steps=nan_if_none(result["step_speedup"]),
                   speedup_cpu_seconds=nan_if_none(result.get("cpu_seconds_speedup")),
                   speedup_backward_passes=nan_if_none(result["cumulative_backward_passes_speedup"]))
    row["status"] = "reference" if is_ref else "reached" if reached else "not reached"
    return row


def _improved(group: Group, metric: str) -> bool:
    """Did the seed-averaged peak after training beat the seed-averaged initial evaluation?"""
    full = seed_mean_curve(group.runs, metric, include_initial=True)
    initial = [r[metric] for r in full if r["step"] == 0]
    later = [r[metric] for r in full if r["step"] > 0]
    return bool(later) and (not initial or max(later) > initial[0])


def format_speedups(df):
    """The speed-up table as the paper prints it: ``1.50×`` or ``not reached`` in the ratio columns, which
    are named for what they hold (``speed-up in steps``, ``speed-up in CPU time``, ``speed-up in backward
    passes``: ratios, not amounts).

    With intervals (``speedup_table(..., resamples=N)``) each ratio is followed by its interval,
    ``1.50× [0.90×, 2.10×]``, where a lower end of 0 reads ``not reached``; a ``reached in`` column gives
    the share of resamples that reached the target.
    """
    with_intervals = "reached_share" in df.columns
    shown = df[["group", "seeds", "target", "speedup_steps", "speedup_cpu_seconds", "speedup_backward_passes",
                "status"]].copy()
    for name in _RATIO_X:
        col = f"speedup_{name}"
        cells = []
        for i, (value, status) in enumerate(zip(df[col], df["status"])):
            cell = (f"{value:.2f}×" if is_number(value) else "n/a") if status in ("reached", "reference") \
                else status
            if with_intervals and is_number(df[f"{col}_lo"].iloc[i]):
                lo, hi = df[f"{col}_lo"].iloc[i], df[f"{col}_hi"].iloc[i]
                cell += f" [{_ratio_text(lo)}, {_ratio_text(hi)}]"
            cells.append(cell)
        shown[col] = cells
    shown["target"] = [f"{v:.3f}" if is_number(v) else "" for v in df["target"]]
    if with_intervals:
        shown["reached in"] = [f"{v:.0%} of resamples" if is_number(v) else "" for v in df["reached_share"]]
    return shown.rename(columns=SPEEDUP_HEADINGS)


SPEEDUP_HEADINGS = {"speedup_steps": "speed-up in steps", "speedup_cpu_seconds": "speed-up in CPU time",
                    "speedup_backward_passes": "speed-up in backward passes"}


def _ratio_text(value: float) -> str:
    return "not reached" if value == 0 else f"{value:.2f}×"


def activity_table(runs: Sequence[Run], by: Sequence[str] = DEFAULT_BY, level: float = 0.95):
    """How long extrapolation stayed on, and what each group spent, with Student-t intervals over seeds.

    Per group: ``steps`` (train rows per run, mean), ``active_steps`` (steps whose update extrapolated:
    train rows with ``active``), ``shutoff_step`` (the first step without extrapolation, over the runs whose
    gate shut), ``never_shut`` (runs whose gate stayed open to the end), ``backward_passes_per_step`` (the
    mean of the train rows' own ``backward_passes``: 1 for GRPO, 3 per active GXPO step, K+1 for SFPO), and the
    cost to the last evaluation: ``cumulative_backward_passes`` and ``cpu_seconds`` (the training process's
    CPU seconds: sampling, scoring and update, whatever else loaded the machine; NaN where a run did not
    log them).
    Each numeric column has ``_lo`` / ``_hi`` bounds (NaN with one seed), clipped to what the quantity can
    be: a t interval is symmetric, but no run extrapolates more steps than it has (0 <= active_steps <=
    steps), passes lie between steps x the cheapest and steps x the dearest step a run took, and times
    are positive. GRPO groups appear too (0 active steps, 1 pass per step): they are the baseline.
    """
    import pandas as pd

    rows = []
    for group in group_runs(runs, by):
        steps = [len(r.train) for r in group.runs]
        per_step = [r.get("backward_passes") for run in group.runs for r in run.train
                    if is_number(r.get("backward_passes"))]
        most = max(steps) if steps else 0
        per_run = {  # name -> (values, the range they can take)
            "steps": (steps, (0.0, math.inf)),
            "active_steps": ([sum(bool(t.get("active")) for t in r.train) for r in group.runs], (0.0, most)),
            "shutoff_step": ([r.shutoff_step for r in group.runs if r.shutoff_step is not None],
                             (1.0, float(most))),
            "backward_passes_per_step": ([_mean_passes(r) for r in group.runs],
                                         (min(per_step), max(per_step)) if per_step else (0.0, math.inf)),
            "cumulative_backward_passes": ([r.eval[-1].get("cumulative_backward_passes") for r in group.runs
                                            if r.eval],
                                           (min(steps, default=0) * min(per_step), most * max(per_step))
                                           if per_step else (0.0, math.inf)),
            "cpu_seconds": ([r.eval[-1].get("cpu_seconds") for r in group.runs if r.eval], (0.0, math.inf)),
        }
        row: dict[str, Any] = {"group": group.label, "algorithm": group.algorithm, "seeds": len(group.runs)}
        for name, (values, (low, high)) in per_run.items():
            values = np.asarray([v for v in values if is_number(v)], dtype=float)
            row[name] = float(values.mean()) if values.size else math.nan
            row[f"{name}_lo"], row[f"{name}_hi"] = clip_interval(*_interval(values, "t", level), low, high)
        row["never_shut"] = 0 if group.algorithm == "grpo" else \
            sum(r.shutoff_step is None for r in group.runs)
        rows.append(row)
    return pd.DataFrame(rows)


def _mean_passes(run: Run) -> float | None:
    """The mean of a run's per-step ``backward_passes`` over its train rows (None if none logs it)."""
    values = [r["backward_passes"] for r in run.train if is_number(r.get("backward_passes"))]
    return float(np.mean(values)) if values else None


def final_table(runs: Sequence[Run], by: Sequence[str] | None = None, level: float = 0.95):
    """Final pass@1 and pass@k (the largest k evaluated) per benchmark, with intervals.

    With ``by=None`` one row per run and benchmark, intervals from ``final_eval.json`` (percentile
    bootstrap over problems). With `by` (e.g. `DEFAULT_BY`), one row per group of seeds and benchmark: the
    mean over seeds and a Student-t interval over seeds (a single-seed group keeps its bootstrap interval).
    Runs without a final evaluation are left out.

    Returns:
        A DataFrame: ``run`` (or ``group``), ``algorithm, seeds, benchmark, problems, samples, pass@1,
        pass@1_lo, pass@1_hi, k, pass@k, pass@k_lo, pass@k_hi, interval``.
    """
    import pandas as pd

    with_final = [r for r in runs if r.final_eval]
    rows = []
    if by is None:
        for run in with_final:
            for bench, result in sorted(run.final_eval.items()):
                rows.append({"run": run.name, "algorithm": run.algorithm, "seeds": 1, "benchmark": bench,
                             **_final_cells([result], level)})
    else:
        for group in group_runs(with_final, by):
            for bench in sorted({b for r in group.runs for b in r.final_eval}):
                results = [r.final_eval[bench] for r in group.runs if bench in r.final_eval]
                rows.append({"group": group.label, "algorithm": group.algorithm, "seeds": len(results),
                             "benchmark": bench, **_final_cells(results, level)})
    return pd.DataFrame(rows)


def _final_cells(results: list[dict], level: float) -> dict[str, Any]:
    """pass@1 and the largest common pass@k over one or several runs' results for one benchmark."""
    ks = set.intersection(*({int(m.group(1)) for key in r if (m := _PASS_KEY.match(key))} for r in results))
    k = max(ks) if ks else None
    cells: dict[str, Any] = {"problems": results[0].get("problems"), "samples": results[0].get("samples")}
    for name, key in (("pass@1", "pass@1"), ("pass@k", f"pass@{k}" if k else None)):
        values = np.asarray([r[key] for r in results], dtype=float) if key and all(key in r for r in results) \
            else np.zeros(0)
        if values.size == 0:
            cells.update({name: math.nan, f"{name}_lo": math.nan, f"{name}_hi": math.nan})
            continue
        if values.size == 1:
            lo, hi = (results[0].get(f"{key}_ci") or [math.nan, math.nan])[:2]
        else:
            lo, hi = clip_interval(*_interval(values, "t", level), 0.0, 1.0)   # pass@k lies in [0, 1]
        cells.update({name: float(values.mean()), f"{name}_lo": float(lo), f"{name}_hi": float(hi)})
    cells["k"] = k
    cells["interval"] = "bootstrap over problems" if len(results) == 1 else "t over seeds"
    return cells



# ---------------------------------------------------------------------------------------------------
# The mechanism: what GXPO's jump did
# ---------------------------------------------------------------------------------------------------
MECHANISM_KEYS = ("r_mean", "cos_g0_g1", "scale_mean", "effective_multiplier")


def mechanism_summary(run: Run) -> dict[str, Any]:
    """GXPO's (or SFPO's) mechanism averaged over the steps that extrapolated, and what it means.

    GXPO's reposition is θ̃ = θ0 + α·q ⊙ (θ2 − θ0): with α·q below 1 the landing point lies between θ0 and
    the second probe point θ2 (the jump retreated from where two plain steps went); above 1 it lies beyond
    θ2. Either way θ2 − θ0 is two optimizer steps and the corrective step follows, so one update moves θ by
    about 1 + 2α·q̄ plain steps where the probes agree: "retreated" is about θ̃ against θ2, never a step
    shorter than a plain one. At the paper's learning rate (1e-7) r ≈ 1, so q ≈ K/2 and α·q ≈ α·K/2 (1.25
    for K=5, α=0.5). SFPO's is θ̃ = θ0 + α (θK − θ0) after K fast steps: its logged α·q is α, read against
    θK, and its update is about 1 + K·α plain steps.

    Returns:
        ``run, algorithm, steps, active_steps`` and the means over active steps of ``r_mean, cos_g0_g1,
        scale_mean, alpha_q`` (None without active steps), plus ``verdict``: one sentence from the numbers.
    """
    active = [r for r in run.train if r.get("active")]
    out: dict[str, Any] = {"run": run.name, "algorithm": run.algorithm, "steps": len(run.train),
                           "active_steps": len(active)}
    for key in MECHANISM_KEYS:
        values = [float(r[key]) for r in active if is_number(r.get(key))]
        out["alpha_q" if key == "effective_multiplier" else key] = float(np.mean(values)) if values else None
    out["verdict"] = _mechanism_verdict(out, run.config.get("k"))
    return out


def _mechanism_verdict(summary: dict[str, Any], k: int | None = None) -> str:
    """One sentence naming what the jump did and how far the whole update went (see `mechanism_summary`)."""
    name, alpha_q = summary["algorithm"].upper(), summary["alpha_q"]
    if not summary["active_steps"] or alpha_q is None:
        return f"{name} never extrapolated: every step was a plain step (gate shut, or fallbacks)."
    sfpo = summary["algorithm"] == "sfpo"
    end, steps = ("θK", "its K fast steps") if sfpo else ("θ2", "two plain steps")
    factor, last = (k, "slow") if sfpo else (2, "corrective")
    size = (f"about 1 + {'K·α' if sfpo else '2α·q̄'}" + (f" = {1 + factor * alpha_q:.2f}" if factor else "")
            + f" plain steps{'' if sfpo else ' where the probes agree'}")
    where = (f"α·q̄ = {alpha_q:.2f} < 1: the jump retreated (θ̃ lies between θ0 and {end}, short of where "
             f"{steps} went), yet with the {last} step the update is still {size}: a shorter jump, not a "
             "shorter step" if alpha_q < 1 else
             f"α·q̄ = {alpha_q:.2f} ≥ 1: the jump went beyond {end} (it extrapolated past {steps}); with the {last} "
             f"step the update is {size}")
    parts = [f"{name}, over its {summary['active_steps']} extrapolating steps of {summary['steps']}: {where}"]
    if summary["r_mean"] is not None:
        r = summary["r_mean"]
        reading = "near 1: the gradient persisted" if abs(r - 1) < 0.2 else \
            "far from 1: the gradient did not persist as the geometric series assumes"
        parts.append(f"mean r = {r:.2f} ({reading})")
    if summary["cos_g0_g1"] is not None:
        parts.append(f"cos(g0, g1) = {summary['cos_g0_g1']:.2f}")
    return "; ".join(parts) + "."


def format_activity(df):
    """The activity table for reading: one cell per quantity, ``39.7 [38.2, 40.0]`` (mean over seeds and
    its clipped 95% interval), CPU time in seconds, and plain integers where every run agrees."""
    shown = df[["group", "seeds"]].copy()
    for name, heading, digits in (("steps", "steps", 1), ("active_steps", "active steps", 1),
                                  ("shutoff_step", "gate shut at step", 1),
                                  ("cumulative_backward_passes", "backward passes (cumulative)", 1),
                                  ("cpu_seconds", "CPU seconds", 0)):
        cells = []
        for mean, lo, hi in zip(df[name], df[f"{name}_lo"], df[f"{name}_hi"]):
            if not is_number(mean):
                cells.append("-")
            elif not is_number(lo) or lo == hi:
                cells.append(f"{mean:.{digits}f}" if mean != round(mean) else f"{mean:.0f}")
            else:
                cells.append(f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]")
        shown[heading] = cells
    shown["gate never shut"] = [f"{n} of {s}" for n, s in zip(df["never_shut"], df["seeds"])]
    return shown
