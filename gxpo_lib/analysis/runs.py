"""Run folders into `Run` objects, finding them, and grouping runs that differ only in their seed.

Our folders are read only through `gxpo_lib.rl.runlog` (the module that writes them); the authors' verl
logs through `gxpo_lib.analysis.authors`. Grouping keys derive from `gxpo_lib.config`: the settings of
one rule (`RULE_SETTINGS`) do not tell GRPO runs apart, and bookkeeping settings never split a group.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gxpo_lib.analysis.authors import load_authors_run
from gxpo_lib.analysis.records import Run, by_step, hashable, is_number
from gxpo_lib.config import RESUME_MAY_CHANGE, RULE_SETTINGS, TrainConfig
from gxpo_lib.rl.runlog import METRICS_FILE, read_config, read_final_eval, read_rows, read_summary

DEFAULT_BY = ("algorithm", "k", "alpha", "tau")
# Settings that only steer GXPO / SFPO (the rule's and the gate's): they do not tell GRPO runs apart.
RULE_ONLY_SETTINGS = frozenset(RULE_SETTINGS) - {"algorithm"}
# Settings of the final evaluation only: the training curve does not depend on them.
FINAL_EVAL_SETTINGS = frozenset(name for name in RESUME_MAY_CHANGE if name.startswith("final_eval_"))
# Bookkeeping: settings that change nothing a run learns (the budget, steps and eval_every, does count).
BOOKKEEPING = (RESUME_MAY_CHANGE - FINAL_EVAL_SETTINGS - {"steps", "eval_every"}) | {"seed", "data_dir", "progress"}
# What a folder lacks takes today's default: settings added later kept the old behaviour as their default.
_DEFAULTS = json.loads(json.dumps(TrainConfig().to_dict()))
_SKIPPED_FOLDERS = ("checkpoints", "__pycache__")
_SHORT_NAMES = {"k": "K", "alpha": "α", "tau": "τ"}


# ---------------------------------------------------------------------------------------------------
# One folder
# ---------------------------------------------------------------------------------------------------
def load_run(folder: str | Path, benchmark: str | None = None, config: Mapping[str, Any] | None = None) -> Run:
    """Read one run folder (ours or the authors'); ValueError naming the folder if it holds no metrics.jsonl.

    Args:
        folder: the run folder.
        benchmark: for the authors' logs with several validation sources, which one the eval rows follow
            (a substring of the source name); default MATH-500 if present, else the first by name.
        config: settings to add or override (e.g. ``{"seed": 1}`` for an authors' run).
    """
    folder = Path(folder)
    if not (folder / METRICS_FILE).is_file():
        raise ValueError(f"run folder {str(folder)!r} is invalid: it holds no {METRICS_FILE}")
    rows = [r for r in read_rows(folder) if isinstance(r, dict)]
    summary = read_summary(folder)
    if any("kind" in r for r in rows):
        run = _load_own_run(folder, rows, summary)
    else:
        run = load_authors_run(folder, rows, summary, benchmark)
    run.config.update(config or {})
    return run


def _load_own_run(folder: Path, rows: list[dict], summary: dict) -> Run:
    """A folder written by gxpo_lib (either trainer): rows split by kind, kept under the trainer's names."""
    config = _DEFAULTS | read_config(folder)
    train = [_with_jump_ratio(dict(r)) for r in rows if r.get("kind") == "train"]
    evals = [dict(r) for r in rows if r.get("kind") == "eval"]   # cumulative_backward_passes as written
    final = read_final_eval(folder)
    if not final:  # an older folder: rebuild from the final_eval rows
        final = {r["benchmark"]: {k: v for k, v in r.items() if k not in ("kind", "benchmark", "step")}
                 for r in rows if r.get("kind") == "final_eval" and "benchmark" in r}
    return Run(folder.name, folder, config, by_step(train), by_step(evals), final, summary, "gxpo_lib")


def _with_jump_ratio(row: dict) -> dict:
    """Add jump_norm / param_norm (the jump relative to the weights) where both are logged."""
    jump, norm = row.get("jump_norm"), row.get("param_norm")
    if "jump_over_param_norm" not in row and is_number(jump) and is_number(norm) and norm > 0:
        row["jump_over_param_norm"] = jump / norm
    return row


# ---------------------------------------------------------------------------------------------------
# Finding folders
# ---------------------------------------------------------------------------------------------------
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
            if (folder / METRICS_FILE).is_file():
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
        elif globlib.has_magic(text):
            matches = [Path(m) for m in sorted(globlib.glob(text, recursive=True))]
            hits = [m.parent if m.name == METRICS_FILE else m for m in matches]
            hits = [h for h in hits if (h / METRICS_FILE).is_file()]
            if not hits:
                raise ValueError(f"run_dirs entry {text!r} is invalid: the glob matches no folder with "
                                 f"a {METRICS_FILE}")
            folders += hits
        else:
            folders += _folders_at(Path(text), max_depth)
    return list(dict.fromkeys(p.resolve() for p in folders))


def _folders_at(path: Path, max_depth: int) -> list[Path]:
    """A run folder (or its metrics.jsonl) as itself; a parent folder as the run folders below it."""
    if path.name == METRICS_FILE and path.is_file():
        path = path.parent
    if path.is_dir() and not (path / METRICS_FILE).is_file():
        below = find_run_folders(path, max_depth)
        if not below:
            raise ValueError(f"run folder {str(path)!r} is invalid: it holds no {METRICS_FILE}, nor do its "
                             f"sub-folders (depth <= {max_depth})")
        return below
    return [path]  # load_run reports a missing folder or metrics.jsonl


def load_runs(sources: str | Path | Iterable[str | Path] = "auto", max_depth: int = 3,
              benchmark: str | None = None) -> list[Run]:
    """Load every run that `sources` names (see `resolve_run_dirs`); names are made unique.

    A run's name is its folder's name; where two folders share a name, their paths relative to the
    nearest common parent are used instead.
    """
    runs = [load_run(folder, benchmark=benchmark) for folder in resolve_run_dirs(sources, max_depth)]
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        common = Path(os.path.commonpath([str(r.folder) for r in runs]))
        for run in runs:
            if names.count(run.name) > 1:
                inside = run.folder.is_relative_to(common)
                run.name = str(run.folder.relative_to(common)) if inside else str(run.folder)
    return runs


def run_name(config: TrainConfig, base: TrainConfig | None = None, max_length: int = 60) -> str:
    """A folder name for a run, from the settings that differ from `base` (default: TrainConfig()).

    ``gxpo``, ``grpo_lr=0.001``, ``sfpo_k=3_alpha=0.8``: the algorithm, then ``name=value`` for every
    setting that shapes the run and differs from `base`. Settings a run may change when it resumes
    (steps, eval_every, ...) are left out, and so are GXPO's settings in a GRPO run's name, so asking for
    more steps resumes the same folder while another learning rate gets a folder of its own. A name
    longer than `max_length` is cut and ends with a short hash of the whole name, so it stays unique.
    """
    base_values = (base or TrainConfig()).to_dict()
    values = config.to_dict()
    skip = RESUME_MAY_CHANGE | {"algorithm"} | (RULE_ONLY_SETTINGS if config.algorithm == "grpo" else set())
    parts = [config.algorithm] + [f"{name}={_text(value)}" for name, value in values.items()
                                  if name not in skip and value != base_values[name]]
    name = "_".join(parts)
    if len(name) > max_length:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[:max_length - 9]}-{digest}"
    return name


def _text(value: Any) -> str:
    """A setting's value as folder-name text: lists joined by '-', path separators replaced."""
    text = "-".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return text.replace("/", "-").replace(os.sep, "-")


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
        skip = RULE_ONLY_SETTINGS | BOOKKEEPING | FINAL_EVAL_SETTINGS | {"algorithm"}
        first = self.runs[0].config
        return {k: hashable(v) for k, v in first.items() if k not in skip
                and all(hashable(r.config.get(k)) == hashable(v) for r in self.runs)}


def group_runs(runs: Sequence[Run], by: Sequence[str] = DEFAULT_BY) -> list[Group]:
    """Group runs by their settings minus the seed.

    Runs are first bucketed by the `by` settings (for GRPO only ``algorithm`` counts: the rule and gate
    settings do not steer it); inside a bucket, any other setting that still differs (other than the seed
    and bookkeeping such as checkpoint frequency) splits it further and is named in the label, so a group
    only ever holds replicates of one experiment.
    """
    buckets: dict[tuple, list[Run]] = {}
    for run in runs:
        buckets.setdefault(_key(run, by), []).append(run)
    groups = []
    for key, members in buckets.items():
        differing = _differing_settings(members, by)
        split: dict[tuple, list[Run]] = {}
        for run in members:
            split.setdefault(tuple(_setting(run, s) for s in differing), []).append(run)
        for values, part in split.items():
            extra = dict(zip(differing, values))
            members_by_seed = sorted(part, key=lambda r: (r.seed is None, str(type(r.seed)), r.seed or 0))
            groups.append(Group(_label(dict(key), extra), dict(key) | extra, members_by_seed))
    groups.sort(key=lambda g: (g.algorithm != "grpo", g.label))
    seen: dict[str, int] = {}
    for group in groups:  # labels name groups in tables and legends: keep them unique
        seen[group.label] = seen.get(group.label, 0) + 1
        if seen[group.label] > 1:
            group.label = f"{group.label} #{seen[group.label]}"
    return groups


def _setting(run: Run, name: str):
    """A run's setting, comparable across runs: the gate as the one the rule got ("auto" resolved)."""
    value = hashable(run.config.get(name))
    if name == "gate" and value == "auto":
        return "entropy" if run.algorithm == "sfpo" else "grad_norm"
    return value


def _key(run: Run, by: Sequence[str]) -> tuple:
    """The `by` settings of a run (GRPO: the algorithm only; SFPO with its official gate, gate "auto": no tau,
    which that gate does not read)."""
    official_sfpo = run.algorithm == "sfpo" and run.config.get("gate", "auto") == "auto"
    names = [b for b in by if not (run.algorithm == "grpo" and b in RULE_ONLY_SETTINGS)
             and not (official_sfpo and b == "tau")]
    return tuple((name, _setting(run, name)) for name in names)


def _differing_settings(runs: Sequence[Run], by: Sequence[str]) -> list[str]:
    """Settings (beyond `by`, the seed and bookkeeping) whose values differ among `runs`."""
    skip = set(by) | BOOKKEEPING | (RULE_ONLY_SETTINGS if runs[0].algorithm == "grpo" else set())
    names = sorted({k for r in runs for k in r.config} - skip)
    return [n for n in names if len({_setting(r, n) for r in runs}) > 1]


def _label(key: dict[str, Any], extra: dict[str, Any]) -> str:
    """A short readable name: ``gxpo K=5 α=0.5 τ=0.5`` plus up to three differing settings."""
    parts = [str(key.get("algorithm", "?"))]
    parts += [f"{_SHORT_NAMES.get(k, k)}={v}" for k, v in key.items() if k != "algorithm" and v is not None]
    shown = [f"{k}={v}" for k, v in list(extra.items())[:3]]
    if len(extra) > 3:
        shown.append("…")
    return " ".join(parts) + (f" ({', '.join(shown)})" if shown else "")
