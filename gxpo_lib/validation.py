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


def check_bool(name: str, value: Any) -> bool:
    """True or False (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        _fail(name, value, "true or false")
    return value


def check_nonnegative(name: str, value: Any) -> float:
    """A finite number >= 0."""
    if not _is_number(value) or value < 0:
        _fail(name, value, "a finite number >= 0")
    return float(value)


def check_unit_right(name: str, value: Any) -> float:
    """A number in (0, 1]."""
    if not _is_number(value) or not 0 < value <= 1:
        _fail(name, value, "a number in (0, 1]")
    return float(value)


def check_text(name: str, value: Any) -> str:
    """A non-empty string."""
    if not (isinstance(value, str) and value):
        _fail(name, value, "a non-empty string")
    return value


def check_names(name: str, value: Any, choices: Sequence[str] | None = None) -> tuple[str, ...]:
    """A list of non-empty names (each one of `choices` when given)."""
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) and v for v in value):
        _fail(name, value, "a list of names")
    for v in value if choices is not None else ():
        check_choice(name, v, choices)
    return tuple(value)


def check_levels(name: str, value: Any) -> tuple[int, ...]:
    """A non-empty list of integers >= 1."""
    if not (isinstance(value, (tuple, list)) and value and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
        _fail(name, value, "None or a list of integers >= 1")
    return tuple(value)


# Checks as values: each a callable (name, value) -> the checked value, raising ValueError naming the setting.
def choice(choices: Sequence[str]):
    return lambda name, value: check_choice(name, value, choices)


def integer(minimum: int):
    return lambda name, value: check_int(name, value, minimum=minimum)


def names(choices: Sequence[str] | None = None):
    return lambda name, value: check_names(name, value, choices)


def optional(check):
    """`check`, or None."""
    return lambda name, value: None if value is None else check(name, value)
