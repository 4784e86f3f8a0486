"""The ``rich`` summary table: every block's health at a glance, readable at 80 columns.

Its columns are :func:`lightning_attn.core.presentation.summary_columns` (declared on the
quantities) and the titles of the
problem kinds; this module only lays them out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from rich import box
from rich.table import Table

from ..core.presentation import short_names, summary_columns
from ..core.problems import PROBLEM_KINDS, Problem
from ..core.statistics import SECTIONS, BlockInfo, GlobalStats
from .health import ProblemReporter

__all__ = ["render_summary"]


def render_summary(
    stats: GlobalStats,
    problems: Sequence[Problem],
    reported: Mapping[str, int],
    infos: Sequence[BlockInfo] = (),
    kinds: Sequence[str] = tuple(PROBLEM_KINDS),
    title: str | None = None,
    sections: Iterable[str] = SECTIONS,
) -> Table:
    """One row per block: a cell per column of ``summary_columns()`` in ``sections`` (one line
    per mask or branch), and each warning kind's state: ``kind!`` (a problem at this step,
    red), ``kind@s`` (reported at step ``s``, fine now) or ``ok``.

    Block names are shortened to their shortest unique suffix (``attn1.block``); the title
    says so when they are.
    """
    names = list(stats.blocks)
    short = short_names(names)
    by_name = {i.name: i for i in infos}
    shortened = any(short[n] != n for n in names)
    table = Table(
        title=(title or f"Attention summary (step {stats.step})")
        + (" — blocks by shortest unique name" if shortened else ""),
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    columns = [c for c in summary_columns() if c.section in set(sections) and (
        c.shown_for is None or any(map(c.shown_for, stats.blocks.values())))]
    table.add_column("block", style="bold", no_wrap=True, overflow="ellipsis", max_width=24)
    for column in columns:
        table.add_column(column.title, justify=column.justify, no_wrap=True)
    table.add_column("warnings", no_wrap=True)
    active = {(p.block, p.kind) for p in problems}
    for block, bs in stats.blocks.items():
        states = []
        for kind in kinds:
            word = PROBLEM_KINDS[kind].title
            step = reported.get(ProblemReporter.key(block, kind))
            if (block, kind) in active:
                states.append(f"[bold red]{word}![/]")
            elif step is not None:
                states.append(f"[yellow]{word}@{step}[/]")
        table.add_row(
            short[block], *(c.cell(bs, by_name.get(block)) for c in columns),
            "\n".join(states) or "[green]ok[/]",
        )
    return table
