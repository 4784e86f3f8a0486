"""AttentionSummary: a ``rich`` table of every block's health at the end of each training epoch."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import lightning.pytorch as pl
from rich.console import Console
from rich.table import Table

from .base import AttentionStatsCallback
from .health import PROBLEM_KINDS, HealthThresholds, Problem, ProblemReporter
from .statistics import GlobalStats

__all__ = ["AttentionSummary", "render_summary"]

_PARAM_SYMBOLS = {"temperature": "T", "alpha": "α", "alpha_h": "α_h", "alpha_w": "α_w", "beta": "β"}


def _num(v: float, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if math.isfinite(v) else str(v)


def render_summary(
    stats: GlobalStats,
    problems: Sequence[Problem],
    reported: Mapping[str, int],
    kinds: Sequence[str] = tuple(PROBLEM_KINDS),
    title: str | None = None,
) -> Table:
    """One row per block: router entropy (normalised), branch usage, each mask's std and
    saturation (low/high), the scalar parameters, and the state of each warning kind:
    ``ACTIVE`` (a problem at this step), ``warned @s`` (reported at step ``s``, fine now);
    kinds that are fine are summed up as ``ok``."""
    table = Table(title=title or f"Attention summary (step {stats.step})")
    table.add_column("block", style="bold", overflow="fold")
    table.add_column("entropy\n(norm)", justify="right")
    table.add_column("usage", justify="right")
    table.add_column("mask", justify="left")
    table.add_column("std", justify="right")
    table.add_column("sat\nlow/high", justify="right")
    table.add_column("params", justify="left")
    table.add_column("warnings", justify="left")
    active = {(p.block, p.kind) for p in problems}
    for block, bs in stats.blocks.items():
        r = bs.router
        entropy = f"{_num(r.entropy)}\n({_num(r.entropy_norm, 2)})" if r else "-"
        usage = "\n".join(_num(u, 2) for u in r.usage) if r else "-"
        names = "\n".join(bs.masks) or "-"
        std = "\n".join(_num(m.std) for m in bs.masks.values()) or "-"
        sat = "\n".join(f"{m.sat_low:.0%}/{m.sat_high:.0%}" for m in bs.masks.values()) or "-"
        params = "\n".join(f"{_PARAM_SYMBOLS.get(n, n)}={_num(v)}" for n, v in bs.params.items())
        states = []
        for kind in kinds:
            title_ = PROBLEM_KINDS[kind].title
            step = reported.get(ProblemReporter.key(block, kind))
            if (block, kind) in active:
                states.append(f"[bold red]{title_}: ACTIVE[/]")
            elif step is not None:
                states.append(f"[yellow]{title_}: warned @{step}[/]")
        table.add_row(
            block, entropy, usage, names, std, sat, params or "-",
            "\n".join(states) or "[green]ok[/]",
        )
    return table


class AttentionSummary(AttentionStatsCallback):
    """At the end of each training epoch, on global rank zero, prints a ``rich`` table.

    One row per block with the statistics of the epoch's last logging point: router entropy
    (and normalised), branch usage, std and saturation of each mask, the scalar parameters,
    and the state of each warning. It measures on logging steps like the monitors (nothing
    in between) but logs no scalars; by default it does not warn either (``on_problem``).

    Args:
        include, exclude: fnmatch patterns of block names to show / leave out.
        log_every_n_steps: ``None`` follows the Trainer; ``0`` never.
        std_threshold, saturation_low, saturation_high, saturation_threshold,
        router_collapse_threshold, router_indifference_threshold, indifference_warmup_steps,
        dead_branch_factor: the health thresholds (see :class:`~.health.HealthThresholds`).
        on_problem: ``"ignore"`` (default: only shown in the table), ``"warn"`` or ``"raise"``.
    """

    _log_scalars = False

    def __init__(
        self,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        log_every_n_steps: int | None = None,
        std_threshold: float = 0.02,
        saturation_low: float = 0.05,
        saturation_high: float = 0.95,
        saturation_threshold: float = 0.5,
        router_collapse_threshold: float = 0.1,
        router_indifference_threshold: float = 0.98,
        indifference_warmup_steps: int = 500,
        dead_branch_factor: float = 0.1,
        on_problem: str = "ignore",
    ) -> None:
        super().__init__(
            include=include,
            exclude=exclude,
            log_every_n_steps=log_every_n_steps,
            thresholds=HealthThresholds(
                std_threshold=std_threshold,
                saturation_low=saturation_low,
                saturation_high=saturation_high,
                saturation_threshold=saturation_threshold,
                router_collapse_threshold=router_collapse_threshold,
                router_indifference_threshold=router_indifference_threshold,
                indifference_warmup_steps=indifference_warmup_steps,
                dead_branch_factor=dead_branch_factor,
            ),
            on_problem=on_problem,
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        print_summary(self, trainer)


def print_summary(callback: AttentionStatsCallback, trainer: pl.Trainer) -> None:
    """Print ``callback``'s latest statistics as a table (global rank zero only)."""
    if not trainer.is_global_zero or not callback.block_names:
        return
    console = Console()
    stats = callback.last_stats
    epoch = trainer.current_epoch
    if stats is None:
        console.print(
            f"Attention summary (epoch {epoch}): no statistics yet - no logging step so far "
            "(see log_every_n_steps)"
        )
        return
    console.print(
        render_summary(
            stats,
            callback.last_problems,
            callback._reporter.reported,
            callback._kinds,
            title=f"Attention summary (epoch {epoch}, step {stats.step})",
        )
    )
