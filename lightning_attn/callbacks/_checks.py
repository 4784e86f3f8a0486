"""Argument checks shared by the callbacks' constructors (each names the bad argument)."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["check_fraction", "check_interval", "check_on_problem", "check_patterns"]

ON_PROBLEM = ("warn", "raise", "ignore")


def check_interval(
    name: str, value: object, allow_none: bool = False, minimum: int = 0
) -> int | None:
    """An integer step/epoch interval ``>= minimum`` (``None`` allowed when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_fraction(name: str, value: object) -> float:
    """A finite number in ``[0, 1]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return value


def check_on_problem(value: object) -> str:
    if value not in ON_PROBLEM:
        raise ValueError(f"on_problem must be one of {ON_PROBLEM}, got {value!r}")
    return str(value)


def check_patterns(name: str, value: object, allow_none: bool) -> tuple[str, ...] | None:
    """A sequence of fnmatch patterns (a single string is taken as one pattern)."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Sequence) or not all(isinstance(p, str) and p for p in value):
        raise ValueError(f"{name} must be a sequence of non-empty fnmatch patterns, got {value!r}")
    return tuple(value)
