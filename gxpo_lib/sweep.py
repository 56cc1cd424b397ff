"""Sweeps: expand a grid of settings into headless runs of notebook 03, one run folder each.

A grid file (YAML):

    preset: smoke                 # the preset every run starts from
    out: runs/sweep-smoke         # one sub-folder per run
    parallel: 1                   # runs at a time (each is its own kernel process)
    base: {steps: 10}             # settings shared by every run
    grid:                         # the cartesian product of these lists
      algorithm: [grpo, gxpo]
      seed: [0, 1]

``preset`` may also be a grid axis (``grid: {preset: [paper-grpo, paper-gxpo], seed: [0, 1, 2]}``); examples
live in ``sweeps/``.

    python -m gxpo_lib sweep grid.yaml [--parallel N] [--dry-run]

A run whose folder holds ``run_summary.json`` is finished and skipped; a failed run is recorded in
``sweep_status.json`` and the others go on. A rerun resumes unfinished runs from their checkpoints.
"""

from __future__ import annotations

import itertools
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .notebooks import NOTEBOOK_DIR, execute_notebook
from .presets import resolve_config

RUN_NOTEBOOK = NOTEBOOK_DIR / "03_full_scale_run.ipynb"
GRID_KEYS = {"preset", "out", "parallel", "base", "grid", "notebook", "timeout"}


@dataclass
class Sweep:
    """A parsed grid file."""

    out: Path
    preset: str | None = None
    base: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    parallel: int = 1
    notebook: Path = RUN_NOTEBOOK
    timeout: int = 24 * 3600

    def runs(self) -> list[tuple[str, dict[str, Any]]]:
        """(run name, settings) for every point of the grid, in a stable order."""
        names = list(self.grid)
        points = itertools.product(*(self.grid[n] for n in names)) if names else [()]
        runs = []
        for values in points:
            setting = dict(zip(names, values))
            label = "_".join(f"{n}={_label(v)}" for n, v in setting.items()) or "run"
            runs.append((label, self.base | setting))
        return runs


def _label(value: Any) -> str:
    text = "-".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in text)


def load_sweep(path: Path | str) -> Sweep:
    """Read and check a grid file: every run's settings are validated before any run starts."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"grid file {str(path)!r} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"grid file {path}: expected a mapping with keys {sorted(GRID_KEYS)}")
    unknown = sorted(set(raw) - GRID_KEYS)
    if unknown:
        raise ValueError(f"{unknown[0]}: not a grid-file key (allowed: {', '.join(sorted(GRID_KEYS))})")
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ValueError("grid: expected a mapping of setting -> non-empty list of values")
    parallel = raw.get("parallel", 1)
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ValueError(f"parallel={parallel!r} is invalid: allowed an integer >= 1")
    out = raw.get("out") or f"runs/{path.stem}"
    sweep = Sweep(out=Path(out), preset=raw.get("preset"), base=raw.get("base") or {}, grid=grid,
                  parallel=parallel, notebook=Path(raw.get("notebook", RUN_NOTEBOOK)),
                  timeout=int(raw.get("timeout", 24 * 3600)))
    for name, settings in sweep.runs():
        try:
            overrides = {k: v for k, v in settings.items() if k != "preset"}
            resolve_config(settings.get("preset", sweep.preset), overrides)
        except ValueError as error:
            raise ValueError(f"run {name}: {error}") from None
    return sweep


def run_sweep(sweep: Sweep, dry_run: bool = False) -> list[dict[str, Any]]:
    """Execute every unfinished run (``parallel`` at a time); returns one status row per run."""
    status_path = sweep.out / "sweep_status.json"

    def one(name: str, settings: dict[str, Any]) -> dict[str, Any]:
        folder = (sweep.out / name).resolve()
        if (folder / "run_summary.json").exists():
            return {"run": name, "state": "skipped (finished)", **_summary(folder)}
        if dry_run:
            return {"run": name, "state": "would run"}
        start = time.perf_counter()
        parameters = {"preset": sweep.preset, "output_dir": str(folder), **settings}  # a grid preset wins
        try:
            execute_notebook(sweep.notebook, folder, parameters=parameters, timeout=sweep.timeout)
            return {"run": name, "state": "done", "seconds": round(time.perf_counter() - start, 1),
                    **_summary(folder)}
        except Exception as error:  # one failed run must not stop the others
            return {"run": name, "state": "failed", "seconds": round(time.perf_counter() - start, 1),
                    "error": f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}"}

    runs = sweep.runs()
    if dry_run:
        return [one(*run) for run in runs]
    sweep.out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=sweep.parallel) as pool:
        rows = list(pool.map(lambda run: one(*run), runs))
    status_path.write_text(json.dumps(rows, indent=2))
    return rows


def _summary(folder: Path) -> dict[str, Any]:
    path = folder / "run_summary.json"
    if not path.exists():
        return {}
    summary = json.loads(path.read_text())
    return {k: summary.get(k) for k in ("final_pass@1", "peak_pass@1", "shutoff_step", "backward_passes")}


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text summary table of a sweep."""
    columns = ["run", "state", "seconds", "final_pass@1", "peak_pass@1", "shutoff_step", "backward_passes"]
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    errors = [f"{r['run']}: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(lines + (["", "failures:"] + errors if errors else []))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)
