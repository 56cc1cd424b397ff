"""The run folder's records, owned here: ``config.json``, ``metrics.jsonl``, ``final_eval.json``,
``run_summary.json``. Both trainers write through this module and every reader reads through it.

``metrics.jsonl`` holds one JSON object per line: ``"kind": "train"`` rows (one per step, the keys of
`TRAIN_ROW_KEYS` plus every `StepInfo` field), ``"eval"`` rows (pass@k during training) and
``"final_eval"`` rows. Every row carries the shared x-values (`x_values`). Rows are fsync'ed as they are
written, so a killed run loses no logged step; a torn last line from a crash is skipped with a warning.
Non-finite floats are written as null (JSON has no NaN).

Importable without torch.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .evaluation import CORRECT_THRESHOLD

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
FINAL_EVAL_FILE = "final_eval.json"
SUMMARY_FILE = "run_summary.json"

COUNTER_KEYS = ("backward_passes", "seconds_sampling", "seconds_scoring", "seconds_update", "seconds_eval",
                "cpu_seconds")
TRAIN_PHASES = ("seconds_sampling", "seconds_scoring", "seconds_update")
# Every train row has these keys (None where a trainer has no value), besides the StepInfo fields.
TRAIN_ROW_KEYS = ("kind", "step", "k", "alpha", "r_min", "r_max", "tau", "reward_mean", "reward_std",
                  "accuracy", "response_length", "entropy", "kl", "clip_frac", "reward_parse_fail",
                  "reward_timeout", "reward_error", "learning_rate")
# Salts of `step_seed`: which draw a seed is for.
SALT_SAMPLE, SALT_EVAL, SALT_PROMPTS, SALT_FINAL = 0, 1, 2, 3


# ---------------------------------------------------------------------------------------------------
# Seeds, counters, x-values: what both trainers must compute the same way
# ---------------------------------------------------------------------------------------------------
def step_seed(seed: int, step: int, salt: int = SALT_SAMPLE) -> int:
    """A distinct, reproducible seed for each (run seed, step, purpose)."""
    return int(np.random.SeedSequence([seed, step, salt]).generate_state(1)[0])


def eval_seed(seed: int, final: bool = False) -> int:
    """The seed of every evaluation of a run (the same draws at each step, so curves are paired)."""
    return step_seed(seed, 0, SALT_FINAL if final else SALT_EVAL)


def new_counters() -> dict[str, float]:
    """Cumulative backward passes and seconds per phase, zeroed."""
    return {key: 0 if key == "backward_passes" else 0.0 for key in COUNTER_KEYS}


@contextmanager
def timed(counters: dict[str, float], key: str) -> Iterator[None]:
    """Add the block's wall seconds to ``counters[key]``; training phases also add this process's CPU
    seconds to ``counters["cpu_seconds"]`` (what the method costs, whatever else loads the machine)."""
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        counters[key] += time.perf_counter() - wall
        if key in TRAIN_PHASES:
            counters["cpu_seconds"] = counters.get("cpu_seconds", 0.0) + time.process_time() - cpu


def x_values(counters: dict[str, float]) -> dict[str, float]:
    """The x-axes of every comparison: cumulative backward passes, training seconds (split by phase) and
    the training phases' CPU seconds of this process."""
    return {"cumulative_backward_passes": counters["backward_passes"],
            "seconds": sum(counters[key] for key in TRAIN_PHASES),
            **{key: counters[key] for key in (*TRAIN_PHASES, "seconds_eval")},
            "cpu_seconds": counters.get("cpu_seconds", 0.0)}


def rule_settings_row(rule) -> dict[str, Any]:
    """The rule settings in force this step (so live changes show up in the log)."""
    r_clamp = getattr(rule, "r_clamp", None) or (None, None)
    gate = getattr(rule, "gate", None)
    return {"k": getattr(rule, "k", None), "alpha": getattr(rule, "alpha", None), "r_min": r_clamp[0],
            "r_max": r_clamp[1], "tau": None if gate is None else gate.tau}


def reward_stats(rewards: Iterable[float]) -> dict[str, float | None]:
    """reward_mean, reward_std (sample std, as torch's) and accuracy of one step's finite rewards."""
    values = np.asarray([r for r in rewards if r is not None and math.isfinite(r)], dtype=np.float64)
    if values.size == 0:
        return {"reward_mean": None, "reward_std": None, "accuracy": None}
    return {"reward_mean": float(values.mean()), "reward_std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
            "accuracy": float((values >= CORRECT_THRESHOLD).mean())}


def train_row(step: int, info: dict[str, Any], rule, rewards: Iterable[float], counters: dict[str, float],
              **measured: Any) -> dict[str, Any]:
    """One "train" row: the step record, the settings in force, reward statistics, the x-values.

    `measured` holds the rest of `TRAIN_ROW_KEYS` (response_length, entropy, kl, clip_frac, ...); what a
    trainer does not measure is None, so both trainers write the same keys.
    """
    unknown = set(measured) - set(TRAIN_ROW_KEYS)
    if unknown:
        raise ValueError(f"train_row: {sorted(unknown)} are not train-row keys")
    row = dict.fromkeys(TRAIN_ROW_KEYS)
    row |= {"kind": "train", **info, "step": step, **rule_settings_row(rule), **reward_stats(rewards), **measured}
    return row | x_values(counters)


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------
def _finite_or_none(value: Any) -> Any:
    """NaN / inf floats (also inside lists and dicts) become None: JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, np.generic):
        return _finite_or_none(value.item())
    return value


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write to a temporary name, fsync, then rename: a kill mid-write never leaves a torn file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json(path: Path | str, value: Any) -> None:
    atomic_write_text(path, json.dumps(_finite_or_none(value), indent=2, allow_nan=False))


class MetricsLog:
    """Appends rows to a run's metrics.jsonl, each one flushed and fsync'ed at once.

    ``MetricsLog(workdir, resume_step=s)`` keeps the rows up to step `s` (the checkpoint resumed from) and
    drops the rest; ``resume_step=None`` starts a fresh log. `target` is a run folder or a ``.jsonl`` path.
    """

    def __init__(self, target: Path | str, resume_step: int | None = None):
        target = Path(target)
        self.path = target if target.suffix == ".jsonl" else target / METRICS_FILE
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            kept = [r for r in read_rows(self.path) if r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(_dumps(r) + "\n" for r in kept))
        self.handle = self.path.open("a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> dict[str, Any]:
        """Append one row (non-finite floats as null); returns the row as written."""
        row = _finite_or_none(row)
        self.handle.write(_dumps(row) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())
        return row

    def close(self) -> None:
        self.handle.close()


def _dumps(row: dict[str, Any]) -> str:
    return json.dumps(row, allow_nan=False)


def write_config(workdir: Path | str, config: dict[str, Any]) -> None:
    write_json(Path(workdir) / CONFIG_FILE, config)


def write_final_eval(workdir: Path | str, results: dict[str, Any]) -> None:
    write_json(Path(workdir) / FINAL_EVAL_FILE, results)


def write_summary(workdir: Path | str, summary: dict[str, Any]) -> None:
    write_json(Path(workdir) / SUMMARY_FILE, summary)


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------
def read_rows(path: Path | str, kind: str | None = None) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl (a file, or a run folder holding one), optionally of one `kind`.

    A torn last line (a kill mid-write) is skipped with a warning; a missing file gives [].
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        return []
    rows, lines = [], path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            where = "its torn last line" if number == len(lines) else f"line {number}, not valid JSON"
            warnings.warn(f"{path}: skipped {where}", RuntimeWarning, stacklevel=2)
    return rows if kind is None else [r for r in rows if r.get("kind") == kind]


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def read_config(workdir: Path | str) -> dict[str, Any]:
    """A run's saved settings with old names normalised ({} if none); folders from older versions load too."""
    from .config import normalise_names

    return normalise_names(_read_json(Path(workdir) / CONFIG_FILE) or {}, warn=False)


def read_final_eval(workdir: Path | str) -> dict[str, Any]:
    return _read_json(Path(workdir) / FINAL_EVAL_FILE) or {}


def read_summary(workdir: Path | str) -> dict[str, Any]:
    """A finished run's run_summary.json ({} when it has none)."""
    return _read_json(Path(workdir) / SUMMARY_FILE) or {}


def build_summary(workdir: Path | str, preset: str | None = None, backend: str = "gxpo") -> dict[str, Any]:
    """``run_summary.json``: what a sweep and notebook 04 read first, from the run folder's own files.

    Validation pass@1 (the cheap curve, ``eval`` rows) is ``val_pass@1_initial`` / ``_last`` / ``_peak``;
    ``final_pass@1`` is the final evaluation's sampled pass@1 on ``final_benchmark`` (the first of
    ``final_eval_sets``; None without one); ``final_eval`` holds every benchmark's pass@k and intervals.
    """
    done = summarize_run(workdir)
    config = read_config(workdir)
    evals = [r["pass@1"] for r in read_rows(workdir, "eval") if r.get("pass@1") is not None]
    final = done["final_eval"]
    benchmark = next(iter(config.get("final_eval_sets") or ()), None)
    return {
        "preset": preset, "backend": backend, "algorithm": config.get("algorithm"), "model": config.get("model"),
        "seed": config.get("seed"), "steps": done["steps_done"], "backward_passes": done["backward_passes"],
        "train_seconds": round(sum(done.get(key, 0.0) for key in TRAIN_PHASES), 2),
        "cpu_seconds": round(done.get("cpu_seconds", 0.0), 2), "shutoff_step": done["shutoff_step"],
        "val_pass@1_initial": evals[0] if evals else None, "val_pass@1_last": evals[-1] if evals else None,
        "val_pass@1_peak": max(evals, default=None), "final_benchmark": benchmark,
        "final_pass@1": final.get(benchmark, {}).get("pass@1") if benchmark else None,
        "final_eval": {name: {k: v for k, v in result.items() if k.startswith("pass@")}
                       for name, result in final.items()},
    }


def summarize_run(workdir: Path | str) -> dict[str, Any]:
    """What `train` returns (without the model), read back from a run folder's files.

    Works for folders written by the native trainer and the TRL backend alike (the same rows).
    """
    workdir = Path(workdir)
    rows = read_rows(workdir)
    if not rows:
        raise ValueError(f"{str(workdir)!r} holds no metrics.jsonl rows: nothing was trained there")
    train_rows = [r for r in rows if r.get("kind") == "train"]
    eval_rows = [r for r in rows if r.get("kind") == "eval"]
    closed = [r["step"] for r in train_rows if r.get("gate_open") is False]
    last = (eval_rows or rows)[-1]
    counters = {key: last.get(key, 0.0) for key in COUNTER_KEYS if key != "backward_passes"}
    return {"workdir": str(workdir), "steps_done": max((r["step"] for r in train_rows), default=0),
            "last_eval": eval_rows[-1] if eval_rows else None, "final_eval": read_final_eval(workdir),
            "shutoff_step": closed[0] + 1 if closed else None,  # the gate's convention: the first plain step
            "backward_passes": last.get("cumulative_backward_passes", 0), **counters}
