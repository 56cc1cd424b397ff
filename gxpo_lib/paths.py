"""Where the package's shipped files and caches live, from a checkout or an installed wheel alike.

Shipped files (the synthetic task's splits, the tiny model, the notebooks, compact results) are package data
under ``gxpo_lib/shipped/`` read through `importlib.resources`; in a checkout those entries link to
``data/`` and ``notebooks/``, so both routes read the same files.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def shipped(*parts: str) -> Path:
    """A shipped file or folder, e.g. ``shipped("models", "tiny-llama-arith")``."""
    return Path(str(resources.files("gxpo_lib").joinpath("shipped", *parts)))
