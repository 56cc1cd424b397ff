"""The run folder's records, owned here: ``config.json``, ``metrics.jsonl``, ``final_eval.json``,
``run_summary.json``. Both trainers write through this module and every reader reads through it.

``metrics.jsonl`` holds one JSON object per line: ``"kind": "train"`` rows (one per step, the keys of
`TRAIN_ROW_KEYS` plus every `StepInfo` field), ``"eval"`` rows (pass@k during training) and
``"final_eval"`` rows. Every row carries the shared x-values (`x_values`). Rows are fsync'ed as they are
written, so a killed run loses no logged step; a torn last line from a crash is skipped with a warning.
Non-finite floats are written as null (JSON has no NaN).

A damaged file never ends in a raw decoding error: a line of metrics.jsonl that is not a JSON object is
skipped with a warning naming the file; a damaged final_eval.json or run_summary.json is ignored with a
warning (resuming re-runs the final evaluation; `gxpo_lib.run` rewrites the summary); a damaged config.json
is a ValueError naming the file and what to do. Resuming (`MetricsLog(resume_step=...)`) keeps each logged
row once; the checkpoint side of a resume is `gxpo_lib.rl.trainer.restore_checkpoint`'s.

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

from gxpo_lib.rl.evaluation import CORRECT_THRESHOLD

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
FINAL_EVAL_FILE = "final_eval.json"
SUMMARY_FILE = "run_summary.json"

COUNTER_KEYS = ("cumulative_backward_passes", "seconds_sampling", "seconds_scoring", "seconds_update", "seconds_eval",
                "cpu_seconds")
TRAIN_PHASES = ("seconds_sampling", "seconds_scoring", "seconds_update")
# Every train row has these keys (None where a trainer has no value), besides the StepInfo fields.
TRAIN_ROW_KEYS = ("kind", "step", "k", "alpha", "r_clamp", "tau", "reward_mean", "reward_std",
                  "accuracy", "response_length", "entropy", "kl", "clip_frac", "reward_parse_fail",
                  "reward_timeout", "reward_error", "learning_rate")
# Salts of `step_seed`: which draw a seed is for.
SALT_SAMPLE, SALT_EVAL, SALT_PROMPTS, SALT_FINAL = 0, 1, 2, 3


# -- Seeds, counters, x-values: what both trainers must compute the same way ------------------------
def step_seed(seed: int, step: int, salt: int = SALT_SAMPLE) -> int:
    """A distinct, reproducible seed for each (run seed, step, purpose)."""
    return int(np.random.SeedSequence([seed, step, salt]).generate_state(1)[0])


def eval_seed(seed: int, final: bool = False) -> int:
    """The seed of every evaluation of a run (the same draws at each step, so curves are paired)."""
    return step_seed(seed, 0, SALT_FINAL if final else SALT_EVAL)


def new_counters() -> dict[str, float]:
    """Cumulative backward passes and seconds per phase, zeroed."""
    return {key: 0 if key == "cumulative_backward_passes" else 0.0 for key in COUNTER_KEYS}


def saved_counters(counters: dict[str, float]) -> dict[str, float]:
    """A checkpoint's counters under today's names (a checkpoint from before this name held the running total
    of backward passes as ``backward_passes``)."""
    return {("cumulative_backward_passes" if key == "backward_passes" else key): value
            for key, value in counters.items()}


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
    return {"cumulative_backward_passes": counters["cumulative_backward_passes"],
            "seconds": sum(counters[key] for key in TRAIN_PHASES),
            **{key: counters[key] for key in (*TRAIN_PHASES, "seconds_eval")},
            "cpu_seconds": counters.get("cpu_seconds", 0.0)}


def rule_settings_row(rule) -> dict[str, Any]:
    """The rule settings in force this step (so live changes show up in the log)."""
    r_clamp = getattr(rule, "r_clamp", None)
    gate = getattr(rule, "gate", None)
    return {"k": getattr(rule, "k", None), "alpha": getattr(rule, "alpha", None),
            "r_clamp": None if r_clamp is None else list(r_clamp), "tau": None if gate is None else gate.tau}


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


# -- Writing ----------------------------------------------------------------------------------------
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

    ``MetricsLog(workdir, resume_step=s)`` cuts the log back to the checkpoint resumed from, so that no
    logged step is lost or repeated once the steps after `s` are re-run (same seeds, same rows):

    - rows of steps after `s` are dropped, and so are unreadable lines (torn, garbage) and rows without a
      numeric step (each with a warning naming the file);
    - a row logged twice (same kind, step and benchmark) is kept once, the first, with a warning;
    - ``final_eval`` rows and ``final_eval.json`` (next to a ``metrics.jsonl``) are made to agree: a
      benchmark is kept only when both hold it (a damaged final_eval.json counts as empty, with a warning),
      so a final evaluation that either lost is run again and logged once.

    ``resume_step=None`` starts a fresh log (and drops a stale final_eval.json beside it). `target` is a run
    folder or a ``.jsonl`` path.
    """

    def __init__(self, target: Path | str, resume_step: int | None = None):
        target = Path(target)
        self.path = target if target.suffix == ".jsonl" else target / METRICS_FILE
        final_path = self.path.with_name(FINAL_EVAL_FILE) if self.path.name == METRICS_FILE else None
        if resume_step is None:
            self.path.unlink(missing_ok=True)
            if final_path is not None:
                final_path.unlink(missing_ok=True)
        elif self.path.exists():
            kept = _cut_rows(self.path, read_rows(self.path, stacklevel=3), resume_step)
            if final_path is not None:
                kept = _agree_on_final_eval(final_path, kept)
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


def _is_step(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _cut_rows(path: Path, rows: list[dict[str, Any]], resume_step: int) -> list[dict[str, Any]]:
    """The rows up to `resume_step`, each (kind, step, benchmark) once; what is dropped besides the steps
    after the checkpoint is warned about, naming `path`."""
    kept, seen, stepless, repeated = [], set(), 0, 0
    for row in rows:
        step = row.get("step", 0)
        if not _is_step(step):
            stepless += 1
            continue
        if step > resume_step:
            continue
        key = (row.get("kind"), step, str(row.get("benchmark")))
        if key in seen:
            repeated += 1
            continue
        seen.add(key)
        kept.append(row)
    if stepless:
        warnings.warn(f"{path}: dropped {stepless} row(s) without a numeric step", RuntimeWarning, stacklevel=4)
    if repeated:
        warnings.warn(f"{path}: dropped {repeated} repeated row(s) (the same kind and step logged twice)",
                      RuntimeWarning, stacklevel=4)
    return kept


def _agree_on_final_eval(final_path: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the final evaluations that both the rows and final_eval.json hold (rewriting the file to them)."""
    done = _read_ignoring_damage(final_path, _FINAL_EVAL_FIX, stacklevel=5)
    logged = {r.get("benchmark") for r in rows if r.get("kind") == "final_eval"}
    both = {name: result for name, result in done.items() if name in logged and isinstance(result, dict)}
    rows = [r for r in rows if r.get("kind") != "final_eval" or r.get("benchmark") in both]
    if not both:
        final_path.unlink(missing_ok=True)
    elif both != done:
        write_json(final_path, both)
    return rows


def log_gap(rows: list[dict[str, Any]], step: int, seconds_eval: float | None = None) -> str | None:
    """What a log lacks of the steps up to a checkpoint's `step` (None when it covers them): the train row
    of a step 1..`step`, or, given the checkpoint's cumulative ``seconds_eval``, the evaluation row that
    ended step `step` (the last row up to `step` carries the checkpoint's counters)."""
    logged = {r.get("step") for r in rows if r.get("kind") == "train"}
    missing = next((s for s in range(1, step + 1) if s not in logged), None)
    if missing is not None:
        return f"the train row of step {missing}"
    reached = [r.get("seconds_eval") for r in rows if r.get("kind") in ("train", "eval") and _is_step(r.get("step"))
               and r["step"] <= step and _is_step(r.get("seconds_eval"))]
    if seconds_eval is not None and reached and max(reached) < seconds_eval:
        return f"the evaluation row of step {step}"
    return None


def write_config(workdir: Path | str, config: dict[str, Any]) -> None:
    write_json(Path(workdir) / CONFIG_FILE, config)


def write_final_eval(workdir: Path | str, results: dict[str, Any]) -> None:
    write_json(Path(workdir) / FINAL_EVAL_FILE, results)


def write_summary(workdir: Path | str, summary: dict[str, Any]) -> None:
    write_json(Path(workdir) / SUMMARY_FILE, summary)


# -- Reading ----------------------------------------------------------------------------------------
def read_rows(path: Path | str, kind: str | None = None, *, stacklevel: int = 2) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl (a file, or a run folder holding one), optionally of one `kind`.

    A torn last line (a kill mid-write) and any line that is not a JSON object (garbage bytes, a damaged
    disk block) are skipped with a warning naming the file and line; a missing file gives [].
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        return []
    rows, lines = [], path.read_bytes().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None
        if isinstance(row, dict):
            rows.append(row)
            continue
        where = "its torn last line" if number == len(lines) else f"line {number}, not a JSON object"
        warnings.warn(f"{path}: skipped {where}", RuntimeWarning, stacklevel=stacklevel)
    return rows if kind is None else [r for r in rows if r.get("kind") == kind]


def load_json_object(path: Path | str) -> tuple[dict[str, Any] | None, str | None]:
    """``(object, None)`` for a readable JSON-object file, ``(None, None)`` when it is missing and
    ``(None, what is wrong)`` when it is damaged (empty, truncated, garbage, not an object)."""
    path = Path(path)
    if not path.exists():
        return None, None
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None, "not UTF-8 text (garbage bytes)"
    except OSError as error:
        return None, f"unreadable ({error.strerror or error})"
    if not text.strip():
        return None, "empty"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return None, f"not valid JSON ({error.msg} at line {error.lineno}: truncated or damaged)"
    if not isinstance(value, dict):
        return None, f"holds a JSON {type(value).__name__}, not an object"
    return value, None


def read_config(workdir: Path | str) -> dict[str, Any]:
    """A run's saved settings as a plain dict, as written ({} if none; a folder from older code keeps its
    names: `replay.export_runs` writes today's). A damaged config.json is a ValueError naming it."""
    path = Path(workdir) / CONFIG_FILE
    value, problem = load_json_object(path)
    if problem is not None:
        raise ValueError(f"{path}: {problem}; restore it from a copy, or resume the run with its settings "
                         "(gxpo_lib.run or train), which checks them against its checkpoints and rewrites it")
    return value or {}


_FINAL_EVAL_FIX = "resuming the run re-runs the final evaluation"


def _read_ignoring_damage(path: Path, fix: str, stacklevel: int) -> dict[str, Any]:
    """A JSON-object file's content ({} when missing; a damaged one is ignored with a warning naming it)."""
    value, problem = load_json_object(path)
    if problem is not None:
        warnings.warn(f"{path}: {problem}; ignored ({fix})", RuntimeWarning, stacklevel=stacklevel)
    return value or {}


def read_final_eval(workdir: Path | str) -> dict[str, Any]:
    """final_eval.json ({} when missing; a damaged one is ignored with a warning naming it)."""
    return _read_ignoring_damage(Path(workdir) / FINAL_EVAL_FILE, _FINAL_EVAL_FIX, stacklevel=3)


def read_summary(workdir: Path | str) -> dict[str, Any]:
    """A finished run's run_summary.json ({} when it has none; a damaged one is ignored with a warning)."""
    return _read_ignoring_damage(Path(workdir) / SUMMARY_FILE, "gxpo_lib.run on the folder rewrites it", stacklevel=3)


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
        "seed": config.get("seed"), "steps": done["steps_done"],
        "cumulative_backward_passes": done["cumulative_backward_passes"],
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
    counters = {key: last.get(key, 0 if key == "cumulative_backward_passes" else 0.0) for key in COUNTER_KEYS}
    return {"workdir": str(workdir), "steps_done": max((r["step"] for r in train_rows), default=0),
            "last_eval": eval_rows[-1] if eval_rows else None, "final_eval": read_final_eval(workdir),
            "shutoff_step": closed[0] + 1 if closed else None,  # the gate's convention: the first plain step
            **counters}


# Settings older code wrote: renamed ones (old -> today's), removed ones with the value that meant "as today"
# (dropped at that value; at another value kept, so the config says what the run did and TrainConfig refuses
# it by name), and bookkeeping that changed no result (always dropped).
RENAMED = {"gate_tau": "tau", "gate_warmup": "warmup"}
OLD_DEFAULTS = {"r_clamp": [-2.0, 3.0], "optimizer_state": "carry", "retention": "grad", "skip_corrective": False,
                "vanishing_probe": "continue", "active_set": "absolute", "scale_form": "horner", "q_clamp": True,
                "gate_statistic": "pre_clip", "gate_omega": 0.1, "gate_patience": 1, "gate_mode": "ema",
                "gate_window": 30, "gate_window_includes_current": False, "gate_signal": "grad_norm",
                "gate_two_sided": False, "gate_freeze_baseline": False, "gate_permanent": True,
                "gate_reopen_after": 10, "train_path": None, "eval_path": None, "adv_scale": "group", "top_p": 1.0,
                "clip_eps_high": None, "sfpo_sweeps": "official", "gate_init": "unit"}
OLD_BOOKKEEPING = ("keep_checkpoints", "reward_timeout", "reward_workers", "generation_batch_size", "progress")
OLD_GATES = {"default": "grad_norm", "official": "auto"}  # "official" was SFPO's gate: today "auto" for SFPO


def current_settings(config: dict[str, Any]) -> dict[str, Any]:
    """A run's config.json under today's setting names (`RENAMED`, `OLD_DEFAULTS`, `OLD_GATES`); a config
    written by today's code comes back unchanged."""
    config = dict(config)
    if config.pop("sfpo_official_gate", True) is False and config.get("gate", "auto") in ("auto", True):
        config["gate"] = "default"                  # the oldest spelling of "SFPO with our gate"
    if "omega" in config:                           # the oldest names of tau and omega
        config["gate_omega"] = config.pop("omega")
    if isinstance(config.get("gate"), bool):
        config["gate"] = "auto" if config["gate"] else "none"
    out = {}
    for name, value in config.items():
        as_today = (name in OLD_BOOKKEEPING or (name in OLD_DEFAULTS and value == OLD_DEFAULTS[name])
                    or (name == "lora_alpha" and value == 2 * config.get("lora_rank", 8)))
        if not as_today:
            out[RENAMED.get(name, name)] = OLD_GATES.get(value, value) if name == "gate" else value
    return out
