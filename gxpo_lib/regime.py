"""The first regime study: when does GXPO's extrapolation pay? Compact results, cell tables, maps.

A study is a set of sweep runs (``sweeps/regime-*.yaml``) over learning rates and methods. This module

* exports each finished run folder into one small JSON record (config essentials, the evaluation curve,
  per-step rows of a few diagnostics, the final evaluation): ``export_study(runs_root, out_dir)``;
* loads those records back without torch or training: ``load_study(folder)``;
* builds the cell table, one row per (method, lr): final and peak pass@1 with Student-t intervals over
  seeds, steps / seconds / backward passes to the same-lr GRPO's peak and to the best-lr GRPO's peak with
  seed-bootstrap intervals, and GXPO's mechanism (mean r, cos(g0, g1), alpha*q, the clamp fraction, the
  gate's shut-off step): ``cell_table(records)``;
* measures the matched-step multiplier (a GXPO cell's mean alpha*q over its extrapolating steps) and
  writes the matched-step GRPO sweep from it: ``matched_step_multiplier``, ``write_matched_sweep``;
* runs a toy race on an ill-conditioned quadratic (loss against backward passes) for notebook 05, and the
  speed-up map's numbers; ``gxpo_lib.regime_plots`` draws them.

    records = load_study(shipped("results", "regime"))
    table = cell_table(records)                      # pandas DataFrame, one row per (method, lr)
    compare(records, "GXPO K=5 grad", 2e-3)          # difference to GRPO with a Welch interval, a verdict

Command line (the sweeps resume, so a study can grow across sessions):

    python -m gxpo_lib.regime export runs/regime data/results/regime
    python -m gxpo_lib.regime matched runs/regime --lr 0.002 --k 5 --retention grad --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import runlog
from .evaluation import speedup_to_peak
from .validation import check_choice, check_int, check_positive

RECORD_VERSION = 1
# Config essentials kept in a compact record (what tells one cell from another, and the budget).
CONFIG_KEYS = ("algorithm", "k", "alpha", "retention", "lr", "step_scale", "ppo_epochs", "gate", "gate_tau",
               "gate_init", "seed", "steps", "batch_prompts", "group_size", "eval_every", "eval_problems",
               "eval_samples", "final_eval_problems", "final_eval_samples", "max_new_tokens", "model", "lora",
               "rollout_backend", "r_clamp")
EVAL_KEYS = ("step", "pass@1", "backward_passes", "seconds", "cpu_seconds")
# Per-step keys kept from the train rows (cumulative passes and seconds, then the step's diagnostics).
TRAIN_KEYS = ("step", "backward_passes", "seconds", "reward_mean", "active", "gate_open", "gate_z",
              "grad_norm", "r_mean", "cos_g0_g1", "effective_multiplier", "ratio_clip_frac")
MECHANISM = {"r_mean": "r_mean", "cos_g0_g1": "cos_g0_g1", "alpha_q": "effective_multiplier",
             "clamp_frac": "ratio_clip_frac"}
X_AXES = ("step", "seconds", "cpu_seconds", "backward_passes")  # cpu_seconds: the run's own, load-robust
REFERENCES = ("same_lr", "best_lr")
GRPO = "GRPO"
MATCHED_STEP = "GRPO matched step"


# ---------------------------------------------------------------------------------------------------
# Export: a run folder -> one compact record
# ---------------------------------------------------------------------------------------------------
def _round(value: Any, digits: int = 5) -> Any:
    """Floats to `digits` significant digits (records stay small); other values unchanged."""
    if isinstance(value, float) and math.isfinite(value) and value != 0:
        return round(value, digits - 1 - math.floor(math.log10(abs(value))))
    return value


def compact_run(folder: Path | str) -> dict[str, Any]:
    """One finished run folder as a compact record: config essentials, eval curve, train rows, final eval.

    Curves are stored column-wise (``{"step": [...], "pass@1": [...], ...}``); eval ``backward_passes``
    and ``seconds`` are cumulative training passes and seconds at that evaluation. Raises ValueError for a
    folder without training rows or without its final evaluation (an unfinished run).
    """
    folder = Path(folder)
    rows = runlog.read_rows(folder)
    config = runlog.read_config(folder)
    final = runlog.read_final_eval(folder)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    if not train or not final:
        raise ValueError(f"{str(folder)!r} is not a finished run (train rows: {len(train)}, final eval: "
                         f"{sorted(final)})")
    benchmark, result = next(iter(sorted(final.items())))
    k_top = max(int(key[5:]) for key in result if key.startswith("pass@") and key[5:].isdigit())
    renamed = {"backward_passes": "cumulative_backward_passes"}
    return {
        "version": RECORD_VERSION, "name": folder.name,
        "config": {key: config.get(key) for key in CONFIG_KEYS},
        "eval": {key: [_round(r.get(renamed.get(key, key))) for r in evals] for key in EVAL_KEYS},
        "train": {key: [_round(r.get(renamed.get(key, key))) for r in train] for key in TRAIN_KEYS},
        "final": {"benchmark": benchmark, "problems": result.get("problems"),
                  "samples": result.get("samples"), "pass@1": _round(result["pass@1"]),
                  "pass@1_ci": [_round(v) for v in result["pass@1_ci"]],
                  f"pass@{k_top}": _round(result[f"pass@{k_top}"])},
        "shutoff_step": runlog.summarize_run(folder)["shutoff_step"],
    }


def export_study(runs_root: Path | str, out_dir: Path | str,
                 meta: dict[str, Any] | None = None) -> list[Path]:
    """Every finished run under `runs_root` (one level of folders) into ``out_dir/<run name>.json``.

    Unfinished folders are skipped (listed in ``study.json``). `meta` (machine, load, what was left out)
    is written to ``out_dir/study.json`` with the list of runs. Returns the record paths written.
    """
    runs_root, out_dir = Path(runs_root), Path(out_dir)
    if not runs_root.is_dir():
        raise ValueError(f"runs_root={str(runs_root)!r} is invalid: allowed an existing folder of runs")
    out_dir.mkdir(parents=True, exist_ok=True)
    written, unfinished = [], []
    for folder in sorted(p for p in runs_root.iterdir() if (p / runlog.METRICS_FILE).exists()):
        try:
            record = compact_run(folder)
        except ValueError:
            unfinished.append(folder.name)
            continue
        path = out_dir / f"{folder.name}.json"
        path.write_text(json.dumps(record, separators=(",", ":")), encoding="utf-8")
        written.append(path)
    study = {"runs": [p.stem for p in written], "unfinished": unfinished, **(meta or {})}
    (out_dir / "study.json").write_text(json.dumps(study, indent=1), encoding="utf-8")
    return written


def load_study(folder: Path | str) -> list[dict[str, Any]]:
    """The compact records of a study folder (every ``*.json`` but ``study.json``), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"folder={str(folder)!r} is invalid: allowed a folder of compact run records")
    records = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))
               if p.name != "study.json"]
    return [r for r in records if r.get("version") == RECORD_VERSION]


# ---------------------------------------------------------------------------------------------------
# Cells: which method a record belongs to
# ---------------------------------------------------------------------------------------------------
def method_label(config: dict[str, Any]) -> str:
    """A cell's method: "GRPO", "GRPO x3 epochs", "GRPO matched step", "GXPO K=5 grad", "SFPO K=3", ...

    Non-default GXPO alpha, gate threshold or gate cold start are appended ("... alpha=0.25", "... gate
    warmup"), so different settings never share a cell.
    """
    algorithm = config["algorithm"]
    if algorithm == "grpo":
        if config.get("ppo_epochs", 1) != 1:
            return f"GRPO x{config['ppo_epochs']} epochs"
        return MATCHED_STEP if config.get("step_scale", 1.0) != 1.0 else GRPO
    if algorithm == "sfpo":
        return f"SFPO K={config['k']}"
    label = f"GXPO K={config['k']} {config.get('retention', 'grad')}"
    if config.get("alpha", 0.5) != 0.5:
        label += f" alpha={config['alpha']:g}"
    if config.get("gate_tau", 0.5) != 0.5:
        label += f" tau={config['gate_tau']:g}"
    if config.get("gate_init", "unit") != "unit":
        label += f" gate {config['gate_init']}"
    return label


def _grouped(records: Sequence[dict[str, Any]]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    """Records grouped by (method_label, lr), in input order."""
    out: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for record in records:
        out.setdefault((method_label(record["config"]), float(record["config"]["lr"])), []).append(record)
    return out


def _mean_alpha_q(runs: Sequence[dict[str, Any]]) -> float | None:
    values = [m["alpha_q"] for m in map(mechanism, runs) if m["alpha_q"] is not None]
    return float(np.mean(values)) if values else None


def cells(records: Sequence[dict[str, Any]]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    """Records grouped by (method, lr), seeds inside, sorted by seed; cells sorted by method then lr.

    A step-scaled GRPO run is the matched step of the GXPO K (grad retention) at its lr whose mean alpha*q
    its ``step_scale`` equals (within 5%): "GRPO matched step" for K = 5, "GRPO matched step K=10" for
    another K, "GRPO step x1.5" when it matches none.
    """
    grouped = _grouped(records)
    multipliers = {(lr, int(method.split()[1][2:])): _mean_alpha_q(runs) for (method, lr), runs in grouped.items()
                   if re.fullmatch(r"GXPO K=\d+ grad", method)}
    out: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for (method, lr), runs in grouped.items():
        if method != MATCHED_STEP:
            out.setdefault((method, lr), []).extend(runs)
            continue
        for run in runs:
            scale = float(run["config"]["step_scale"])
            near = [(abs(value / scale - 1), k) for (at, k), value in multipliers.items()
                    if at == lr and value is not None and abs(value / scale - 1) < 0.05]
            k = min(near)[1] if near else None
            label = f"GRPO step x{scale:g}" if k is None else MATCHED_STEP if k == 5 else f"{MATCHED_STEP} K={k}"
            out.setdefault((label, lr), []).append(run)
    return {key: sorted(out[key], key=lambda r: r["config"]["seed"]) for key in sorted(out)}


# ---------------------------------------------------------------------------------------------------
# Per-run numbers
# ---------------------------------------------------------------------------------------------------
def peak_pass(record: dict[str, Any]) -> float:
    """The run's best evaluation pass@1 after step 0."""
    return max(p for s, p in zip(record["eval"]["step"], record["eval"]["pass@1"]) if s > 0)


def mechanism(record: dict[str, Any]) -> dict[str, float | None]:
    """Means over the run's extrapolating steps of r, cos(g0, g1), alpha*q and the clamp fraction."""
    train = record["train"]
    active = [i for i, a in enumerate(train["active"]) if a]
    out: dict[str, float | None] = {}
    for name, key in MECHANISM.items():
        values = [train[key][i] for i in active if train[key][i] is not None]
        out[name] = float(np.mean(values)) if values else None
    out["active_steps"] = float(len(active))
    return out


def _eval_curve(records: Sequence[dict[str, Any]]) -> list[dict[str, float]]:
    """Seed-mean evaluation curve (steps > 0 every run evaluated): pass@1 and every x of `X_AXES`."""
    per_run = [dict(zip(r["eval"]["step"], range(len(r["eval"]["step"])))) for r in records]
    steps = sorted(set.intersection(*(set(p) for p in per_run)) - {0})
    curve = []
    for step in steps:
        point = {"step": float(step)}
        for key in ("pass@1", *X_AXES[1:]):
            point[key] = float(np.mean([r["eval"][key][p[step]] for r, p in zip(records, per_run)]))
        curve.append(point)
    return curve


def _to_peak(reference: Sequence[dict[str, Any]], method: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """`speedup_to_peak` on seed-mean curves: the method's x where it first reaches the reference's peak."""
    return speedup_to_peak(_eval_curve(reference), _eval_curve(method), metric="pass@1", x_keys=X_AXES)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval for the mean over seeds; NaN bounds with fewer than 2."""
    from .analysis import t_critical

    array = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if array.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(array.mean())
    if array.size < 2:
        return mean, math.nan, math.nan
    half = t_critical(array.size - 1, level) * float(array.std(ddof=1)) / math.sqrt(array.size)
    return mean, mean - half, mean + half


def speedup_interval(reference: Sequence[dict[str, Any]], method: Sequence[dict[str, Any]],
                     resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Speed-up to the reference's peak (reference x / method x) with a seed-bootstrap interval.

    Both sides' seeds are resampled with replacement `resamples` times (one draw for both when `method`
    is `reference` itself, so GRPO's own row is exactly 1); each draw recomputes the target
    (the reference's seed-mean peak) and the method's first hit. Returns, per x in `X_AXES` (step,
    wall seconds, the run's CPU seconds, backward passes): ``<x>`` (the method's x at the hit, None if
    never), ``speedup_<x>`` and ``speedup_<x>_lo`` / ``_hi`` (percentiles over the draws that reached;
    None if none did), and
    ``reached_share`` (the share of draws in which the method reached the target) and ``target``.
    """
    check_int("resamples", resamples, minimum=1)
    point = _to_peak(reference, method)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {x: [] for x in X_AXES}
    reached = 0
    for _ in range(resamples):
        ref = [reference[i] for i in rng.integers(0, len(reference), len(reference))]
        # a cell measured against itself (GRPO's own row) is one draw, not two independent ones
        meth = ref if method is reference else [method[i] for i in rng.integers(0, len(method), len(method))]
        hit = _to_peak(ref, meth)
        if hit["step_method"] is not None:
            reached += 1
            for x in X_AXES:
                if hit[f"{x}_speedup"] is not None:
                    draws[x].append(hit[f"{x}_speedup"])
    out: dict[str, Any] = {"target": point["target"], "reached_share": reached / resamples}
    tail = (1 - level) / 2
    for x in X_AXES:
        out[x] = point[f"{x}_method"]
        out[f"speedup_{x}"] = point[f"{x}_speedup"]
        lo, hi = np.quantile(draws[x], [tail, 1 - tail]) if draws[x] else (None, None)
        out[f"speedup_{x}_lo"], out[f"speedup_{x}_hi"] = (None if lo is None else float(lo),
                                                          None if hi is None else float(hi))
    return out


# ---------------------------------------------------------------------------------------------------
# The cell table
# ---------------------------------------------------------------------------------------------------
def best_grpo_lr(records: Sequence[dict[str, Any]]) -> float | None:
    """The lr whose GRPO cell has the highest seed-mean peak pass@1 (None without GRPO runs)."""
    grpo = {lr: runs for (method, lr), runs in cells(records).items() if method == GRPO}
    if not grpo:
        return None
    return max(grpo, key=lambda lr: max(p["pass@1"] for p in _eval_curve(grpo[lr])))


def cell_table(records: Sequence[dict[str, Any]], resamples: int = 1000, level: float = 0.95):
    """One row per (method, lr): the study's numbers (see the module docstring), as a pandas DataFrame.

    Columns: ``method, lr, seeds, final, final_lo, final_hi, peak, peak_lo, peak_hi, steps, seconds,
    cpu_seconds, backward_passes`` (means over seeds; seconds are training wall-clock, cpu_seconds the
    training process's own CPU time, which other load on the machine inflates less); for each reference
    in (same_lr, best_lr): ``<ref>_target``, ``<ref>_reached_share`` and, per x in `X_AXES`,
    ``<ref>_<x>`` (x at the seed-mean hit) and ``<ref>_speedup_<x>`` with ``_lo`` / ``_hi``; then
    ``r_mean, cos_g0_g1, alpha_q, clamp_frac, active_steps`` (means over seeds of each run's means over
    extrapolating steps; NaN for GRPO), ``alpha_q_lo, alpha_q_hi, cos_lo, cos_hi``, ``shut_runs`` and
    ``shutoff_step`` (mean over the runs that shut). Every column but ``method`` is numeric; a missing
    number (no reference, never reached) is NaN.
    """
    import pandas as pd

    groups = cells(records)
    best = best_grpo_lr(records)
    references = {"same_lr": lambda lr: groups.get((GRPO, lr)),
                  "best_lr": lambda lr: groups.get((GRPO, best))}
    rows = []
    for (method, lr), runs in groups.items():
        row: dict[str, Any] = {"method": method, "lr": lr, "seeds": len(runs)}
        finals, peaks = [r["final"]["pass@1"] for r in runs], [peak_pass(r) for r in runs]
        for name, values in (("final", finals), ("peak", peaks)):
            row[name], row[f"{name}_lo"], row[f"{name}_hi"] = t_interval(values, level)
        row["steps"] = float(np.mean([r["train"]["step"][-1] for r in runs]))
        row["seconds"] = float(np.mean([r["train"]["seconds"][-1] for r in runs]))
        row["cpu_seconds"] = float(np.mean([r["eval"]["cpu_seconds"][-1] for r in runs]))
        row["backward_passes"] = float(np.mean([r["train"]["backward_passes"][-1] for r in runs]))
        for ref_name, find in references.items():
            reference = find(lr)
            hit = speedup_interval(reference, runs, resamples, level) if reference else {}
            row[f"{ref_name}_target"] = hit.get("target")
            row[f"{ref_name}_reached_share"] = hit.get("reached_share")
            for x in X_AXES:
                row[f"{ref_name}_{x}"] = hit.get(x)
                for suffix in ("", "_lo", "_hi"):
                    row[f"{ref_name}_speedup_{x}{suffix}"] = hit.get(f"speedup_{x}{suffix}")
        mech = [mechanism(r) for r in runs]
        for name in (*MECHANISM, "active_steps"):
            values = [m[name] for m in mech if m[name] is not None]
            row[name] = float(np.mean(values)) if values else None
        for name, short in (("alpha_q", "alpha_q"), ("cos_g0_g1", "cos")):
            _, row[f"{short}_lo"], row[f"{short}_hi"] = t_interval([m[name] for m in mech], level)
        shut = [r["shutoff_step"] for r in runs if r["shutoff_step"] is not None]
        row["shut_runs"] = len(shut)
        row["shutoff_step"] = float(np.mean(shut)) if shut else None
        rows.append(row)
    table = pd.DataFrame(rows)
    for column in table.columns.drop("method"):  # one missing-value convention: NaN, never None
        table[column] = pd.to_numeric(table[column], errors="coerce")
    return table


def compare(records: Sequence[dict[str, Any]], method: str, lr: float, reference: str = GRPO,
            metric: str = "final", level: float = 0.95) -> dict[str, Any]:
    """`method` minus `reference` at `lr` on `metric` ("final" or "peak" pass@1), with a Welch interval.

    Returns ``difference, lo, hi, seeds`` and ``verdict``: "higher" / "lower" when the interval of the
    difference excludes 0, "undecided" when it contains 0, "missing" when a cell has fewer than 2 seeds;
    ``text`` says it in one sentence with the numbers.
    """
    from .analysis import t_critical

    check_choice("metric", metric, ("final", "peak"))
    groups = cells(records)
    sides = [groups.get((name, float(lr)), []) for name in (method, reference)]
    value = (lambda r: r["final"]["pass@1"]) if metric == "final" else peak_pass
    a, b = (np.asarray([value(r) for r in side], dtype=np.float64) for side in sides)
    out: dict[str, Any] = {"method": method, "reference": reference, "lr": float(lr), "metric": metric,
                           "seeds": (int(a.size), int(b.size))}
    if a.size < 2 or b.size < 2:
        out |= {"difference": None, "lo": None, "hi": None, "verdict": "missing",
                "text": f"{method} vs {reference} at lr {lr:g}: not decided, fewer than 2 seeds in a cell "
                        f"({a.size} and {b.size})"}
        return out
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    diff = float(a.mean() - b.mean())
    se = math.sqrt(va + vb)
    df = ((va + vb) ** 2 / ((va ** 2 / (a.size - 1)) + (vb ** 2 / (b.size - 1))) if se > 0
          else a.size + b.size - 2)  # Welch-Satterthwaite degrees of freedom
    half = t_critical(max(1, math.floor(df)), level) * se
    lo, hi = diff - half, diff + half
    verdict = "higher" if lo > 0 else "lower" if hi < 0 else "undecided"
    words = {"higher": "higher than", "lower": "lower than", "undecided": "not distinguishable from"}[verdict]
    out |= {"difference": diff, "lo": lo, "hi": hi, "verdict": verdict,
            "text": f"{method} at lr {lr:g}: {metric} pass@1 {words} {reference}'s, difference {diff:+.3f} "
                    f"[{lo:+.3f}, {hi:+.3f}] ({level:.0%} Welch interval, {a.size} vs {b.size} seeds)"}
    return out


def _cell_text(value: Any, lo: Any = None, hi: Any = None, digits: int = 3) -> str:
    """"0.512 [0.47, 0.55]", "0.512" without bounds, "-" when missing."""
    if _missing(value):
        return "-"
    text = f"{value:.{digits}f}"
    return text if _missing(lo) or _missing(hi) else f"{text} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _reach_text(row: Any, reference: str) -> str:
    """Where a cell reached the reference GRPO's peak: "step 30 (1.33x [1.0, 2.0], 85% of draws)"."""
    share = row[f"{reference}_reached_share"]
    if _missing(share):
        return "-"
    if _missing(row[f"{reference}_step"]):
        return f"not reached ({share:.0%} of draws)"
    ref = reference
    speedup = _cell_text(row[f"{ref}_speedup_step"], row[f"{ref}_speedup_step_lo"],
                         row[f"{ref}_speedup_step_hi"], 2)
    return (f"step {row[f'{ref}_step']:.0f}, {row[f'{ref}_backward_passes']:.0f} passes, "
            f"{row[f'{ref}_seconds']:.0f} s ({speedup}x in steps, {share:.0%} of draws)")


def markdown_table(table) -> str:
    """The cell table as README-ready markdown: pass@1 with intervals, cost, GRPO's peaks, mechanism."""
    lines = [("| method | lr | seeds | final pass@1 | peak pass@1 | passes | train s | CPU s | to same-lr "
              "GRPO peak | to best-lr GRPO peak | mean r | cos(g0,g1) | α·q̄ | clamp | gate shut |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, row in table.iterrows():
        shut = "-" if row["method"].startswith("GRPO") else (
            f"{row['shut_runs']:.0f} of {row['seeds']:.0f}" + ("" if _missing(row["shutoff_step"]) else
                                                                f" (step {row['shutoff_step']:.0f})"))
        lines.append("| " + " | ".join([
            row["method"], f"{row['lr']:g}", f"{row['seeds']:.0f}",
            _cell_text(row["final"], row["final_lo"], row["final_hi"]),
            _cell_text(row["peak"], row["peak_lo"], row["peak_hi"]),
            f"{row['backward_passes']:.0f}", f"{row['seconds']:.0f}", f"{row['cpu_seconds']:.0f}",
            _reach_text(row, "same_lr"), _reach_text(row, "best_lr"),
            _cell_text(row["r_mean"], digits=2), _cell_text(row["cos_g0_g1"], digits=2),
            _cell_text(row["alpha_q"], digits=2), _cell_text(row["clamp_frac"], digits=3), shut]) + " |")
    return "\n".join(lines)


def replay_gate(record: dict[str, Any], init: str | None = None) -> int | None:
    """Feed a GXPO run's logged corrective norms (its extrapolating steps) to a fresh default gate.

    Returns the shut-off step in the runs' convention (the first plain step), or None if it never trips
    within the logged signal. ``init`` None means the run's own ``gate_init``: that replay must give its
    logged ``shutoff_step``. The other cold start says what it would have done on the same signal, exact
    up to the run's own shut-off (after it the real run took plain steps and logged no more signal).
    """
    from .gate import ShutoffGate

    init = record["config"].get("gate_init", "unit") if init is None else init
    gate = ShutoffGate(tau=record["config"].get("gate_tau", 0.5), init=init)
    train = record["train"]
    for step, value, active in zip(train["step"], train["grad_norm"], train["active"]):
        if active and value is not None:
            gate.observe(value, step=step)
            if not gate.is_open:
                return step + 1
    return None


# ---------------------------------------------------------------------------------------------------
# The matched-step control
# ---------------------------------------------------------------------------------------------------
def matched_step_multiplier(records: Sequence[dict[str, Any]], lr: float, k: int = 5,
                            retention: str = "grad") -> float:
    """GXPO's mean alpha*q at `lr`: each run's mean over its extrapolating steps, averaged over seeds.

    This is the step GXPO takes on average relative to two plain steps' displacement, hence the
    `step_scale` of the matched-step GRPO control. Raises ValueError when no such GXPO run exists.
    """
    value = _mean_alpha_q(_grouped(records).get((f"GXPO K={k} {retention}", float(lr)), []))
    if value is None:
        raise ValueError(f"lr={lr!r} is invalid here: no GXPO K={k} {retention} run at that lr extrapolated "
                         "(run its sweep first)")
    return value


def write_matched_sweep(records: Sequence[dict[str, Any]], lr: float, path: Path | str, k: int = 5,
                        retention: str = "grad", seeds: Sequence[int] = (0, 1, 2),
                        base_from: Path | str = "sweeps/regime-grpo.yaml") -> float:
    """Write the matched-step GRPO sweep for `lr` (step_scale = `matched_step_multiplier`); returns it.

    The base settings (preset, out, base) are copied from `base_from`, so the runs join the same study.
    """
    import yaml

    check_positive("lr", lr)
    scale = round(matched_step_multiplier(records, lr, k, retention), 3)
    template = yaml.safe_load(Path(base_from).read_text(encoding="utf-8"))
    header = (f"# The first regime study: the matched-step control at lr {lr:g}. GRPO with step_scale = "
              f"{scale}, the mean alpha*q of\n# GXPO K={k} {retention} at this lr (measured from its runs, "
              "python -m gxpo_lib.regime matched).\n")
    body = {"preset": template["preset"], "out": template["out"], "base": template["base"],
            "grid": {"algorithm": ["grpo"], "step_scale": [scale], "lr": [lr], "seed": list(seeds)}}
    text = header + yaml.safe_dump(body, sort_keys=False, default_flow_style=None)
    Path(path).write_text(text, encoding="utf-8")
    return scale


# ---------------------------------------------------------------------------------------------------
# The toy race: loss against backward passes on an ill-conditioned quadratic
# ---------------------------------------------------------------------------------------------------
def coordinate_q(h: Sequence[float], lr: float, k: int = 5, alpha: float = 0.5) -> dict[str, list[float]]:
    """Per-coordinate r = 1 - lr h (plain GD on a diagonal quadratic), q and alpha*q. [n] -> [n] each."""
    import torch

    from .extrapolation import R_CLAMP, geometric_scale

    check_positive("lr", lr)
    r = (1.0 - lr * torch.as_tensor(h, dtype=torch.float64)).clamp(*R_CLAMP)
    q = geometric_scale(r, check_int("k", k, minimum=2))
    return {"r": r.tolist(), "q": q.tolist(), "alpha_q": (alpha * q).tolist()}


def toy_race(lr: float, steps: int = 40, k: int = 5, alpha: float = 0.5, noise: float = 0.02,
             h: Sequence[float] = (1.0, 0.02), seed: int = 0) -> dict[str, Any]:
    """GD, GD with a displacement-matched step, GXPO, GXPO with gradient noise and scalar-q GXPO on
    L = 1/2 sum h_i theta_i^2.

    Every method gets the same budget of backward passes, 3 * `steps` (GXPO: `steps` updates of 3 passes;
    GD: 3 * `steps` updates). The displacement-matched GD is GD at lr * s, where s is GXPO's measured update
    size per update in plain steps: the mean over its extrapolating updates of ||theta_{t+1} - theta_t|| over
    ||theta_1 - theta_0|| (its first probe: one plain GD step from the same point), about 1 + 2 alpha q-bar
    where the probes agree. One scalar for every coordinate, where GXPO's q is per coordinate. The rules are
    gxpo_lib's own (toy.run_rule, no gate). Returns ``{"lr", "multiplier", "curves": {name: {"passes": [...],
    "loss": [...]}}}`` with losses at every pass count an update ends on (non-finite losses, from a diverging
    run, as None).
    """
    from . import toy

    check_positive("lr", lr)
    check_int("steps", steps, minimum=1)
    land = toy.DiagonalQuadratic(h=tuple(h))
    gxpo = toy.run_rule("gxpo", land, lr=lr, steps=steps, k=k, alpha=alpha)
    multiplier = float(np.mean([i["update_norm"] / i["probe_step_norm"] for i in gxpo.infos
                                if i["active"] and i["probe_step_norm"]]))
    runs = {
        "GD": toy.run_rule("grpo", land, lr=lr, steps=3 * steps),
        f"GD, displacement-matched (x{multiplier:.2f})": toy.run_rule("grpo", land, lr=lr * multiplier,
                                                                      steps=3 * steps),
        "GXPO": gxpo,
        f"GXPO, noise {noise:g}": toy.run_rule("gxpo", land, lr=lr, steps=steps, k=k, alpha=alpha,
                                               noise=noise, seed=seed),
        "GXPO, scalar q": toy.run_rule("gxpo", land, lr=lr, steps=steps, k=k, alpha=alpha, q_mode="scalar"),
    }
    curves = {}
    for name, run in runs.items():
        passes = np.cumsum([0] + [i["backward_passes"] for i in run.infos]).tolist()
        loss = [float(v) if math.isfinite(float(v)) else None for v in land(run.points)]
        curves[name] = {"passes": passes, "loss": loss}
    return {"lr": lr, "multiplier": multiplier, "curves": curves}


# ---------------------------------------------------------------------------------------------------
# The speed-up map's numbers (regime_plots draws them)
# ---------------------------------------------------------------------------------------------------
def _missing(value: Any) -> bool:
    """None or NaN (pandas stores a missing number as NaN)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def speedup_map(table, reference: str = "same_lr", x: str = "step", retention: str = "grad"):
    """The lr x K map of GXPO's speed-up to the reference GRPO's peak: (ks, lrs, values [K][lr], texts)."""
    check_choice("reference", reference, REFERENCES)
    check_choice("x", x, X_AXES)
    gxpo = table[table["method"].str.fullmatch(rf"GXPO K=\d+ {retention}")]
    ks = sorted({int(m.split()[1][2:]) for m in gxpo["method"]})
    lrs = sorted(set(table["lr"]))
    values, texts = [], []
    for k in ks:
        row_values, row_texts = [], []
        for lr in lrs:
            found = gxpo[(gxpo["method"] == f"GXPO K={k} {retention}") & (gxpo["lr"] == lr)]
            if found.empty:
                row_values.append(None)
                row_texts.append("not run")
                continue
            cell = found.iloc[0]
            share, value = cell[f"{reference}_reached_share"], cell[f"{reference}_speedup_{x}"]
            if _missing(share):
                row_values.append(None)
                row_texts.append("no GRPO reference")
            elif _missing(value):
                row_values.append(0.0)
                row_texts.append(f"not reached<br>({share:.0%} of draws)")
            else:
                lo, hi = cell[f"{reference}_speedup_{x}_lo"], cell[f"{reference}_speedup_{x}_hi"]
                row_values.append(float(value))
                row_texts.append(f"{value:.2f}x [{lo:.2f}, {hi:.2f}]<br>reached in {share:.0%}")
        values.append(row_values)
        texts.append(row_texts)
    return ks, lrs, values, texts


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``export RUNS OUT [--note TEXT]`` or ``matched RUNS --lr LR [--k K] [--retention R] [--out PATH]``."""
    parser = argparse.ArgumentParser(prog="python -m gxpo_lib.regime", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="finished run folders -> compact records + study.json")
    export.add_argument("runs")
    export.add_argument("out")
    export.add_argument("--note", default="", help="what was run, the machine's load, what was left out")
    matched = commands.add_parser("matched", help="measure GXPO's mean alpha*q at an lr; write a GRPO sweep")
    matched.add_argument("runs", help="a run root (exported on the fly) or a folder of compact records")
    matched.add_argument("--lr", type=float, required=True)
    matched.add_argument("--k", type=int, default=5)
    matched.add_argument("--retention", default="grad")
    matched.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    matched.add_argument("--out", default=None, help="default sweeps/regime-matched-lr<LR>.yaml")
    args = parser.parse_args(argv)
    if args.command == "export":
        written = export_study(args.runs, args.out, {"note": args.note} if args.note else None)
        print(f"[gxpo] exported {len(written)} runs to {args.out}")
        return 0
    root = Path(args.runs)
    records = ([compact_run(p) for p in sorted(root.iterdir()) if (p / runlog.FINAL_EVAL_FILE).exists()]
               if any(root.glob(f"*/{runlog.METRICS_FILE}")) else load_study(root))
    out = args.out or f"sweeps/regime-matched-lr{args.lr:g}.yaml"
    scale = write_matched_sweep(records, args.lr, out, args.k, args.retention, args.seeds)
    print(f"[gxpo] GXPO K={args.k} {args.retention} at lr {args.lr:g}: mean alpha*q = {scale}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
