"""Where the package's shipped files and caches live, from a checkout or an installed wheel alike.

Shipped files (the synthetic task's splits, the tiny model, the notebooks, compact results) are package data
under ``gxpo_lib/shipped/`` read through `importlib.resources`; in a checkout those entries link to
``data/`` and ``notebooks/``, so both routes read the same files.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path


def shipped(*parts: str) -> Path:
    """A shipped file or folder, e.g. ``shipped("models", "tiny-llama-arith")``."""
    return Path(str(resources.files("gxpo_lib").joinpath("shipped", *parts)))


def checkout_root() -> Path | None:
    """The source checkout holding this package (a folder with pyproject.toml beside it), else None."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def cache_dir() -> Path:
    """Writable cache for converted weights: $GXPO_CACHE, else ``cache/`` in a checkout, else ~/.cache/gxpo."""
    if os.environ.get("GXPO_CACHE"):
        return Path(os.environ["GXPO_CACHE"])
    root = checkout_root()
    return root / "cache" if root is not None else Path.home() / ".cache" / "gxpo"
