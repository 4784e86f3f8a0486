"""How the statistics are shown, derived from their declarations: the report's panels, the
summary table's columns, the report's comparisons, and block names made short.

Each quantity of :mod:`.statistics` declares where it shows (its ``chart``, ``cell`` and
``compare``); this module lays those out, so a new statistic appears in the table and the
report by its declaration alone. No torch, no Lightning.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .statistics import BlockInfo, BlockStats, Quantity, all_quantities

__all__ = [
    "PANEL_AXES", "Column", "Panel", "comparisons", "panels", "short_names", "summary_columns",
]


@dataclass(frozen=True)
class Panel:
    """A chart of the report's block figure: its title, section and axes."""

    title: str
    section: str
    ylim: tuple[float | None, float | None] | None = None
    log: bool = False


#: The axes of the report's panels that want more than the defaults (a panel a quantity
#: names in its ``chart`` and that is not listed here gets automatic axes).
PANEL_AXES: tuple[Panel, ...] = (
    Panel("router entropy", "router", (0.0, None)),
    Panel("branch usage (mean router weight)", "router", (0.0, 1.0)),
    Panel("mask mean", "mask", (0.0, 1.0)),
    Panel("mask std", "mask", (0.0, None)),
    Panel("mask saturation (share of values)", "mask", (0.0, 1.0)),
    Panel("head entropy (normalised: 0 one-hot, 1 uniform)", "heads", (0.0, 1.0)),
    Panel("attention sink (mass on the first key)", "heads", (0.0, 1.0)),
    Panel("gradient norms of the learnable parameters", "param", log=True),
)


@functools.cache
def panels() -> tuple[tuple[Panel, ...], ...]:
    """The report's panels of a block, one row per section (router, masks, parameters), in
    the order the quantities' charts name them."""
    axes = {p.title: p for p in PANEL_AXES}
    rows: dict[str, dict[str, Panel]] = {}
    for q in all_quantities():
        if q.chart is not None:
            rows.setdefault(q.group, {}).setdefault(
                q.chart.panel, axes.get(q.chart.panel, Panel(q.chart.panel, q.group)))
    return tuple(tuple(row.values()) for row in rows.values())


@dataclass(frozen=True)
class Column:
    """A column of the summary table: its title, the section it shows, and its cell;
    ``shown_for``: the column appears only when a block of the point has what it shows."""

    title: str
    section: str
    cell: Callable[[BlockStats, BlockInfo | None], str]
    justify: str = "left"
    shown_for: Callable[[BlockStats], bool] | None = None


def _mask_names(bs: BlockStats, info: BlockInfo | None) -> str:
    return "\n".join(bs.masks) or "-"


def _write(q: Quantity, value: float, undefined: bool = False, **names: str) -> str:
    # NaN from data that was finite is a statistic undefined for the point (the std of one
    # value): "n/a", not a number
    return "n/a" if undefined and math.isnan(value) else q.cell.format.format(value=value,
                                                                                **names)


def _items(section: str, bs: BlockStats) -> list:
    """The statistics a column shows one or more lines of: each mask, the router, the heads."""
    if section == "mask":
        return list(bs.masks.values())
    found = getattr(bs, section, None)
    return [] if found is None else [found]


def _cell_text(section: str, declared: tuple[Quantity, ...]):
    """The cell of one column: its quantities' values in one block's statistics. Quantities
    of one ``Cell.line`` share a line (joined by their ``join``); a per-branch quantity takes a
    line per branch."""
    lines_of: dict[int, list[Quantity]] = {}
    for q in declared:
        lines_of.setdefault(q.cell.line, []).append(q)

    def cell(bs: BlockStats, info: BlockInfo | None) -> str:
        lines: list[str] = []
        if section != "param":
            labels = (info.branch_names if info is not None else None) or tuple(
                f"b{k}" for k in range(bs.router.num_branches if bs.router else 0))
            for item in _items(section, bs):
                finite = not getattr(item, "nonfinite", 0)  # then a NaN is undefined: "n/a"
                for same in lines_of.values():
                    if any(q.per_branch for q in same):
                        lines += [_write(q, v, branch=label.replace(" ", "")) for q in same
                                  for label, v in zip(labels, getattr(item, q.name),
                                                      strict=False)]
                    else:
                        lines.append(same[0].cell.join.join(
                            _write(q, getattr(item, q.name), finite) for q in same))
        else:
            specs = bs.param_specs or (info.param_specs if info is not None else {})
            by_quantity = {"value": bs.params, "grad_norm": bs.grad_norms}
            for q in declared:
                lines += [_write(q, v, symbol=(specs[n].symbol if n in specs and specs[n].symbol
                                               else n))
                          for n, v in by_quantity[q.name].items()]
        return "\n".join(lines) or "-"

    return cell


@functools.cache
def summary_columns() -> tuple[Column, ...]:
    """The summary table's columns: one per :class:`~.statistics.Cell` column title declared
    on the quantities, in declaration order (router, masks, heads, parameters), with the
    masks' names before the first mask column."""
    columns: list[Column] = []
    by_title: dict[tuple[str, str], list[Quantity]] = {}
    for q in all_quantities():
        if q.cell is not None:
            by_title.setdefault((q.group, q.cell.column), []).append(q)
    for (section, title), declared in by_title.items():
        if section == "mask" and not any(c.section == "mask" for c in columns):
            columns.append(Column("mask", "mask", _mask_names))
        columns.append(Column(title, section, _cell_text(section, tuple(declared)),
                              declared[0].cell.justify,
                              # a column of a section few blocks have: only when one does
                              (lambda bs: bs.heads is not None) if section == "heads" else None))
    return tuple(columns)


@functools.cache
def comparisons() -> tuple[Quantity, ...]:
    """The quantities the report compares across runs (those declaring ``compare``)."""
    return tuple(q for q in all_quantities() if q.compare is not None)


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
