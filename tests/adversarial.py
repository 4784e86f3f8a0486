"""The row of an adversarial table, shared by every table (blocks, insert_attention, the
callback): an input, what it should give, and how to check it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    """``clear``: ``run()`` raises ``error`` with every needle in its message; ``correct``:
    ``check(run())`` holds. ``run`` takes the test's ``tmp_path`` where ``takes_path``."""

    id: str
    run: Callable[..., object]
    outcome: str  # "clear" | "correct"
    error: type[BaseException] | None = None
    needles: tuple[str, ...] = ()
    check: Callable[[object], bool] | None = None


def clear(id: str, run: Callable[[], object], error: type, *needles: str) -> Case:
    return Case(id, run, "clear", error, needles)


def correct(id: str, run: Callable[..., object], check: Callable[[object], bool]) -> Case:
    return Case(id, run, "correct", check=check)
