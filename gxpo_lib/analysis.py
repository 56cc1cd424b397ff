"""Comparing finished runs: load run folders, seed bands, the paper's speed-up table, final pass@k, figures.

    runs = load_runs("auto")                       # every folder under "." (depth <= 3) with a metrics.jsonl
    groups = group_runs(runs)                      # one group per setting, the seeds inside it
    band(groups[0].runs, "pass@1", x="backward_passes")
    speedup_table(runs, reference="grpo")          # GRPO's peak, how much sooner each method reaches it
    speedup_table(runs, resamples=2000)            # ... with intervals over seeds (seed bootstrap)
    final_table(runs)                              # pass@1 and pass@k per benchmark, with intervals
    activity_table(runs)                           # how long GXPO extrapolated, passes and seconds spent
    plot_curves(runs); plot_diagnostics(runs)      # plotly figures

**Run folders.** A folder written by `gxpo_lib.trainer.train` (or notebook 03) holds ``config.json``,
``metrics.jsonl`` (``"kind"`` = ``train`` / ``eval`` / ``final_eval`` rows), ``final_eval.json`` and, from
notebook 03, ``run_summary.json``. `load_run` turns it into a `Run` whose rows use one schema:

- train rows keep the trainer's names; ``backward_passes`` is the step's own count and
  ``cumulative_backward_passes`` the running total; ``jump_over_param_norm`` (jump_norm / param_norm) is
  added where both exist;
- eval rows carry ``step``, ``backward_passes`` (**cumulative**; the trainer writes it as
  ``cumulative_backward_passes``), ``seconds`` (cumulative *training* seconds: sampling + scoring +
  update, evaluations excluded) and ``pass@1`` / ``pass@k`` (with ``pass@k_ci`` where the file has it).

**The authors' logs.** The official code (a verl fork, ``ray_trainer.fit``) appends one flat JSON object
per outer step to ``metrics.jsonl``: ``{"step": N, "actor/...": ..., "val/...": ...}`` (validation
metrics sit in the row of the step they follow). Upstream verl's ``FileLogger`` writes
``{"step": N, "data": {...}}`` instead (sometimes with ``elapsed_seconds``); both are read. A row with
any non-validation metric becomes a train row; a row with validation metrics also becomes an eval row.

===================================  =========================================================================
our name                             the authors' key (first one present wins)
===================================  =========================================================================
step                                 ``step``
backward_passes (this step)          ``actor/policy_grad_evals_step``, ``eff/policy_grad_evals_step``
cumulative_backward_passes           ``eff/cum_policy_grad_evals``, ``actor/cumulative_policy_grad_evals``,
                                     ``actor/cumulative_bp``
seconds                              ``time/cum_train_active_s`` (excludes validation and checkpoints), else
                                     ``train/elapsed_hours`` x 3600 (includes them)
reward_mean / accuracy               ``train/reward_mean``, ``critic/score/mean`` / ``train/accuracy``
entropy / kl / clip_frac             ``actor/entropy_loss``, ``train/entropy_mean`` / ``actor/kl_loss`` /
                                     ``actor/pg_clipfrac``
grad_norm                            ``actor/grad_norm`` (= the kept step's gradient, gn_slow)
gate_z                               ``actor/gxpo_trigger_z``, ``actor/sfpo_trigger_z``
active                               ``actor/gxpo_prediction_active``, ``actor/gxpo_enabled``,
                                     ``actor/sfpo_fast_phase_active`` (> 0)
gate_open                            not ``actor/gxpo_fallback_triggered`` / ``actor/sfpo_fallback_triggered``
                                     (the authors' "fallback" is the gate's shut-off, not our non-finite
                                     fallback)
g0_norm, g1_norm, gslow_norm,        ``actor/gxpo_<name>``, else the ``gxpo/*`` alias (``gxpo/g0_norm``,
r_mean, r_std, scale_mean,           ``gxpo/fresh_grad_norm``, ``gxpo/retention_mean``, ``gxpo/retention_std``,
scale_max, inactive_frac,            ``gxpo/prediction_scale_mean``, ``gxpo/prediction_scale_max``,
ratio_clip_frac, disp2_norm,         ``gxpo/unsafe_coordinate_fraction``, ``gxpo/two_step_displacement_norm``,
dispK_norm, cos_g0_g1,               ``gxpo/predicted_displacement_norm``, ``gxpo/g0_g1_cosine``,
cos_g0_gslow, effective_multiplier   ``gxpo/g1_fresh_cosine``)
jump_norm                            ``reposition/jump_norm``, ``actor/sfpo_jump_norm``,
                                     ``gxpo/reposition_displacement_norm``
jump_over_param_norm                 ``reposition/jump_relative_to_param_norm``
k / alpha / tau                      ``gxpo/k``, ``actor/sfpo_k`` / ``gxpo/alpha``, ``actor/sfpo_alpha`` /
                                     ``gxpo/reliability_threshold``
shutoff step (run level)             ``actor/gxpo_shutoff_step``, ``actor/gxpo_fallback_step``,
                                     ``actor/sfpo_fallback_step``
eval pass@1                          ``val/pass_at_1/<source>``, else ``val/test_score/<source>`` (the mean
                                     of thresholded rewards), else ``val-core/<source>/acc/mean@N``
eval pass@N                          ``val/pass_at_N/<source>``, ``val-core/<source>/acc/best@N/mean``
===================================  =========================================================================

Per-seed copies (``.../seed3``) and across-seed spreads (``.../std``) of validation keys are skipped. With
several validation sources the eval rows follow one benchmark: MATH-500 when present (the authors'
choice), else the first source by name; every source's values are kept as ``pass@N/<source>``. The
authors' tables prefer pass@16 over pass@8/4/1 for the speed-up (``scripts/gxpo_report/common.py``):
pass ``metric="pass@16"`` to `speedup_table` to follow them; our default is sampled pass@1, the
paper's headline metric. A folder without ``config.json`` gets its settings from ``run_manifest.json``
when present, else from the log itself (GXPO if ``actor/gxpo_*`` keys appear, SFPO if ``actor/sfpo_*``
keys do, GRPO otherwise).
"""

from __future__ import annotations

import glob as globlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .evaluation import bootstrap_ci, speedup_to_peak

DEFAULT_BY = ("algorithm", "k", "alpha", "tau")
X_CHOICES = ("step", "seconds", "hours", "backward_passes")
SPEEDUP_X = ("step", "seconds", "backward_passes")

# Settings that only steer one rule: they do not tell GRPO runs apart.
RULE_SETTINGS = frozenset({
    "k", "alpha", "r_clamp", "optimizer_state", "retention", "skip_corrective", "gate", "tau", "omega",
    "gate_warmup", "gate_patience", "gate_mode", "gate_window", "gate_window_includes_current",
    "gate_signal", "gate_permanent", "sfpo_official_gate",
})
# Bookkeeping settings: they change nothing about what a run learns.
BOOKKEEPING = frozenset({"seed", "progress", "reward_workers", "reward_timeout", "checkpoint_every",
                         "keep_checkpoints", "data_dir"})
# Settings of the final evaluation only: the training curve does not depend on them.
FINAL_EVAL_SETTINGS = frozenset({"final_eval_sets", "final_eval_samples", "final_eval_problems"})

_DIAGNOSTICS = ("g0_norm", "g1_norm", "gslow_norm", "r_mean", "r_std", "scale_mean", "scale_max",
                "inactive_frac", "ratio_clip_frac", "disp2_norm", "dispK_norm", "cos_g0_g1", "cos_g0_gslow",
                "effective_multiplier")
_GXPO_ALIASES = {
    "g0_norm": "gxpo/g0_norm", "g1_norm": "gxpo/g1_norm", "gslow_norm": "gxpo/fresh_grad_norm",
    "r_mean": "gxpo/retention_mean", "r_std": "gxpo/retention_std", "scale_mean": "gxpo/prediction_scale_mean",
    "scale_max": "gxpo/prediction_scale_max", "ratio_clip_frac": "gxpo/unsafe_coordinate_fraction",
    "disp2_norm": "gxpo/two_step_displacement_norm", "dispK_norm": "gxpo/predicted_displacement_norm",
    "cos_g0_g1": "gxpo/g0_g1_cosine", "cos_g0_gslow": "gxpo/g1_fresh_cosine",
}
# Our train-row name -> the authors' keys, first present wins (the table in the module docstring).
AUTHORS_TRAIN_KEYS: dict[str, tuple[str, ...]] = {
    "backward_passes": ("actor/policy_grad_evals_step", "eff/policy_grad_evals_step"),
    "cumulative_backward_passes": ("eff/cum_policy_grad_evals", "actor/cumulative_policy_grad_evals",
                                   "actor/cumulative_bp"),
    "seconds": ("time/cum_train_active_s",),
    "reward_mean": ("train/reward_mean", "critic/score/mean"),
    "accuracy": ("train/accuracy",),
    "entropy": ("actor/entropy_loss", "train/entropy_mean"),
    "kl": ("actor/kl_loss",),
    "clip_frac": ("actor/pg_clipfrac",),
    "response_length": ("response_length/mean", "train/response_length_mean"),
    "grad_norm": ("actor/grad_norm",),
    "gate_z": ("actor/gxpo_trigger_z", "actor/sfpo_trigger_z"),
    "jump_norm": ("reposition/jump_norm", "actor/sfpo_jump_norm", "gxpo/reposition_displacement_norm"),
    "jump_over_param_norm": ("reposition/jump_relative_to_param_norm",),
    "k": ("gxpo/k", "actor/sfpo_k"),
    "alpha": ("gxpo/alpha", "actor/sfpo_alpha"),
    "tau": ("gxpo/reliability_threshold",),
    **{name: (f"actor/gxpo_{name}",) + ((_GXPO_ALIASES[name],) if name in _GXPO_ALIASES else ())
       for name in _DIAGNOSTICS},
}
AUTHORS_ACTIVE_KEYS = ("actor/gxpo_prediction_active", "actor/gxpo_enabled", "actor/sfpo_fast_phase_active")
AUTHORS_SHUTOFF_FLAG_KEYS = ("actor/gxpo_fallback_triggered", "actor/sfpo_fallback_triggered")
AUTHORS_SHUTOFF_STEP_KEYS = ("actor/gxpo_shutoff_step", "actor/gxpo_fallback_step", "actor/sfpo_fallback_step")

_VAL_PASS = re.compile(r"^val/pass_at_(\d+)/(.+?)(/seed\d+|/std)?$")
_VAL_SCORE = re.compile(r"^val/test_score/(.+?)(/seed\d+|/std)?$")
_VAL_CORE_MEAN = re.compile(r"^val-core/(.+)/acc/mean@(\d+)$")
_VAL_CORE_BEST = re.compile(r"^val-core/(.+)/acc/best@(\d+)/mean$")
_PASS_KEY = re.compile(r"^pass@(\d+)$")
_SKIPPED_FOLDERS = ("checkpoints", "__pycache__")


# ---------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One training run read from its folder, in our schema (see the module docstring)."""

    name: str
    folder: Path
    config: dict[str, Any]
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    final_eval: dict[str, dict[str, Any]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    source: str = "gxpo_lib"            # "gxpo_lib" or "authors"

    @property
    def algorithm(self) -> str:
        return str(self.config.get("algorithm", "unknown"))

    @property
    def seed(self):
        return self.config.get("seed")

    @property
    def shutoff_step(self) -> int | None:
        """The first step without extrapolation: the run summary's, else read off the train rows."""
        if self.summary.get("shutoff_step") is not None:
            return int(self.summary["shutoff_step"])
        closed = [r["step"] for r in self.train if r.get("gate_open") is False]
        return int(closed[0]) + 1 if closed else None

    def __repr__(self) -> str:
        return (f"Run({self.name!r}, {self.algorithm}, seed={self.seed}, {len(self.train)} train rows, "
                f"{len(self.eval)} evals, final: {sorted(self.final_eval)})")


def load_run(folder: str | Path, benchmark: str | None = None, config: Mapping[str, Any] | None = None) -> Run:
    """Read one run folder (ours or the authors'); ValueError naming the folder if it holds no metrics.jsonl.

    Args:
        folder: the run folder.
        benchmark: for the authors' logs with several validation sources, which one the eval rows follow
            (a substring of the source name); default MATH-500 if present, else the first by name.
        config: settings to add or override (e.g. ``{"seed": 1}`` for an authors' run).
    """
    folder = Path(folder)
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"run folder {str(folder)!r} is invalid: it holds no metrics.jsonl")
    rows = _read_jsonl(metrics)
    summary = _read_json(folder / "run_summary.json") or {}
    if any("kind" in r for r in rows):
        run = _load_own_run(folder, rows, summary)
    else:
        run = _load_authors_run(folder, rows, summary, benchmark)
    run.config.update(config or {})
    return run


def _load_own_run(folder: Path, rows: list[dict], summary: dict) -> Run:
    """A folder written by gxpo_lib.trainer: rows split by kind, eval x-values made cumulative."""
    config = _read_json(folder / "config.json") or {}
    train = [_with_jump_ratio(dict(r)) for r in rows if r.get("kind") == "train"]
    evals = []
    for row in (r for r in rows if r.get("kind") == "eval"):
        row = dict(row)
        if "cumulative_backward_passes" in row:   # eval rows count passes cumulatively
            row["backward_passes"] = row["cumulative_backward_passes"]
        evals.append(row)
    final = _read_json(folder / "final_eval.json")
    if final is None:  # an older folder: rebuild from the final_eval rows
        final = {r["benchmark"]: {k: v for k, v in r.items() if k not in ("kind", "benchmark", "step")}
                 for r in rows if r.get("kind") == "final_eval" and "benchmark" in r}
    return Run(folder.name, folder, config, _by_step(train), _by_step(evals), final, summary, "gxpo_lib")


def _with_jump_ratio(row: dict) -> dict:
    """Add jump_norm / param_norm (the jump relative to the weights) where both are logged."""
    jump, norm = row.get("jump_norm"), row.get("param_norm")
    if "jump_over_param_norm" not in row and _is_number(jump) and _is_number(norm) and norm > 0:
        row["jump_over_param_norm"] = jump / norm
    return row


def _load_authors_run(folder: Path, rows: list[dict], summary: dict, benchmark: str | None) -> Run:
    """A folder written by the official verl fork: flat (or FileLogger "data") rows mapped to our names."""
    flat = [_flatten_verl_row(r) for r in rows]
    flat = [r for r in flat if r is not None]
    sources = sorted({src for r in flat for src in _val_values(r)})
    chosen = _choose_benchmark(sources, benchmark, folder)
    train, evals, last = [], [], {"cumulative_backward_passes": 0, "seconds": 0.0}
    for row in sorted(flat, key=lambda r: r["step"]):
        mapped = _map_authors_train(row)
        if mapped is not None:
            train.append(mapped)
            last.update({k: mapped[k] for k in last if mapped.get(k) is not None})  # x of later evals
        values = _val_values(row)
        if chosen in values:
            evals.append(_authors_eval_row(row, values, chosen, last))
    config = _authors_config(folder, flat)
    summary = dict(summary)
    shutoff = next((r[k] for r in flat for k in AUTHORS_SHUTOFF_STEP_KEYS if _is_number(r.get(k))), None)
    if summary.get("shutoff_step") is None and shutoff is not None:
        summary["shutoff_step"] = int(shutoff)
    if chosen is not None:
        summary.setdefault("benchmark", chosen)
    return Run(folder.name, folder, config, train, evals, {}, summary, "authors")


def _flatten_verl_row(row: dict) -> dict | None:
    """``{"step", "data": {...}}`` (verl FileLogger) or a flat row -> one flat dict; None without a step."""
    if not isinstance(row, dict) or not _is_number(row.get("step")):
        return None
    if isinstance(row.get("data"), dict):
        return {**row["data"], "step": int(row["step"])}
    return {**row, "step": int(row["step"])}


def _val_values(row: dict) -> dict[str, dict[int, float]]:
    """Validation results in a flat authors' row: ``{source: {k: pass@k}}`` (per-seed and std keys skipped).

    pass@1 comes from ``val/pass_at_1``, else ``val/test_score`` (the mean thresholded reward), else
    ``val-core/.../acc/mean@N``; pass@N from ``val/pass_at_N``, else ``val-core/.../acc/best@N/mean``.
    """
    passes: dict[str, dict[int, float]] = {}
    fallbacks: list[dict[str, dict[int, float]]] = [{}, {}, {}]   # test_score, core mean@N, core best@N
    for key, value in row.items():
        if not _is_number(value):
            continue
        if (match := _VAL_PASS.match(key)) and match.group(3) is None:
            passes.setdefault(match.group(2), {})[int(match.group(1))] = float(value)
        elif (match := _VAL_SCORE.match(key)) and match.group(2) is None and match.group(1) != "average":
            fallbacks[0].setdefault(match.group(1), {})[1] = float(value)
        elif match := _VAL_CORE_MEAN.match(key):
            fallbacks[1].setdefault(match.group(1), {})[1] = float(value)
        elif match := _VAL_CORE_BEST.match(key):
            fallbacks[2].setdefault(match.group(1), {})[int(match.group(2))] = float(value)
    for fallback in fallbacks:  # in order of preference: a value already found is kept
        for source, ks in fallback.items():
            for k, value in ks.items():
                passes.setdefault(source, {}).setdefault(k, value)
    return passes


def _choose_benchmark(sources: list[str], wanted: str | None, folder: Path) -> str | None:
    """The validation source the eval rows follow."""
    if not sources:
        return None
    if wanted is not None:
        hits = [s for s in sources if wanted.lower() in s.lower()]
        if not hits:
            raise ValueError(f"benchmark={wanted!r} is invalid for {str(folder)!r}: allowed one of {sources}")
        return hits[0]
    math500 = [s for s in sources if "math500" in re.sub(r"[^a-z0-9]", "", s.lower())]
    return (math500 or sources)[0]


def _map_authors_train(row: dict) -> dict | None:
    """One authors' row -> our train row; None for a validation-only row (e.g. before training)."""
    if not any(not key.startswith(("val/", "val-core/", "val-aux/", "eval_greedy/")) and key != "step"
               for key in row):
        return None
    out: dict[str, Any] = {"kind": "train", "step": row["step"]}
    for name, keys in AUTHORS_TRAIN_KEYS.items():
        value = next((row[k] for k in keys if _is_number(row.get(k))), None)
        if value is not None:
            out[name] = float(value)
    if out.get("seconds") is None and _is_number(row.get("train/elapsed_hours")):
        out["seconds"] = float(row["train/elapsed_hours"]) * 3600.0
    active = next((row[k] for k in AUTHORS_ACTIVE_KEYS if _is_number(row.get(k))), None)
    if active is not None:
        out["active"] = bool(active > 0)
    shut = next((row[k] for k in AUTHORS_SHUTOFF_FLAG_KEYS if _is_number(row.get(k))), None)
    if shut is not None:
        out["gate_open"] = not shut > 0
    return out


def _authors_eval_row(row: dict, values: dict, chosen: str, last: dict) -> dict:
    """Our eval row from an authors' row: the chosen source's pass@k plus every source's, tagged."""
    out: dict[str, Any] = {"kind": "eval", "step": row["step"], "benchmark": chosen,
                           "backward_passes": last["cumulative_backward_passes"], "seconds": last["seconds"]}
    for k, value in sorted(values[chosen].items()):
        out[f"pass@{k}"] = value
    for source, ks in values.items():
        for k, value in ks.items():
            out[f"pass@{k}/{source}"] = value
    return out


def _authors_config(folder: Path, rows: list[dict]) -> dict[str, Any]:
    """Settings for an authors' run: config.json, else run_manifest.json, else read off the log."""
    config = _read_json(folder / "config.json")
    if config:
        return dict(config)
    config = {}
    manifest = _read_json(folder / "run_manifest.json") or {}
    actor = (((manifest.get("hyperparameters") or {}).get("actor_rollout_ref") or {}).get("actor") or {})
    method = str(manifest.get("method") or "").lower()
    if method in ("grpo", "gxpo", "sfpo"):
        config["algorithm"] = method
    elif actor.get("use_gxpo"):
        config["algorithm"] = "gxpo"
    elif actor.get("use_sfpo"):
        config["algorithm"] = "sfpo"
    for ours, theirs in (("k", ("gxpo_k", "sfpo_inner_steps")), ("alpha", ("gxpo_alpha", "sfpo_step_size")),
                         ("tau", ("gxpo_tau",))):
        value = next((actor[t] for t in theirs if _is_number(actor.get(t))), None)
        if value is not None:
            config[ours] = value
    keys = {key for r in rows for key in r}
    if "algorithm" not in config:
        gx = any(k.startswith(("actor/gxpo_", "gxpo/")) for k in keys)
        sf = any(k.startswith(("actor/sfpo_", "sfpo/")) for k in keys)
        config["algorithm"] = "gxpo" if gx else "sfpo" if sf else "grpo"
    for name in ("k", "alpha", "tau"):
        if name not in config:
            mapped = (_map_authors_train(r) or {} for r in rows)
            value = next((m[name] for m in mapped if _is_number(m.get(name))), None)
            if value is not None:
                config[name] = int(value) if name == "k" else value
    config.setdefault("seed", None)
    return config


def find_run_folders(root: str | Path = ".", max_depth: int = 3) -> list[Path]:
    """Folders at most `max_depth` levels under `root` (root itself is depth 0) that hold a metrics.jsonl.

    Checkpoint folders and hidden folders are not searched.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"root={str(root)!r} is invalid: allowed an existing folder")
    found, frontier = [], [root]
    for depth in range(max_depth + 1):
        next_frontier = []
        for folder in frontier:
            if (folder / "metrics.jsonl").is_file():
                found.append(folder)
            if depth < max_depth:
                next_frontier += sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                                        and p.name not in _SKIPPED_FOLDERS)
        frontier = next_frontier
    return sorted(found)


def resolve_run_dirs(sources: str | Path | Iterable[str | Path] = "auto", max_depth: int = 3) -> list[Path]:
    """Folders to load from: ``"auto"`` (every run under the working directory), a glob, a run folder, a
    parent of run folders, a JSON list written as a string (papermill ``-p``), or a list of those.

    ``"auto"`` finding nothing gives an empty list; anything named explicitly that matches no run folder
    raises ValueError naming it.
    """
    if isinstance(sources, str) and sources.strip().startswith("["):
        sources = json.loads(sources)
    if isinstance(sources, (str, Path)):
        sources = [sources]
    folders: list[Path] = []
    for source in sources:
        text = str(source)
        if text == "auto":
            folders += find_run_folders(".", max_depth)
            continue
        if globlib.has_magic(text):
            matches = [Path(m) for m in sorted(globlib.glob(text, recursive=True))]
            hits = [m.parent if m.name == "metrics.jsonl" else m for m in matches]
            hits = [h for h in hits if (h / "metrics.jsonl").is_file()]
            if not hits:
                raise ValueError(f"run_dirs entry {text!r} is invalid: the glob matches no folder with "
                                 "a metrics.jsonl")
            folders += hits
            continue
        path = Path(text)
        if path.name == "metrics.jsonl" and path.is_file():
            path = path.parent
        if path.is_dir() and not (path / "metrics.jsonl").is_file():
            below = find_run_folders(path, max_depth)
            if not below:
                raise ValueError(f"run folder {text!r} is invalid: it holds no metrics.jsonl, nor do its "
                                 f"sub-folders (depth <= {max_depth})")
            folders += below
            continue
        folders.append(path)  # load_run reports a missing folder or metrics.jsonl
    unique = list(dict.fromkeys(p.resolve() for p in folders))
    return unique


def load_runs(sources: str | Path | Iterable[str | Path] = "auto", max_depth: int = 3,
              benchmark: str | None = None) -> list[Run]:
    """Load every run that `sources` names (see `resolve_run_dirs`); names are made unique.

    A run's name is its folder's name; where two folders share a name, their paths relative to the
    nearest common parent are used instead.
    """
    runs = [load_run(folder, benchmark=benchmark) for folder in resolve_run_dirs(sources, max_depth)]
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        common = Path(_common_parent([r.folder for r in runs]))
        for run in runs:
            if names.count(run.name) > 1:
                inside = run.folder.is_relative_to(common)
                run.name = str(run.folder.relative_to(common)) if inside else str(run.folder)
    return runs


# ---------------------------------------------------------------------------------------------------
# Groups of seeds
# ---------------------------------------------------------------------------------------------------
@dataclass
class Group:
    """Runs that differ only in their seed (and bookkeeping settings)."""

    label: str
    key: dict[str, Any]
    runs: list[Run]

    @property
    def algorithm(self) -> str:
        return self.runs[0].algorithm

    @property
    def seeds(self) -> list:
        return [r.seed for r in self.runs]

    @property
    def context(self) -> dict[str, Any]:
        """The common settings that shape the training curve, whatever the rule (model, data, budget...)."""
        skip = RULE_SETTINGS | BOOKKEEPING | FINAL_EVAL_SETTINGS | {"algorithm"}
        first = self.runs[0].config
        return {k: _hashable(v) for k, v in first.items() if k not in skip
                and all(_hashable(r.config.get(k)) == _hashable(v) for r in self.runs)}


def group_runs(runs: Sequence[Run], by: Sequence[str] = DEFAULT_BY) -> list[Group]:
    """Group runs by their settings minus the seed.

    Runs are first bucketed by the `by` settings (for GRPO only ``algorithm`` counts: K, alpha and tau do
    not steer it); inside a bucket, any other setting that still differs (other than the seed and
    bookkeeping such as checkpoint frequency) splits it further and is named in the label, so a group only
    ever holds replicates of one experiment.
    """
    buckets: dict[tuple, list[Run]] = {}
    for run in runs:
        buckets.setdefault(_key(run, by), []).append(run)
    groups = []
    for key, members in buckets.items():
        differing = _differing_settings(members, by)
        split: dict[tuple, list[Run]] = {}
        for run in members:
            split.setdefault(tuple(_hashable(run.config.get(s)) for s in differing), []).append(run)
        for values, part in split.items():
            extra = dict(zip(differing, values))
            key_dict = dict(key) | extra
            members_by_seed = sorted(part, key=lambda r: _sort_key(r.seed))
            groups.append(Group(_label(dict(key), extra), key_dict, members_by_seed))
    groups.sort(key=lambda g: (g.algorithm != "grpo", g.label))
    seen: dict[str, int] = {}
    for group in groups:  # labels name groups in tables and legends: keep them unique
        seen[group.label] = seen.get(group.label, 0) + 1
        if seen[group.label] > 1:
            group.label = f"{group.label} #{seen[group.label]}"
    return groups


def _key(run: Run, by: Sequence[str]) -> tuple:
    """The `by` settings of a run (GRPO: the algorithm only; SFPO with its official gate: no tau, which
    that gate does not read)."""
    official_sfpo = run.algorithm == "sfpo" and run.config.get("sfpo_official_gate") is True
    names = [b for b in by if not (run.algorithm == "grpo" and b in RULE_SETTINGS)
             and not (official_sfpo and b == "tau")]
    return tuple((name, _hashable(run.config.get(name))) for name in names)


def _differing_settings(runs: Sequence[Run], by: Sequence[str]) -> list[str]:
    """Settings (beyond `by`, the seed and bookkeeping) whose values differ among `runs`."""
    skip = set(by) | BOOKKEEPING | (RULE_SETTINGS if runs[0].algorithm == "grpo" else set())
    names = sorted({k for r in runs for k in r.config} - skip)
    return [n for n in names if len({_hashable(r.config.get(n)) for r in runs}) > 1]


def _label(key: dict[str, Any], extra: dict[str, Any]) -> str:
    """A short readable name: ``gxpo K=5 alpha=0.5 tau=0.5`` plus up to three differing settings."""
    names = {"k": "K", "alpha": "α", "tau": "τ"}
    parts = [str(key.get("algorithm", "?"))]
    parts += [f"{names.get(k, k)}={v}" for k, v in key.items() if k != "algorithm" and v is not None]
    shown = [f"{k}={v}" for k, v in list(extra.items())[:3]]
    if len(extra) > 3:
        shown.append("…")
    return " ".join(parts) + (f" ({', '.join(shown)})" if shown else "")


# ---------------------------------------------------------------------------------------------------
# Curves and seed bands
# ---------------------------------------------------------------------------------------------------
def curve(run: Run, metric: str, x: str = "step", rows: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of one run, sorted by x, rows without a finite value dropped.

    Args:
        metric: a row key, e.g. ``"pass@1"`` (eval rows) or ``"reward_mean"`` (train rows).
        x: ``"step"``, ``"seconds"``, ``"hours"`` or ``"backward_passes"`` (always cumulative).
        rows: ``"eval"``, ``"train"`` or ``"auto"`` (eval rows if any holds `metric`, else train rows).
    """
    if x not in X_CHOICES:
        raise ValueError(f"x={x!r} is invalid: allowed one of {X_CHOICES}")
    if rows not in ("auto", "eval", "train"):
        raise ValueError(f"rows={rows!r} is invalid: allowed 'auto', 'eval' or 'train'")
    if rows == "auto":
        rows = "eval" if any(_is_number(r.get(metric)) for r in run.eval) else "train"
    source = run.eval if rows == "eval" else run.train
    points = [(_x_value(r, x, rows), r.get(metric)) for r in source]
    points = sorted((float(a), float(b)) for a, b in points if _is_number(a) and _is_number(b))
    if not points:
        return np.zeros(0), np.zeros(0)
    xs, ys = map(np.asarray, zip(*points))
    return xs, ys


def _x_value(row: dict, x: str, rows: str):
    """A row's position on the x axis; train rows count passes cumulatively, like eval rows."""
    if x == "hours":
        seconds = row.get("seconds")
        return seconds / 3600.0 if _is_number(seconds) else None
    if x == "backward_passes" and rows == "train":
        return row.get("cumulative_backward_passes")
    return row.get(x)


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
         rows: str = "auto"):
    """Mean over seeds and a `level` interval for the mean, on a common x grid.

    The grid is the sorted union of every run's x values. Each run is linearly interpolated onto the grid
    points inside its own x range (never extrapolated), so where all runs share their x values (steps,
    GRPO's passes) the values are exact; ``n`` says how many runs a point averages.

    Args:
        interval: ``"t"`` (Student-t over seeds: mean ± t_{n-1} · s / sqrt(n)) or ``"bootstrap"``
            (percentile bootstrap over seeds, `gxpo_lib.evaluation.bootstrap_ci`; coarse with few seeds).
            Fewer than two runs at a point give NaN bounds.

    Returns:
        A DataFrame with columns ``x, mean, lo, hi, n`` (x named by `x`).
    """
    import pandas as pd

    if interval not in ("t", "bootstrap"):
        raise ValueError(f"interval={interval!r} is invalid: allowed 't' or 'bootstrap'")
    curves = [c for c in (curve(run, metric, x, rows) for run in runs) if c[0].size]
    if not curves:
        return pd.DataFrame(columns=[x, "mean", "lo", "hi", "n"])
    grid = np.unique(np.concatenate([xs for xs, _ in curves]))
    out = []
    for point in grid:
        values = np.asarray([np.interp(point, xs, ys) for xs, ys in curves if xs[0] <= point <= xs[-1]])
        lo, hi = _interval(values, interval, level)
        out.append({x: float(point), "mean": float(values.mean()), "lo": lo, "hi": hi, "n": int(values.size)})
    return pd.DataFrame(out)


def seed_mean_curve(runs: Sequence[Run], metric: str = "pass@1", include_initial: bool = False) -> list[dict]:
    """Evaluations averaged over seeds per step: metric, seconds and backward passes are each the mean
    over the runs, at the steps every run evaluated (the step-0 evaluation only with `include_initial`)."""
    per_run = [{r["step"]: r for r in run.eval if _is_number(r.get(metric))} for run in runs]
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
            "seconds": _mean_or_none([r.get("seconds") for r in rows]),
            "backward_passes": _mean_or_none([r.get("backward_passes") for r in rows]),
        })
    return [r for r in curve_rows if r["seconds"] is not None and r["backward_passes"] is not None]


# ---------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------
def speedup_table(runs: Sequence[Run], reference: str = "grpo", metric: str = "pass@1",
                  by: Sequence[str] = DEFAULT_BY, include_initial: bool = False, resamples: int = 0,
                  level: float = 0.95, seed: int = 0):
    """The paper's speed-up table: how much sooner each method reaches the reference's (GRPO's) peak.

    Per group of seeds, evaluations are averaged over seeds at each step (`seed_mean_curve`; seconds and
    backward passes are averaged too). The reference's best averaged ``metric`` is the target; for every
    group, the first averaged evaluation at or above it gives its steps, hours and backward passes; a
    ratio is the reference's value divided by the method's (`gxpo_lib.evaluation.speedup_to_peak`), so
    above 1 means faster. The step-0 evaluation is left out (it is the shared starting model, not
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
        ``ref_step, ref_hours, ref_backward_passes``, the method's ``step, hours, backward_passes`` (NaN if
        not reached), ``speedup_steps, speedup_hours, speedup_backward_passes`` and ``status``:
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


_SPEEDUP_COLUMNS = ["group", "algorithm", "seeds", "reference", "target", "ref_step", "ref_hours",
                    "ref_backward_passes", "step", "hours", "backward_passes", "speedup_steps",
                    "speedup_hours", "speedup_backward_passes", "status", "note"]
# speed-up column suffix -> the x key of `speedup_to_peak`
_RATIO_X = {"steps": "step", "hours": "seconds", "backward_passes": "backward_passes"}
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
        result = speedup_to_peak(ref_curve, method_curve, metric=metric, x_keys=SPEEDUP_X)
        hit = result["step_method"] is not None
        reached += hit
        for name, x in _RATIO_X.items():
            draws[name].append(_nan(result[f"{x}_speedup"]) if hit else 0.0)
    tails = (100 * (1 - level) / 2, 100 * (1 + level) / 2)
    out: dict[str, float] = {"reached_share": reached / resamples}
    for name, values in draws.items():
        finite = np.asarray(values, dtype=float)
        finite = finite[np.isfinite(finite)]
        lo, hi = np.percentile(finite, tails) if finite.size else (math.nan, math.nan)
        out[f"speedup_{name}_lo"], out[f"speedup_{name}_hi"] = float(lo), float(hi)
    return out


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
    result = speedup_to_peak(ref_curve, method_curve, metric=metric, x_keys=SPEEDUP_X)
    reached = result["step_method"] is not None
    row.update(target=result["target"], ref_step=result["step_reference"],
               ref_hours=result["seconds_reference"] / 3600.0,
               ref_backward_passes=result["backward_passes_reference"])
    if reached:
        row.update(step=result["step_method"], hours=result["seconds_method"] / 3600.0,
                   backward_passes=result["backward_passes_method"],
                   speedup_steps=_nan(result["step_speedup"]), speedup_hours=_nan(result["seconds_speedup"]),
                   speedup_backward_passes=_nan(result["backward_passes_speedup"]))
    row["status"] = "reference" if is_ref else "reached" if reached else "not reached"
    return row


def _improved(group: Group, metric: str) -> bool:
    """Did the seed-averaged peak after training beat the seed-averaged initial evaluation?"""
    full = seed_mean_curve(group.runs, metric, include_initial=True)
    initial = [r[metric] for r in full if r["step"] == 0]
    later = [r[metric] for r in full if r["step"] > 0]
    return bool(later) and (not initial or max(later) > initial[0])


def format_speedups(df):
    """The speed-up table as the paper prints it: ``1.50×`` or ``not reached`` in the ratio columns.

    With intervals (``speedup_table(..., resamples=N)``) each ratio is followed by its interval,
    ``1.50× [0.90×, 2.10×]``, where a lower end of 0 reads ``not reached``; a ``reached in`` column gives
    the share of resamples that reached the target.
    """
    with_intervals = "reached_share" in df.columns
    shown = df[["group", "seeds", "target", "speedup_steps", "speedup_hours", "speedup_backward_passes",
                "status"]].copy()
    for name in _RATIO_X:
        col = f"speedup_{name}"
        cells = []
        for i, (value, status) in enumerate(zip(df[col], df["status"])):
            cell = (f"{value:.2f}×" if _is_number(value) else "n/a") if status in ("reached", "reference") \
                else status
            if with_intervals and _is_number(df[f"{col}_lo"].iloc[i]):
                lo, hi = df[f"{col}_lo"].iloc[i], df[f"{col}_hi"].iloc[i]
                cell += f" [{_ratio_text(lo)}, {_ratio_text(hi)}]"
            cells.append(cell)
        shown[col] = cells
    shown["target"] = [f"{v:.3f}" if _is_number(v) else "" for v in df["target"]]
    if with_intervals:
        shown["reached in"] = [f"{v:.0%} of resamples" if _is_number(v) else "" for v in df["reached_share"]]
    return shown.rename(columns={"speedup_steps": "steps", "speedup_hours": "hours",
                                 "speedup_backward_passes": "backward passes"})


def _ratio_text(value: float) -> str:
    return "not reached" if value == 0 else f"{value:.2f}×"


def activity_table(runs: Sequence[Run], by: Sequence[str] = DEFAULT_BY, level: float = 0.95):
    """How long extrapolation stayed on, and what each group spent, with Student-t intervals over seeds.

    Per group: ``steps`` (train rows per run, mean), ``active_steps`` (steps whose update extrapolated:
    train rows with ``active``), ``shutoff_step`` (the first step without extrapolation, over the runs whose
    gate shut), ``never_shut`` (runs whose gate stayed open to the end), and the cost to the last
    evaluation: ``backward_passes`` (cumulative) and ``seconds`` (training seconds: sampling, scoring and
    update). Each numeric column has ``_lo`` / ``_hi`` bounds (NaN with one seed). GRPO groups appear too
    (0 active steps, 1 pass per step): they are the baseline the costs compare with.
    """
    import pandas as pd

    rows = []
    for group in group_runs(runs, by):
        per_run = {
            "steps": [len(r.train) for r in group.runs],
            "active_steps": [sum(bool(t.get("active")) for t in r.train) for r in group.runs],
            "shutoff_step": [r.shutoff_step for r in group.runs if r.shutoff_step is not None],
            "backward_passes": [r.eval[-1].get("backward_passes") for r in group.runs if r.eval],
            "seconds": [r.eval[-1].get("seconds") for r in group.runs if r.eval],
        }
        row: dict[str, Any] = {"group": group.label, "algorithm": group.algorithm, "seeds": len(group.runs)}
        for name, values in per_run.items():
            values = np.asarray([v for v in values if _is_number(v)], dtype=float)
            lo, hi = _interval(values, "t", level)
            row[name] = float(values.mean()) if values.size else math.nan
            row[f"{name}_lo"], row[f"{name}_hi"] = lo, hi
        row["never_shut"] = 0 if group.algorithm == "grpo" else \
            sum(r.shutoff_step is None for r in group.runs)
        rows.append(row)
    return pd.DataFrame(rows)


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
            lo, hi = _interval(values, "t", level)
        cells.update({name: float(values.mean()), f"{name}_lo": float(lo), f"{name}_hi": float(hi)})
    cells["k"] = k
    cells["interval"] = "bootstrap over problems" if len(results) == 1 else "t over seeds"
    return cells


# ---------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------
_COLORS = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880")
_X_TITLES = {"step": "step", "seconds": "training seconds", "hours": "training hours",
             "backward_passes": "backward passes"}


def group_colors(groups: Sequence[Group]) -> dict[str, str]:
    """One color per group label (GRPO groups first, as `group_runs` sorts them)."""
    return {g.label: _COLORS[i % len(_COLORS)] for i, g in enumerate(groups)}


def plot_curves(runs: Sequence[Run], metric: str = "pass@1",
                xs: Sequence[str] = ("step", "hours", "backward_passes"), by: Sequence[str] = DEFAULT_BY,
                interval: str = "t", rows: str = "auto"):
    """`metric` against each x in `xs`, one line per group (the mean over seeds) with its interval shaded."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    groups = group_runs(runs, by)
    colors = group_colors(groups)
    fig = make_subplots(rows=1, cols=len(xs), shared_yaxes=True,
                        subplot_titles=[f"vs {_X_TITLES[x]}" for x in xs])
    for group in groups:
        color = colors[group.label]
        for col, x in enumerate(xs, start=1):
            df = band(group.runs, metric, x, interval=interval, rows=rows)
            if df.empty:
                continue
            shaded = df.dropna(subset=["lo", "hi"])
            if len(shaded):  # the interval as a filled polygon: upper edge forward, lower edge back
                fig.add_trace(go.Scatter(
                    x=list(shaded[x]) + list(shaded[x])[::-1], y=list(shaded["hi"]) + list(shaded["lo"])[::-1],
                    fill="toself", fillcolor=_rgba(color, 0.18), line={"width": 0}, hoverinfo="skip",
                    showlegend=False, legendgroup=group.label), row=1, col=col)
            fig.add_trace(go.Scatter(
                x=df[x], y=df["mean"], mode="lines+markers", line_color=color, legendgroup=group.label,
                name=f"{group.label} (n={len(group.runs)})", showlegend=col == 1,
                customdata=df["n"], hovertemplate="%{y:.3f} (runs: %{customdata})"), row=1, col=col)
            fig.update_xaxes(title_text=_X_TITLES[x], row=1, col=col)
    fig.update_yaxes(title_text=metric, row=1, col=1)
    fig.update_layout(height=400, width=380 * len(xs) + 150,
                      title=f"{metric}: mean over seeds, shaded: 95% {interval} interval over seeds")
    return fig


_DIAG_PANELS = (
    ("gate z (shut-off signal)", ("gate_z",)),
    ("retention r: mean ± std", ("r_mean",)),
    ("scale q: mean, max", ("scale_mean", "scale_max")),
    ("effective multiplier α·q", ("effective_multiplier",)),
    ("cos(g0, g1)", ("cos_g0_g1",)),
    ("cos(g0, g_slow)", ("cos_g0_gslow",)),
    ("jump / ||θ||", ("jump_over_param_norm",)),
    ("inactive and clamped fractions", ("inactive_frac", "ratio_clip_frac")),
)


def has_diagnostics(run: Run) -> bool:
    """True if any train row carries a GXPO/SFPO diagnostic (GRPO runs have none)."""
    keys = ("r_mean", "scale_mean", "jump_norm", "gate_z")
    return any(_is_number(r.get(k)) for r in run.train for k in keys)


def plot_diagnostics(runs: Sequence[Run], by: Sequence[str] = DEFAULT_BY):
    """GXPO's diagnostics over steps, one line per run (colored by group): gate z with tau and the
    shut-off step, retention mean ± std, scale, α·q, the two cosines, jump / ||θ||, inactive and clamped
    fractions. Returns None when no run has diagnostics."""
    from plotly.subplots import make_subplots

    runs = [r for r in runs if r.algorithm != "grpo" and has_diagnostics(r)]
    if not runs:
        return None
    groups = group_runs(runs, by)
    colors = group_colors(groups)
    fig = make_subplots(rows=2, cols=4, subplot_titles=[title for title, _ in _DIAG_PANELS],
                        horizontal_spacing=0.06, vertical_spacing=0.14)
    for group in groups:
        for i, run in enumerate(group.runs):
            first = i == 0
            for panel, (_, keys) in enumerate(_DIAG_PANELS):
                row, col = panel // 4 + 1, panel % 4 + 1
                for j, key in enumerate(keys):
                    trace = _diag_trace(run, key, colors[group.label], dash=("solid", "dot")[j % 2])
                    if trace is None:
                        continue
                    trace.update(legendgroup=group.label, name=f"{group.label}: {key}",
                                 showlegend=first and panel == 0)
                    if key == "r_mean":
                        stds = [r.get("r_std") for r in run.train if _is_number(r.get("r_mean"))]
                        spread = [s if _is_number(s) else 0 for s in stds]
                        trace.update(error_y={"type": "data", "array": spread})
                    fig.add_trace(trace, row=row, col=col)
            _mark_gate(fig, run, colors[group.label])
    fig.update_xaxes(title_text="step", row=2)
    fig.update_layout(height=620, width=1400, title="GXPO diagnostics per run (dashed line: shut-off step; "
                      "dotted: tau)", legend={"orientation": "h", "y": -0.12})
    return fig


def _diag_trace(run: Run, key: str, color: str, dash: str):
    """One diagnostic of one run as a line over steps (None if the run never logs it)."""
    import plotly.graph_objects as go

    points = [(r["step"], r[key]) for r in run.train if _is_number(r.get(key))]
    if not points:
        return None
    steps, values = zip(*points)
    return go.Scatter(x=steps, y=values, mode="lines+markers", marker_size=4,
                      line={"color": color, "dash": dash},
                      hovertemplate=f"{run.name} {key}: %{{y:.4g}} at step %{{x}}<extra></extra>")


def _mark_gate(fig, run: Run, color: str) -> None:
    """tau as a dotted line and the shut-off step as a dashed line on the gate-z panel."""
    taus = [r.get("tau") for r in run.train if _is_number(r.get("tau"))] or \
        ([run.config["tau"]] if _is_number(run.config.get("tau")) else [])
    if taus:
        fig.add_hline(y=taus[-1], line_dash="dot", line_color=color, opacity=0.6, row=1, col=1)
    if run.shutoff_step is not None:
        fig.add_vline(x=run.shutoff_step, line_dash="dash", line_color=color, opacity=0.8, row=1, col=1)


# ---------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file; blank and torn lines (a kill mid-write) are skipped."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _read_json(path: Path):
    """A JSON file's content, or None if it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _by_step(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (r.get("step") is None, r.get("step") or 0))


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(float(value))


def _mean_or_none(values: list) -> float | None:
    numbers = [float(v) for v in values if _is_number(v)]
    return float(np.mean(numbers)) if len(numbers) == len(values) and numbers else None


def _nan(value) -> float:
    return math.nan if value is None else float(value)


def _hashable(value):
    """Lists (JSON's tuples) as tuples, so settings can key a dict."""
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def _sort_key(value):
    return (value is None, str(type(value)), value if value is not None else 0)


def _common_parent(paths: list[Path]) -> str:
    import os

    return os.path.commonpath([str(p) for p in paths]) if paths else "."


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    return f"rgba({int(h[0:2], 16)}, {int(h[2:4], 16)}, {int(h[4:6], 16)}, {alpha})"
