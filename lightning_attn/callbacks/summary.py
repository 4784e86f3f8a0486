"""The ``rich`` summary table: every block's health at a glance, readable at 80 columns."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from rich import box
from rich.table import Table

from ..blocks.statistics import GlobalStats
from .health import PROBLEM_KINDS, Problem, ProblemReporter
from .maps import short_names
from .tags import BlockInfo

__all__ = ["render_summary"]

_PARAM_SYMBOLS = {"temperature": "T", "alpha": "α", "alpha_h": "α_h", "alpha_w": "α_w", "beta": "β"}


def _num(v: float, digits: int = 2) -> str:
    return f"{v:.{digits}f}" if math.isfinite(v) else str(v)


def render_summary(
    stats: GlobalStats,
    problems: Sequence[Problem],
    reported: Mapping[str, int],
    infos: Sequence[BlockInfo] = (),
    kinds: Sequence[str] = tuple(PROBLEM_KINDS),
    title: str | None = None,
) -> Table:
    """One row per block and mask: the router's normalised entropy and the usage of each
    labelled branch, each mask's mean ± std and saturation (low/high), the scalar
    parameters, and each warning kind's state: ``kind!`` (a problem at this step, red),
    ``kind@s`` (reported at step ``s``, fine now) or ``ok``.

    Block names are shortened to their shortest unique suffix (``attn1.block``); the title
    says so when they are.
    """
    names = list(stats.blocks)
    short = dict(zip(names, short_names(names), strict=True))
    branch_labels = {i.name: i.branch_names for i in infos}
    shortened = any(short[n] != n for n in names)
    table = Table(
        title=(title or f"Attention summary (step {stats.step})")
        + (" — blocks by shortest unique name" if shortened else ""),
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("block", style="bold", no_wrap=True, overflow="ellipsis", max_width=24)
    table.add_column("router\nH/logK", justify="left", no_wrap=True)
    table.add_column("mask", no_wrap=True)
    table.add_column("mean±std", justify="right", no_wrap=True)
    table.add_column("sat\nlo/hi", justify="right", no_wrap=True)
    table.add_column("params", no_wrap=True)
    table.add_column("warnings", no_wrap=True)
    active = {(p.block, p.kind) for p in problems}
    for block, bs in stats.blocks.items():
        r = bs.router
        router = "-"
        if r is not None:
            labels = branch_labels.get(block) or tuple(f"b{k}" for k in range(r.num_branches))
            router = "\n".join(
                [f"H {_num(r.entropy_norm)}"]
                + [f"{label.replace(' ', '')} {_num(u)}"
                   for label, u in zip(labels, r.usage, strict=False)]
            )
        masks = "\n".join(bs.masks) or "-"
        spread = "\n".join(f"{_num(m.mean)}±{_num(m.std)}" for m in bs.masks.values()) or "-"
        sat = "\n".join(f"{m.sat_low:.0%}/{m.sat_high:.0%}" for m in bs.masks.values()) or "-"
        params = "\n".join(f"{_PARAM_SYMBOLS.get(n, n)} {_num(v)}" for n, v in bs.params.items())
        states = []
        for kind in kinds:
            title_ = PROBLEM_KINDS[kind].title
            step = reported.get(ProblemReporter.key(block, kind))
            if (block, kind) in active:
                states.append(f"[bold red]{title_}![/]")
            elif step is not None:
                states.append(f"[yellow]{title_}@{step}[/]")
        table.add_row(
            short[block], router, masks, spread, sat, params or "-",
            "\n".join(states) or "[green]ok[/]",
        )
    return table
