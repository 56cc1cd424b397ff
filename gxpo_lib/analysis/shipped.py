"""Shipped results: finished runs in a compact form, read back as run folders without training anything.

A run folder holds checkpoints, an executed notebook and every per-step diagnostic (hundreds of KB to
MB). Its compact form keeps what `gxpo_lib.analysis` and the notebooks draw and conclude from:

- ``config.json`` under today's setting names (`runlog.current_settings`: a folder written by older code is
  re-exported, never translated when read), ``final_eval.json`` and ``run_summary.json`` as they are;
- ``metrics.jsonl`` with every ``eval`` and ``final_eval`` row whole, and the ``train`` rows cut to
  `TRAIN_KEYS` (x-values, rewards, the gate, the mechanism and the diagnostics panels); values unrounded,
  so tables and figures drawn from a compact run equal those drawn from the original folder.

A 40-step run takes about 20-40 KB. The compact form *is* a run folder, so replaying is loading:

    export_runs("runs/seed-study", "data/results/seed-study", meta={"machine": "..."})   # once, by hand
    runs = analysis.load_runs(shipped_results("seed-study"))                          # in a notebook

``shipped_results(name)`` finds ``data/results/<name>`` in a checkout and the same files in an installed
wheel. Each study folder also holds ``replay.json`` (the runs, the ones left out and how they were made).

Command line: ``python -m gxpo_lib.analysis.shipped export SOURCE OUT [--meta JSON]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from gxpo_lib.paths import shipped
from gxpo_lib.rl import runlog

# Train-row keys kept: what analysis's curves, tables, mechanism summary and diagnostics panels read.
TRAIN_KEYS = ("kind", "step", "k", "alpha", "tau", "r_clamp", "reward_mean", "accuracy",
              "backward_passes", "cumulative_backward_passes", "seconds", "cpu_seconds", "active", "fallback",
              "skipped", "gate_open", "gate_z", "grad_norm", "r_mean", "r_std", "scale_mean", "scale_max",
              "effective_multiplier", "cos_g0_g1", "cos_g0_gslow", "jump_norm", "param_norm",
              "inactive_frac", "ratio_clip_frac", "update_norm", "probe_step_norm", "disp2_norm",
              "corrective_norm")
INDEX_FILE = "replay.json"
RUN_FILES = (runlog.FINAL_EVAL_FILE, runlog.SUMMARY_FILE)

def compact_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """metrics.jsonl rows in their compact form: train rows cut to `TRAIN_KEYS` (an older row's r_min and
    r_max as today's r_clamp), the others whole."""
    out = []
    for row in rows:
        if row.get("kind") == "train":
            if "r_min" in row and "r_clamp" not in row:
                row = row | {"r_clamp": None if row["r_min"] is None else [row["r_min"], row["r_max"]]}
            row = {k: row[k] for k in TRAIN_KEYS if k in row}
        out.append(row)
    return out


def export_run(folder: Path | str, out_dir: Path | str, name: str | None = None) -> Path:
    """Write the compact form of one finished run folder to ``out_dir/<name>`` (default: its own name).

    A run is finished when its train rows reach the ``steps`` of its config.json (a run without a final
    evaluation, ``final_eval_sets=[]``, is exported without one). Raises ValueError for an unfinished
    folder. Returns the compact folder.
    """
    folder = Path(folder)
    rows = runlog.read_rows(folder)
    last = max((r.get("step", 0) for r in rows if r.get("kind") == "train"), default=0)
    steps = runlog.read_config(folder).get("steps")
    if not last or (steps is not None and last < steps):
        raise ValueError(f"run folder {str(folder)!r} is invalid here: not a finished run (train rows up to "
                         f"step {last} of {steps})")
    target = Path(out_dir) / (name or folder.name)
    target.mkdir(parents=True, exist_ok=True)
    # one JSON object per line, keys in the original order, values untouched (exact replays)
    text = "".join(json.dumps(row, allow_nan=False) + "\n" for row in compact_rows(rows))
    runlog.atomic_write_text(target / runlog.METRICS_FILE, text)
    runlog.write_config(target, runlog.current_settings(runlog.read_config(folder)))
    for file in RUN_FILES:
        if (folder / file).is_file():
            runlog.atomic_write_text(target / file, (folder / file).read_text(encoding="utf-8"))
    return target


def export_runs(sources: str | Path | Iterable[str | Path], out_dir: Path | str,
                meta: dict[str, Any] | None = None) -> list[Path]:
    """Export every finished run that `sources` names (as `analysis.resolve_run_dirs` reads it) to `out_dir`.

    Unfinished runs are skipped and listed in ``out_dir/replay.json`` with the exported ones and `meta`
    (machine, load, command, what is missing). Returns the compact folders written.
    """
    from gxpo_lib.analysis import resolve_run_dirs

    written, unfinished = [], []
    for folder in resolve_run_dirs(sources):
        try:
            written.append(export_run(folder, out_dir))
        except ValueError:
            unfinished.append(folder.name)
    if not written:
        raise ValueError(f"sources={sources!r} is invalid: no finished run among {len(unfinished)} folder(s)")
    index = {"runs": [p.name for p in written], "unfinished": unfinished, **(meta or {})}
    runlog.atomic_write_text(Path(out_dir) / INDEX_FILE, json.dumps(index, indent=1) + "\n")
    return written


def shipped_results(name: str) -> Path:
    """The folder of a shipped study (``"nb02"``, ``"seed-study"``): compact run folders inside."""
    folder = shipped("results", name)
    if not (folder / INDEX_FILE).is_file():
        available = sorted(p.name for p in shipped("results").iterdir() if (p / INDEX_FILE).is_file()) \
            if shipped("results").is_dir() else []
        raise ValueError(f"name={name!r} is invalid: allowed a shipped study, one of {available}")
    return folder


def read_index(folder: Path | str) -> dict[str, Any]:
    """A study folder's ``replay.json``: the runs, those left out, and how they were made."""
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        raise ValueError(f"folder={str(folder)!r} is invalid: it holds no {INDEX_FILE} (not an exported study)")
    return json.loads(path.read_text(encoding="utf-8"))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gxpo_lib.analysis.shipped export SOURCE OUT [--meta JSON]``."""
    parser = argparse.ArgumentParser(prog="python -m gxpo_lib.analysis.shipped", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="run folders -> compact run folders")
    export.add_argument("source", help="a run folder, a folder of run folders, or a glob")
    export.add_argument("out", help="the folder to write the compact runs to")
    export.add_argument("--meta", default="{}", help="JSON object stored in replay.json (machine, load, ...)")
    args = parser.parse_args(argv)
    written = export_runs(args.source, args.out, meta=json.loads(args.meta))
    size = sum(f.stat().st_size for p in written for f in p.iterdir())
    print(f"[gxpo] {len(written)} runs -> {args.out} ({size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
