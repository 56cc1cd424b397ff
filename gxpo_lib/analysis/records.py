"""`Run`, one training run in memory (ours or the authors'), and the small value helpers the analysis
modules share."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Run:
    """One training run read from its folder, in our schema (see `gxpo_lib.analysis`).

    ``train`` and ``eval`` are lists of row dicts sorted by step; ``final_eval`` maps a benchmark to its
    pass@k results; ``config`` holds the run's settings as its config.json names them.
    """

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


def is_number(value) -> bool:
    """A finite int or float (numpy scalars included, bools not)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(float(value))


def by_step(rows: list[dict]) -> list[dict]:
    """Rows sorted by step (rows without one last)."""
    return sorted(rows, key=lambda r: (r.get("step") is None, r.get("step") or 0))


def hashable(value):
    """Lists (JSON's tuples) as tuples, so settings can key a dict."""
    if isinstance(value, list):
        return tuple(hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, hashable(v)) for k, v in value.items()))
    return value


def nan_if_none(value) -> float:
    return math.nan if value is None else float(value)


def mean_or_none(values: list) -> float | None:
    """The mean if every value is a finite number, else None."""
    numbers = [float(v) for v in values if is_number(v)]
    return float(np.mean(numbers)) if len(numbers) == len(values) and numbers else None
