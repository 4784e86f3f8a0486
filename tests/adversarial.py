"""The row of an adversarial table, shared by every table (blocks, insert_attention, the
callback): an input, what it should give, and how to check it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest


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


def assert_outcome(case: Case, *args: object, one_line: bool = False) -> None:
    """Run ``case`` (with ``args``) and check it gives its outcome: the error with every
    needle in its message (on one line with ``one_line``), or a result ``check`` accepts."""
    if case.outcome == "clear":
        with pytest.raises(case.error) as err:
            case.run(*args)
        message = str(err.value)
        for needle in case.needles:
            assert needle in message, f"{needle!r} not in {message!r}"
        if one_line:
            assert "\n" not in message.strip()
    else:
        assert case.outcome == "correct"
        assert case.check(case.run(*args))
