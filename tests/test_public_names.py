"""Each public name has one home, and the offline parts import neither Lightning nor torch."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from collections import defaultdict

import pytest

import lightning_attn


def _packages() -> list[str]:
    return ["lightning_attn"] + [
        f"lightning_attn.{m.name}" for m in pkgutil.iter_modules(lightning_attn.__path__)
        if m.ispkg
    ]


def test_every_public_name_is_exported_by_one_package() -> None:
    homes: dict[str, list[str]] = defaultdict(list)
    for package in _packages():
        for name in importlib.import_module(package).__all__:
            homes[name].append(package)
    assert len(homes) > 80  # the check sees the whole public surface
    assert {n: h for n, h in homes.items() if len(h) > 1} == {}


def test_an_old_root_name_says_where_it_lives_now() -> None:
    for name, home in lightning_attn._MOVED.items():
        assert name in importlib.import_module(home).__all__
        with pytest.raises(AttributeError, match=f"from {home} import {name}"):
            getattr(lightning_attn, name)
    assert getattr(lightning_attn, "CoordinateAttention", None) is None  # probes stay quiet
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'$"):
        lightning_attn.nothing_here  # noqa: B018


@pytest.mark.parametrize("module", ["lightning_attn.core", "lightning_attn.report"])
def test_the_offline_parts_import_neither_lightning_nor_torch(module: str) -> None:
    code = (f"import sys, {module}; "
            "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
