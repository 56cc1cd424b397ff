"""Sweeps: expand a grid of settings into headless runs of notebook 03, one run folder each.

A grid file (YAML):

    preset: smoke                 # the preset every run starts from
    out: runs/sweep-smoke         # one sub-folder per run
    parallel: 1                   # runs at a time (each is its own kernel process)
    base: {steps: 10}             # settings shared by every run
    grid:                         # the cartesian product of these lists
      algorithm: [grpo, gxpo]
      seed: [0, 1]

``preset`` may also be a grid axis (``grid: {preset: [paper-grpo, paper-gxpo], seed: [0, 1, 2]}``). A study of
several arms lists them under ``grids:``, each ``{base: {...}, grid: {...}}`` over the shared ``base`` (a run's
name holds its arm's own base settings and its grid values); examples live in ``sweeps/``.

    python -m gxpo_lib sweep grid.yaml [--parallel N] [--gpus 0,1,...] [--dry-run] [--direct]

``--direct`` (or ``direct: true`` in the file) runs each point as ``python -m gxpo_lib run`` (`experiment.run`, no
notebook kernel); by default each run executes notebook 03 and leaves its executed report.

Every run executes in its own process (``python -m gxpo_lib execute``, papermill inside) with its own
working directory, its output streamed to ``run.log`` in its folder; one line is printed per finished run.
Notebook 03's own parameters (``backend``, ``num_processes``, ``progress``, ...: run options, not
TrainConfig settings) may be grid axes or ``base`` entries. ``--gpus`` pins
``CUDA_VISIBLE_DEVICES`` per parallel run (one GPU list entry per slot; "0,1|2,3" gives each slot two).
A run whose folder holds ``run_summary.json`` is finished and skipped; a failed run is recorded in
``sweep_status.json`` and the others go on. A rerun resumes unfinished runs from their checkpoints.
On the CPU each run gets ``OMP_NUM_THREADS`` = cores // parallel unless the environment sets it
(`run_environment`), so parallel runs do not oversubscribe the cores.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import subprocess
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gxpo_lib.config import NOTEBOOK_PARAMETERS, check_notebook_parameters, resolve_config
from gxpo_lib.rl.runlog import SUMMARY_FILE, atomic_write_text
from gxpo_lib.teach.headless import NOTEBOOK_DIR

RUN_NOTEBOOK = NOTEBOOK_DIR / "03_full_scale_run.ipynb"
GRID_KEYS = {"preset", "out", "parallel", "base", "grid", "grids", "notebook", "timeout", "gpus", "direct"}
ARM_KEYS = {"base", "grid"}


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
    gpus: list[str] = field(default_factory=list)   # CUDA_VISIBLE_DEVICES per parallel slot
    arms: list[dict[str, Any]] = field(default_factory=list)  # grids: [{base, grid}, ...] (empty: one arm)
    direct: bool = False                              # python -m gxpo_lib run instead of notebook 03

    def runs(self) -> list[tuple[str, dict[str, Any]]]:
        """(run name, settings) for every point of every arm, in a stable order; names are unique."""
        runs, seen = [], set()
        for arm in self.arms or [{"base": {}, "grid": self.grid}]:
            names, own = list(arm["grid"]), arm.get("base") or {}
            points = itertools.product(*(arm["grid"][n] for n in names)) if names else [()]
            for values in points:
                setting = own | dict(zip(names, values))
                label = "_".join(f"{n}={_label(v)}" for n, v in setting.items()) or "run"
                if label in seen:
                    raise ValueError(f"run {label}: two points of the grid file share this name (arms must differ "
                                     "in their own base or grid settings)")
                seen.add(label)
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
    _check_grid("grid", grid)
    arms = raw.get("grids", [])
    if not isinstance(arms, list) or ("grids" in raw and (not arms or raw.get("grid"))):
        raise ValueError("grids: expected a list of {base, grid} arms (and no top-level grid beside it)")
    for number, arm in enumerate(arms):
        if not isinstance(arm, dict) or set(arm) - ARM_KEYS or not isinstance(arm.get("base") or {}, dict):
            raise ValueError(f"grids[{number}]: expected a mapping with keys base and grid")
        _check_grid(f"grids[{number}].grid", arm.get("grid") or {})
        arm["grid"] = arm.get("grid") or {}
    direct = raw.get("direct", False)
    if not isinstance(direct, bool):
        raise ValueError(f"direct={direct!r} is invalid: allowed true or false")
    parallel = raw.get("parallel", 1)
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ValueError(f"parallel={parallel!r} is invalid: allowed an integer >= 1")
    out = raw.get("out") or f"runs/{path.stem}"
    sweep = Sweep(out=Path(out), preset=raw.get("preset"), base=raw.get("base") or {}, grid=grid,
                  parallel=parallel, notebook=Path(raw.get("notebook", RUN_NOTEBOOK)),
                  timeout=int(raw.get("timeout", 24 * 3600)), gpus=parse_gpus(_gpu_text(raw.get("gpus"))),
                  arms=arms, direct=direct)
    for name, settings in sweep.runs():
        try:
            _check_notebook_parameters(settings)
            overrides = {k: v for k, v in settings.items() if k not in NOTEBOOK_PARAMETERS}
            resolve_config(settings.get("preset", sweep.preset), overrides)
        except ValueError as error:
            raise ValueError(f"run {name}: {error}") from None
    return sweep


def _check_grid(where: str, grid: Any) -> None:
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ValueError(f"{where}: expected a mapping of setting -> non-empty list of values")


def _check_notebook_parameters(settings: dict[str, Any]) -> None:
    """Notebook 03's own parameters in a grid: the ones a sweep sets itself are refused, the rest checked."""
    for name in ("output_dir", "resume"):
        if name in settings:
            raise ValueError(f"{name}: set by the sweep itself (each run's folder under out, resumed)")
    check_notebook_parameters(settings)


def _gpu_text(value: Any) -> str | None:
    """A grid file's ``gpus``: "0,1", [0, 1] or None."""
    if value is None or isinstance(value, str):
        return value
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def parse_gpus(text: str | None) -> list[str]:
    """"0,1,2" -> ["0", "1", "2"] (one GPU per parallel slot); "0,1|2,3" -> ["0,1", "2,3"]."""
    if not text:
        return []
    parts = text.split("|") if "|" in text else text.split(",")
    if not all(p.strip() and all(x.strip().isdigit() for x in p.split(",")) for p in parts):
        raise ValueError(f"--gpus={text!r} is invalid: allowed GPU indices like 0,1,2 (or 0,1|2,3 per slot)")
    return [p.strip() for p in parts]


def run_sweep(sweep: Sweep, dry_run: bool = False) -> list[dict[str, Any]]:
    """Execute every unfinished run (``parallel`` at a time, each its own process); one status row per run."""
    out = sweep.out.resolve()  # relative to where the sweep started, whatever a run does later
    runs = sweep.runs()
    if dry_run:
        return [_finished_row(name, out / name) or {"run": name, "state": "would run"} for name, _ in runs]
    out.mkdir(parents=True, exist_ok=True)
    slots: queue.Queue = queue.Queue()
    for slot in range(sweep.parallel):
        slots.put(sweep.gpus[slot % len(sweep.gpus)] if sweep.gpus else None)

    def one(name: str, settings: dict[str, Any]) -> dict[str, Any]:
        finished = _finished_row(name, out / name)
        if finished:
            return finished
        gpu = slots.get()
        try:
            return _execute_run(sweep, name, settings, out / name, gpu)
        finally:
            slots.put(gpu)

    rows: dict[str, dict[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=sweep.parallel) as pool:  # threads only wait on run processes
        futures = {pool.submit(one, name, settings): name for name, settings in runs}
        for done, future in enumerate(as_completed(futures), 1):
            row = rows[futures[future]] = future.result()
            print(f"[gxpo] sweep {done}/{len(runs)} {row['run']}: {row['state']}"
                  + "".join(f" {k}={_cell(row.get(k))}" for k in ("seconds", "final_pass@1") if k in row), flush=True)
    ordered = [rows[name] for name, _ in runs]
    atomic_write_text(out / "sweep_status.json", json.dumps(ordered, indent=2))
    return ordered


def _finished_row(name: str, folder: Path) -> dict[str, Any] | None:
    done = (folder / SUMMARY_FILE).exists()
    return {"run": name, "state": "skipped (finished)", **_summary(folder)} if done else None


def _execute_run(sweep: Sweep, name: str, settings: dict[str, Any], folder: Path, gpu: str | None) -> dict[str, Any]:
    """One run as its own process in its own folder, its output streamed to ``run.log`` there."""
    folder.mkdir(parents=True, exist_ok=True)
    parameters = {"preset": sweep.preset, **settings, "output_dir": str(folder)}  # a grid preset wins
    params_file = folder / "sweep_parameters.json"
    atomic_write_text(params_file, json.dumps(parameters, indent=2))
    env = run_environment(os.environ, sweep.parallel, gpu)
    command = _direct_command(parameters, folder) if sweep.direct else [
        sys.executable, "-m", "gxpo_lib", "execute", str(Path(sweep.notebook).resolve()), str(folder),
        "--parameters", str(params_file), "--timeout", str(sweep.timeout)]
    start = time.perf_counter()
    with (folder / "run.log").open("a", encoding="utf-8") as log:
        process = subprocess.run(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    seconds = round(time.perf_counter() - start, 1)
    if process.returncode == 0:
        return {"run": name, "state": "done", "seconds": seconds, **_summary(folder)}
    return {"run": name, "state": "failed", "seconds": seconds, "error": _last_error(folder / "run.log")}


def _direct_command(parameters: dict[str, Any], folder: Path) -> list[str]:
    """``python -m gxpo_lib run`` for one point (``--direct``): each setting as ``-s NAME=JSON``."""
    settings = {k: v for k, v in parameters.items() if k not in NOTEBOOK_PARAMETERS}
    launch = {k: v for k, v in parameters.items() if k in NOTEBOOK_PARAMETERS and k not in ("preset", "output_dir")}
    unsupported = sorted(set(launch) - {"backend", "num_processes", "progress", "fit"})
    if unsupported:
        raise ValueError(f"{unsupported[0]}: not available with --direct (run through notebook 03 instead)")
    command = [sys.executable, "-m", "gxpo_lib", "run", "--out", str(folder), "--no-figures",
               "--backend", str(launch.get("backend", "gxpo")), "--num-processes", str(launch.get("num_processes", 1))]
    if parameters.get("preset"):
        command += ["--preset", str(parameters["preset"])]
    if launch.get("progress") is False:
        command.append("--no-progress")
    if launch.get("fit"):
        command.append("--fit")
    for name, value in settings.items():
        command += ["-s", f"{name}={json.dumps(value)}"]
    return command


def run_environment(environ: Mapping[str, str], parallel: int, gpu: str | None,
                    cores: int | None = None) -> dict[str, str]:
    """A run's environment: ``CUDA_VISIBLE_DEVICES`` for its GPU slot; on the CPU, the cores shared out.

    ``parallel`` CPU runs that each start torch's default thread pool (one thread per core) oversubscribe
    the cores (a measured slowdown: docs/machine-notes.md). So each run gets
    ``OMP_NUM_THREADS = max(1, cores // parallel)`` unless the caller's environment sets it already.
    """
    env = dict(environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    elif "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (cores or os.cpu_count() or 1) // max(1, parallel)))
    return env


def _last_error(log: Path) -> str:
    """The last line of a failed run's log that names an error (else its last line)."""
    lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return ((errors or lines or ["no output"])[-1])[:300]


def _summary(folder: Path) -> dict[str, Any]:
    path = folder / SUMMARY_FILE
    if not path.exists():
        return {}
    summary = json.loads(path.read_text())
    return {k: summary.get(k) for k in SUMMARY_COLUMNS}


SUMMARY_COLUMNS = ("final_pass@1", "val_pass@1_peak", "shutoff_step", "cumulative_backward_passes")


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text summary table of a sweep."""
    columns = ["run", "state", "seconds", *SUMMARY_COLUMNS]
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    errors = [f"{r['run']}: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(lines + (["", "failures:"] + errors if errors else []))


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
