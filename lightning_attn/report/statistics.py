"""Logged scalars -> the statistics of :mod:`lightning_attn.core.statistics`, so the report
judges them with the same rules as the callbacks.

:func:`stats_from_scalars` is the inverse of :func:`lightning_attn.core.tags.scalar_metrics`;
it knows nothing of the statistics beyond their declarations.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from ..core.point import Items, ParamRows, PointColumns
from ..core.statistics import (
    BlockInfo,
    GlobalStats,
    HeadStats,
    MaskStats,
    ParameterSpec,
    RouterStats,
    logged_quantities,
    quantities,
)
from ..core.tags import ScalarTag
from .reading import RunLog, sorted_points

__all__ = ["LoggedPlan", "logged_columns", "logged_plan", "parse_tag", "points",
           "stats_from_scalars"]


@lru_cache(maxsize=65536)
def parse_tag(tag: str) -> ScalarTag | None:
    """:meth:`ScalarTag.parse`, remembered: a run logs the same tags at every point."""
    return ScalarTag.parse(tag)


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


#: Where one item's logged quantities are: quantity -> column of the matrix (a tuple of
#: columns, branch by branch, for a per-branch quantity).
_Where = dict[str, Any]


@dataclass(frozen=True)
class LoggedPlan:
    """Where each block's logged quantities sit among a point's tags (one plan for every
    point logging the same tags; see :func:`logged_plan`).

    ``names``: the blocks, in the order of their first tag; ``masks`` / ``routers`` /
    ``heads``: ``(block index, item name, where)`` of each item, grouped by what was logged of
    it (and by the router's number of branches); ``params``: ``(block index, name, value
    column, gradient norm column or -1, learnable, spec)``.
    """

    names: tuple[str, ...]
    masks: tuple[tuple[tuple[int, str, _Where], ...], ...]
    routers: tuple[tuple[int, tuple[tuple[int, str, _Where], ...]], ...]
    heads: tuple[tuple[tuple[int, str, _Where], ...], ...]
    params: tuple[tuple[int, str, int, int, bool, ParameterSpec | None], ...]


def _by_signature(items: list[tuple[int, str, _Where]]) -> tuple[tuple, ...]:
    """Items grouped by which quantities were logged (each group's columns are made, and
    the missing ones derived, at once), in the order of their first item."""
    groups: dict[tuple[str, ...], list] = {}
    for item in items:
        groups.setdefault(tuple(item[2]), []).append(item)
    return tuple(tuple(g) for g in groups.values())


def logged_plan(tags: tuple[str, ...], phase: str = "train",
                infos: Mapping[str, BlockInfo] | None = None) -> LoggedPlan:
    """The :class:`LoggedPlan` of the points logging ``tags`` (see :func:`stats_from_scalars`
    for ``infos`` and ``phase``)."""
    logged: dict[str, dict[str, dict[str, Any]]] = {}
    for i, block, group_name, quantity, sub in _plan(tags, phase):
        group = logged.setdefault(block, {}).setdefault(group_name, {})
        if sub is None:
            group[quantity] = i
        else:
            group.setdefault(quantity, {})[sub] = i
    masks, routers, heads, params = [], {}, [], []
    for b, (block, groups) in enumerate(logged.items()):
        info = (infos or {}).get(block)
        for group, where in groups.items():
            if group == "heads":
                heads.append((b, "", where))
            elif group == "router":
                for name, by_branch in where.items():
                    if isinstance(by_branch, dict):
                        where[name] = tuple(by_branch[k] for k in sorted(by_branch))
                k = len(where["usage"]) if "usage" in where else 0
                routers.setdefault(k, []).append((b, "", where))
            elif group == "param":
                grads = where.get("grad_norm", {})
                trainable = info.trainable_names if info is not None else tuple(grads)
                specs = info.param_specs if info is not None else {}
                params.extend((b, n, col, grads.get(n, -1), n in trainable, specs.get(n))
                              for n, col in where.get("value", {}).items())
            elif "mean" in where and "std" in where:
                masks.append((b, group, where))
    return LoggedPlan(tuple(logged), _by_signature(masks),
                      tuple((k, g) for k, items in routers.items() for g in _by_signature(items)),
                      _by_signature(heads), tuple(params))


def _items(stats_class: type, groups: Sequence[tuple[tuple[int, str, _Where], ...]],
           matrix: np.ndarray, blocks: int, width: int = 0) -> Items:
    """One :class:`Items` of every item of ``groups`` at every point (row) of ``matrix``:
    item ``i`` of point ``p`` belongs to pseudo-block ``p * blocks + b``."""
    points = len(matrix)
    parts: list[tuple[np.ndarray, tuple[str, ...], dict[str, np.ndarray]]] = []
    for items in groups:
        n = len(items)
        logged = {name: matrix[:, [where[name] for _, _, where in items]]
                  for name in items[0][2]}  # (points, n) or (points, n, K)
        cols = logged_quantities(stats_class, {name: v.reshape(points * n, *v.shape[2:])
                                               for name, v in logged.items()})
        block = (np.arange(points)[:, None] * blocks
                 + np.asarray([b for b, _, _ in items])[None, :]).reshape(-1)
        parts.append((block, tuple(name for _, name, _ in items) * points, cols))
    names = [q.name for q in quantities(stats_class)]
    if not parts:
        cols = {q.name: np.zeros((0, width) if q.per_branch or q.per_head else 0)
                for q in quantities(stats_class)}
        return Items(np.zeros(0, dtype=np.int64), (), cols, np.zeros(0, dtype=bool), width)
    block = np.concatenate([p[0] for p in parts])
    return Items(block, sum((p[1] for p in parts), ()) if stats_class is MaskStats else (),
                 {n: np.concatenate([p[2][n] for p in parts]) for n in names},
                 np.ones(len(block), dtype=bool), width)


def logged_columns(plan: LoggedPlan, matrix: np.ndarray) -> PointColumns:
    """The columns of several points logging the same tags, at once: ``matrix (points,
    tags)`` holds their values. Point ``p``'s block ``b`` is block ``p * len(plan.names) + b``
    of the result (its name repeats for every point), so that the rules judge every block of
    every point in one call each."""
    matrix = np.asarray(matrix, dtype=float)
    points, blocks = len(matrix), len(plan.names)
    routers = [_items(RouterStats, [g], matrix, blocks, k) for k, g in plan.routers]
    heads = [_items(HeadStats, [g], matrix, blocks) for g in plan.heads]
    p = plan.params
    cols = np.asarray([r[2] for r in p], dtype=np.int64)
    grad_cols = np.asarray([r[3] for r in p], dtype=np.int64)
    has_grad = np.broadcast_to(grad_cols >= 0, (points, len(p)))
    grads = np.where(has_grad, matrix[:, np.maximum(grad_cols, 0)] if len(p) else
                     np.zeros((points, 0)), math.nan)
    params = ParamRows(
        (np.arange(points)[:, None] * blocks
         + np.asarray([r[0] for r in p], dtype=np.int64)[None, :]).reshape(-1),
        tuple(r[1] for r in p) * points, matrix[:, cols].reshape(-1), grads.reshape(-1),
        has_grad.reshape(-1), np.tile(np.asarray([r[4] for r in p], dtype=bool), points),
        tuple(r[5] for r in p) * points)
    return PointColumns(plan.names * points, _items(MaskStats, plan.masks, matrix, blocks),
                        routers, heads, params, np.ones(points * blocks), histograms={})


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
    router is NaN or Inf, else 0 (what the health rules read is exact). The report judges
    many points at once the same way (:func:`logged_columns`).
    """
    plan = logged_plan(tuple(scalars), phase, infos)
    point = logged_columns(plan, np.asarray([list(scalars.values())], dtype=float))
    return point.stats(int(step), phase)


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
