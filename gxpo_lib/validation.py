"""Argument checks that fail early with a message naming the setting, its value and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{name}={value!r} is invalid: allowed {allowed}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_positive(name: str, value: Any) -> float:
    """A finite number > 0."""
    if not _is_number(value) or value <= 0:
        _fail(name, value, "a finite number > 0")
    return float(value)


def check_open_unit(name: str, value: Any) -> float:
    """A number in the open interval (0, 1)."""
    if not _is_number(value) or not 0 < value < 1:
        _fail(name, value, "a number in the open interval (0, 1)")
    return float(value)


def check_int(name: str, value: Any, minimum: int) -> int:
    """An integer >= minimum (bools are rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(name, value, f"an integer >= {minimum}")
    return int(value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """One of a fixed set of names."""
    if value not in choices:
        _fail(name, value, "one of " + ", ".join(repr(c) for c in choices))
    return value


def check_optional_positive(name: str, value: Any) -> float | None:
    """None, or a finite number > 0."""
    return None if value is None else check_positive(name, value)


def check_interval(name: str, value: Any) -> tuple[float, float]:
    """A pair (low, high) of finite numbers with low < high."""
    ok = (isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_number(v) for v in value)
          and value[0] < value[1])
    if not ok:
        _fail(name, value, "a pair (low, high) of finite numbers with low < high")
    return float(value[0]), float(value[1])
