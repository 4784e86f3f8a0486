"""Logged scalars -> the statistics of :mod:`lightning_attn.core.statistics`, so the report
judges them with the same rules as the callbacks.

:func:`stats_from_scalars` is the inverse of :func:`lightning_attn.core.tags.scalar_metrics`;
it knows nothing of the statistics beyond their declarations.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from ..core.statistics import (
    BlockInfo,
    BlockStats,
    GlobalStats,
    HeadStats,
    MaskStats,
    RouterStats,
    from_logged,
    quantities,
)
from ..core.tags import ScalarTag
from .reading import RunLog

__all__ = ["points", "stats_from_scalars"]


def stats_from_scalars(
    step: int,
    scalars: Mapping[str, float],
    infos: Mapping[str, BlockInfo] | None = None,
    phase: str = "train",
) -> GlobalStats:
    """The :class:`GlobalStats` of one point, from its logged scalars.

    Args:
        step: the step.
        scalars: tags of ``phase`` -> value at ``step``; other tags are ignored.
        infos: block -> its description in the run's configuration (learnable parameters,
            their ranges); without one, the parameters with a gradient-norm tag are taken as
            learnable and none has a declared range.
        phase: ``"train"``, ``"val"`` or ``"test"``.

    Counts are not logged: each is 1, and ``nonfinite`` is 1 when a logged value of the mask /
    router is NaN or Inf, else 0 (what the health rules read is exact).
    """
    logged: dict[str, dict[str, dict[str, Any]]] = {}
    for tag, value in scalars.items():
        parsed = ScalarTag.parse(tag)
        if parsed is None or parsed.stage != phase:
            continue
        group = logged.setdefault(parsed.block, {}).setdefault(parsed.group, {})
        if parsed.branch is not None:
            group.setdefault(parsed.quantity, {})[parsed.branch] = float(value)
        elif parsed.param is not None:
            group.setdefault(parsed.quantity, {})[parsed.param] = float(value)
        else:
            group[parsed.quantity] = float(value)
    router_fields = {q.name for q in quantities(RouterStats) if q.per_branch}
    blocks: dict[str, BlockStats] = {}
    for block, groups in logged.items():
        router, masks, params, grads, heads = None, {}, {}, {}, None
        for group, values in groups.items():
            if group == "heads":
                heads = from_logged(HeadStats, values)
            elif group == "router":
                for name in router_fields & set(values):
                    by_branch = values[name]
                    values[name] = tuple(by_branch[k] for k in sorted(by_branch))
                router = from_logged(RouterStats, values)
            elif group == "param":
                params, grads = values.get("value", {}), values.get("grad_norm", {})
            elif "mean" in values and "std" in values:
                masks[group] = from_logged(MaskStats, values)
        info = (infos or {}).get(block)
        trainable = info.trainable_names if info is not None else tuple(grads)
        blocks[block] = BlockStats(
            masks=masks, router=router, params=params, grad_norms=grads,
            trainable=frozenset(trainable), forwards=1,
            param_specs=dict(info.param_specs) if info is not None else {}, heads=heads,
        )
    return GlobalStats(step=int(step), blocks=blocks, phase=phase)


def points(run: RunLog, phase: str = "train") -> Iterator[tuple[int, dict[str, float]]]:
    """``(step, {tag: value})`` for every step with a diagnostics scalar of ``phase``, in step
    order."""
    by_step: dict[int, dict[str, float]] = {}
    for tag, series in run.scalars.items():
        parsed = ScalarTag.parse(tag)
        if parsed is None or parsed.stage != phase:
            continue
        for step, value in zip(series.steps, series.values, strict=True):
            by_step.setdefault(step, {})[tag] = value
    for step in sorted(by_step):
        yield step, by_step[step]
