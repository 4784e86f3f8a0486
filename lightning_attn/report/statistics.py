"""Logged scalars -> the callbacks' statistics dataclasses, so the report judges them with the
callbacks' own health rules.

:func:`stats_from_scalars` is the one place that knows how the dataclasses are built; it is
the inverse of :func:`lightning_attn.callbacks.tags.scalar_metrics` for training tags.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any

from ..callbacks import BlockStats, GlobalStats, MaskStats, RouterStats
from .reading import RunLog
from .series import GRAD_SUFFIX, PARAM, ROUTER, split_tag, usage_index

__all__ = ["stats_from_scalars", "training_points"]


def _build(cls: type, **values: Any) -> Any:
    """``cls(**values)`` with only the fields ``cls`` has (``min``/``max`` of a mask,
    ``trainable`` of a block exist in some versions of the dataclasses only)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def _bad(*values: float) -> int:
    return int(any(not math.isfinite(v) for v in values))


def stats_from_scalars(
    step: int,
    scalars: Mapping[str, float],
    trainable: Mapping[str, frozenset[str]] | None = None,
) -> GlobalStats:
    """The :class:`GlobalStats` of one training logging step, from its logged scalars.

    Args:
        step: the step.
        scalars: training tags (``attn/<block>/...``) -> value at ``step``; other tags are
            ignored.
        trainable: block -> names of its learnable parameters; by default the parameters
            with a ``_grad_norm`` tag in ``scalars``.

    Counts are not logged: each is 1, and ``nonfinite`` is 1 when a logged value of the
    mask / router is NaN or Inf, else 0 (what the health rules read is exact).
    """
    raw: dict[str, dict[str, dict[str, float]]] = {}
    for tag, value in scalars.items():
        split = split_tag(tag)
        if split is None or split[0] != "train":
            continue
        _, block, group, stat = split
        raw.setdefault(block, {}).setdefault(group, {})[stat] = float(value)
    blocks: dict[str, BlockStats] = {}
    for block, groups in raw.items():
        router = None
        masks: dict[str, MaskStats] = {}
        params: dict[str, float] = {}
        grads: dict[str, float] = {}
        for group, stats in groups.items():
            if group == ROUTER:
                branches = sorted(k for k in map(usage_index, stats) if k is not None)
                usage = tuple(stats[f"usage_{k}"] for k in branches)
                entropy = stats.get("entropy", math.nan)
                norm = stats.get("entropy_norm")
                if norm is None:
                    norm = entropy / math.log(len(usage)) if len(usage) > 1 else math.nan
                router = _build(
                    RouterStats, count=1, entropy=entropy, entropy_norm=norm, usage=usage,
                    nonfinite=_bad(*usage) if usage else _bad(norm),
                )
            elif group == PARAM:
                for name, value in stats.items():
                    if name.endswith(GRAD_SUFFIX):
                        grads[name[: -len(GRAD_SUFFIX)]] = value
                    else:
                        params[name] = value
            elif "mean" in stats and "std" in stats:
                masks[group] = _build(
                    MaskStats, count=1, mean=stats["mean"], std=stats["std"],
                    sat_low=stats.get("sat_low", 0.0), sat_high=stats.get("sat_high", 0.0),
                    min=stats.get("min", math.nan), max=stats.get("max", math.nan),
                    nonfinite=_bad(stats["mean"], stats["std"]),
                )
        learnable = (trainable or {}).get(block, frozenset(grads))
        blocks[block] = _build(
            BlockStats, masks=masks, router=router, params=params, grad_norms=grads,
            trainable=frozenset(learnable), forwards=1,
        )
    return GlobalStats(step=int(step), blocks=blocks)


def training_points(run: RunLog) -> Iterator[tuple[int, dict[str, float]]]:
    """``(step, {training tag: value})`` for every step with a training diagnostics scalar,
    in step order."""
    points: dict[int, dict[str, float]] = {}
    for tag, series in run.scalars.items():
        split = split_tag(tag)
        if split is None or split[0] != "train":
            continue
        for step, value in zip(series.steps, series.values, strict=True):
            points.setdefault(step, {})[tag] = value
    for step in sorted(points):
        yield step, points[step]
