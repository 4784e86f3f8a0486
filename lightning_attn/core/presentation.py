"""How the statistics are shown: the report's panels, the charts quantities are drawn on,
the summary table's columns, and block names made short.

Declarations only (no torch, no Lightning): :mod:`.statistics` attaches a :class:`Chart` to
each quantity; the callbacks' table and the offline report lay these out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .statistics import BlockInfo, BlockStats

__all__ = ["PANELS", "SUMMARY_COLUMNS", "Chart", "Column", "Panel", "short_names"]


@dataclass(frozen=True)
class Panel:
    """A chart of the report's block figure: its title, section and axes."""

    title: str
    section: str
    ylim: tuple[float | None, float | None] | None = None
    log: bool = False


#: The report's panels of a block, in rows (router, masks, heads, parameters).
PANELS: tuple[tuple[Panel, ...], ...] = (
    (Panel("router entropy", "router", (0.0, None)),
     Panel("branch usage (mean router weight)", "router", (0.0, 1.0))),
    (Panel("mask mean", "mask", (0.0, 1.0)),
     Panel("mask std", "mask", (0.0, None)),
     Panel("mask saturation (share of values)", "mask", (0.0, 1.0))),
    (Panel("head entropy (normalised: 0 one-hot, 1 uniform)", "heads", (0.0, 1.0)),
     Panel("max attention logit", "heads"),
     Panel("attention sink (mass on the first key)", "heads", (0.0, 1.0))),
    (Panel("parameters", "param"),
     Panel("gradient norms of the learnable parameters", "param", log=True)),
)


@dataclass(frozen=True)
class Chart:
    """Where a quantity is drawn: its panel's title and the curve's label (a format string
    over ``{mask}``, ``{branch}``, ``{param}`` and the thresholds' fields); ``band``:
    ``"low"``/``"high"`` draws it as the edge of a shaded band instead of a curve."""

    panel: str
    label: str
    band: str | None = None



def _num(v: float, digits: int = 2) -> str:
    return f"{v:.{digits}f}" if math.isfinite(v) else str(v)


@dataclass(frozen=True)
class Column:
    """A column of the summary table: its title, the section it shows, and its cell;
    ``shown_for``: the column appears only when a block of the point has what it shows."""

    title: str
    section: str
    cell: Callable[[BlockStats, BlockInfo | None], str]
    justify: str = "left"
    shown_for: Callable[[BlockStats], bool] | None = None


def _router_cell(bs: BlockStats, info: BlockInfo | None) -> str:
    r = bs.router
    if r is None:
        return "-"
    names = info.branch_names if info is not None else None
    labels = names or tuple(f"b{k}" for k in range(r.num_branches))
    return "\n".join([f"H {_num(r.entropy_norm)}"] + [
        f"{label.replace(' ', '')} {_num(u)}" for label, u in zip(labels, r.usage, strict=False)
    ])


def _params_cell(bs: BlockStats, info: BlockInfo | None) -> str:
    specs = bs.param_specs or (info.param_specs if info is not None else {})
    return "\n".join(
        f"{(specs[n].symbol if n in specs and specs[n].symbol else n)} {_num(v)}"
        for n, v in bs.params.items()
    ) or "-"


def _heads_cell(bs: BlockStats, info: BlockInfo | None) -> str:
    h = bs.heads
    if h is None:
        return "-"
    return (f"H {_num(h.entropy_min)}/{_num(h.entropy_mean)}\nlogit {_num(h.max_logit, 1)}"
            f"\nsink {_num(h.sink_max)}")


#: The summary table: one row per block (one line per mask / branch inside a cell).
SUMMARY_COLUMNS: tuple[Column, ...] = (
    Column("router\nH/logK", "router", _router_cell),
    Column("mask", "mask", lambda bs, info: "\n".join(bs.masks) or "-"),
    Column("mean±std", "mask", lambda bs, info: "\n".join(
        f"{_num(m.mean)}±{_num(m.std)}" for m in bs.masks.values()) or "-", "right"),
    Column("sat\nlo/hi", "mask", lambda bs, info: "\n".join(
        f"{m.sat_low:.0%}/{m.sat_high:.0%}" for m in bs.masks.values()) or "-", "right"),
    Column("heads\nH min/mean", "heads", _heads_cell,
           shown_for=lambda bs: bs.heads is not None),
    Column("params", "param", _params_cell),
)


def short_names(names: Sequence[str]) -> dict[str, str]:
    """Each block name without the dotted prefix all names share, keeping at least two parts
    where a name has them (one part, like ``block`` or ``se``, rarely says which block it is).

    Unique whenever the names are, and cut at one place for all: ``net.blocks.5.2.se``,
    ``net.blocks.5.3.se``, ``net.blocks.6.0.se`` -> ``5.2.se``, ``5.3.se``, ``6.0.se`` (never
    ``3.se`` beside ``5.2.se``); ``net.features.attn1.block`` alone -> ``attn1.block``.
    """
    parts = [n.split(".") for n in names]
    shared = 0
    if parts:
        shortest = min(len(p) for p in parts)
        while shared < shortest - 2 and len({p[shared] for p in parts}) == 1:
            shared += 1
    return {n: ".".join(p[shared:]) for n, p in zip(names, parts, strict=True)}
