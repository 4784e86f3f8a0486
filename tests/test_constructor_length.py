"""Constructors that read like a config: no ``__init__`` in the package is longer than
:data:`MAX_INIT_LINES` lines (signature included), so that what a class is stays visible and
its argument checks live in one place of their own. Every ``__init__`` is found in the
source, none is listed by hand."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lightning_attn

MAX_INIT_LINES = 60
PACKAGE = Path(lightning_attn.__file__).parent


def _constructors() -> dict[str, int]:
    """``"path:Class"`` -> lines of its ``__init__`` (decorators and signature included)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ClassDef):
                continue
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    first = min([item.lineno, *(d.lineno for d in item.decorator_list)])
                    name = f"{path.relative_to(PACKAGE.parent).as_posix()}:{node.name}"
                    found[name] = item.end_lineno - first + 1
    return found


CONSTRUCTORS = _constructors()


def test_the_scan_sees_the_blocks_constructors() -> None:
    names = set(CONSTRUCTORS)
    assert "lightning_attn/blocks/coordinate.py:CoordinateAttention" in names
    assert "lightning_attn/blocks/dynamic_spatial.py:DynamicSpatialAttention" in names
    assert len(names) > 20


@pytest.mark.parametrize("name", sorted(CONSTRUCTORS))
def test_no_constructor_is_longer_than_the_limit(name: str) -> None:
    assert CONSTRUCTORS[name] <= MAX_INIT_LINES, (
        f"{name}.__init__ has {CONSTRUCTORS[name]} lines (limit {MAX_INIT_LINES}): move its "
        "checks into one helper or a frozen settings class, as the blocks do"
    )
