"""Logged scalars -> the statistics of :mod:`lightning_attn.core.statistics`, so the report
judges them with the same rules as the callbacks.

:func:`stats_from_scalars` is the inverse of :func:`lightning_attn.core.tags.scalar_metrics`;
it knows nothing of the statistics beyond their declarations.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import lru_cache
from typing import Any

import numpy as np

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
from .reading import RunLog, sorted_points

__all__ = ["parse_tag", "points", "stats_from_scalars"]


@lru_cache(maxsize=65536)
def parse_tag(tag: str) -> ScalarTag | None:
    """:meth:`ScalarTag.parse`, remembered: a run logs the same tags at every point."""
    return ScalarTag.parse(tag)


@lru_cache(maxsize=1)
def _router_fields() -> frozenset[str]:
    return frozenset(q.name for q in quantities(RouterStats) if q.per_branch)


@lru_cache(maxsize=1024)
def _plan(tags: tuple[str, ...], phase: str) -> tuple[tuple[int, str, str, str, Any], ...]:
    """``(index, block, group, quantity, branch or parameter)`` of each tag of ``phase``
    among ``tags`` (a run logs the same tags at every point: worked out once)."""
    out = []
    for i, tag in enumerate(tags):
        parsed = parse_tag(tag)
        if parsed is not None and parsed.stage == phase:
            sub = parsed.branch if parsed.branch is not None else parsed.param
            out.append((i, parsed.block, parsed.group, parsed.quantity, sub))
    return tuple(out)


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
    values_ = list(scalars.values())
    for i, block, group_name, quantity, sub in _plan(tuple(scalars), phase):
        by_group = logged.get(block)
        if by_group is None:
            by_group = logged[block] = {}
        group = by_group.get(group_name)
        if group is None:
            group = by_group[group_name] = {}
        if sub is None:
            group[quantity] = float(values_[i])
        else:
            group.setdefault(quantity, {})[sub] = float(values_[i])
    router_fields = _router_fields()
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
    order, from the run's series (each must hold every point: see :attr:`RunLog.exact`)."""
    names, steps, values = [], [], []
    for tag, series in run.scalars.items():
        parsed = parse_tag(tag)
        if parsed is None or parsed.stage != phase:
            continue
        s, v = series.arrays()
        names.append(tag)
        steps.append(s)
        values.append(v)
    if not names:
        return
    which = np.repeat(np.arange(len(names)), [len(s) for s in steps])
    yield from sorted_points(names, which, np.concatenate(steps), np.concatenate(values))
