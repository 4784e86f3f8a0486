"""One point's statistics of every block, as columns: one computation for all modules.

A training point of a model with hundreds of attention modules is read as a handful of
array operations, whatever the number of modules:

* :class:`PointPlan` (built once per run, from the blocks' layouts) says where every slot of
  every block sits in the vector the collector reads in one host copy: index arrays per group
  of items (every mask of every block; the routers of each width ``K``; the head groups of
  each ``H``), the parameters and gradient norms.
* :class:`PointColumns` (one per point) gathers each group's slots with one fancy index and
  computes each declared quantity once for the whole group (:func:`~.statistics.columns`).
  The rules (:mod:`.problems`) and the scalars (:func:`~.tags.scalar_columns`) read the
  columns.
* :class:`LazyBlocks` gives the per-block view (:class:`~.statistics.BlockStats`) only for
  the blocks asked for (the summary table, ``diagnostics.last_stats.blocks[name]``).

``PointColumns.of_blocks`` makes the same columns from :class:`~.statistics.BlockStats`
objects (the report reads a run's logged scalars that way): one set of rules for both.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .statistics import (
    HEAD_SLOTS,
    MASK_SLOTS,
    ROUTER_SLOTS,
    SIMPLEX_TOLERANCE,
    BlockInfo,
    BlockStats,
    GlobalStats,
    HeadStats,
    MaskStats,
    ParameterSpec,
    RouterStats,
    Slot,
    StatisticsLayout,
    _Slots,
    columns,
    materialize,
    quantities,
    slot_width,
)

__all__ = ["Items", "LazyBlocks", "ParamRows", "PointColumns", "PointPlan", "breaches"]

@dataclass(frozen=True)
class Items:
    """One group of items of a point: every mask of every block, or the routers of ``K``
    branches, or the head groups of ``H`` heads.

    Attributes:
        block: ``(n,)`` the index of each item's block.
        names: each item's mask name (masks), else empty.
        cols: quantity name -> column ``(n,)`` (``(n, K)`` / ``(n, H)`` per branch / head).
        present: ``(n,)`` whether the item recorded anything at this point.
        width: ``K`` or ``H`` (``0`` for masks).
    """

    block: np.ndarray
    names: tuple[str, ...]
    cols: dict[str, np.ndarray]
    present: np.ndarray
    width: int = 0

    def __len__(self) -> int:
        return len(self.block)


@dataclass(frozen=True)
class ParamRows:
    """Every scalar parameter of every block: one row each.

    ``value``, ``grad`` (NaN where none was read: ``has_grad`` says which), ``trainable``,
    and what its block declares (``spec``, ``None`` if nothing).
    """

    block: np.ndarray
    names: tuple[str, ...]
    value: np.ndarray
    grad: np.ndarray
    has_grad: np.ndarray
    trainable: np.ndarray
    specs: tuple[ParameterSpec | None, ...]

    def __len__(self) -> int:
        return len(self.block)


def _group_slots(host: np.ndarray, index: np.ndarray, declared: Sequence[Slot],
                 width: int, heads: int) -> _Slots:
    """The slot columns of a group of items from the read vector: ``index (n, entries)``."""
    entries = sum(slot_width(slot, width, heads) for slot in declared)
    table = host[index] if len(index) else np.zeros((0, entries))
    out, pos = {}, 0
    for slot in declared:
        w = slot_width(slot, width, heads)
        out[slot.name] = table[:, pos:pos + w] if slot.per_branch or slot.per_head else (
            table[:, pos])
        pos += w
    return _Slots(out)


@dataclass
class _Group:
    """Where one group's items are: their blocks, names, and slot indices in the vector."""

    blocks: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    rows: list[np.ndarray] = field(default_factory=list)

    def frozen(self) -> tuple[np.ndarray, tuple[str, ...], np.ndarray]:
        width = len(self.rows[0]) if self.rows else 0
        index = np.stack(self.rows) if self.rows else np.zeros((0, width), dtype=np.int64)
        return np.asarray(self.blocks, dtype=np.int64), tuple(self.names), index


class PointPlan:
    """Where every block's slots, parameters and gradient norms sit in the collector's read
    vector (one row per block, in block order, then every parameter, then every learnable
    parameter's gradient norm on a training point). Fixed for a run: built again only when a
    layout changes.

    Args:
        infos: the watched blocks, in order.
        layouts: their layouts now (another consumer may have widened one since binding).
    """

    def __init__(self, infos: Sequence[BlockInfo], layouts: Sequence[StatisticsLayout]) -> None:
        self.infos = tuple(infos)
        self.layouts = tuple(layouts)
        self.names = tuple(info.name for info in infos)
        masks, routers, heads = _Group(), {}, {}
        base, bases = 0, []
        for b, layout in enumerate(layouts):
            bases.append(base)
            for name, off in layout.mask_offsets.items():
                masks.blocks.append(b)
                masks.names.append(name)
                masks.rows.append(base + off + np.arange(len(MASK_SLOTS)))
            k, h = layout.num_branches or 0, layout.num_heads or 0
            if layout.router_offset is not None:
                group = routers.setdefault(k, _Group())
                group.blocks.append(b)
                width = sum(slot_width(s, k) for s in ROUTER_SLOTS)
                group.rows.append(base + layout.router_offset + np.arange(width))
            if layout.head_offset is not None:
                group = heads.setdefault(h, _Group())
                group.blocks.append(b)
                width = sum(slot_width(s, 0, h) for s in HEAD_SLOTS)
                group.rows.append(base + layout.head_offset + np.arange(width))
            base += layout.size
        self.bases = np.asarray(bases, dtype=np.int64)
        self.rows_size = base
        self.masks = masks.frozen()
        self.routers = {k: g.frozen() for k, g in routers.items()}
        self.heads = {h: g.frozen() for h, g in heads.items()}
        params = [(b, n) for b, info in enumerate(infos) for n in info.param_names]
        self.param_block = np.asarray([b for b, _ in params], dtype=np.int64)
        self.param_names = tuple(n for _, n in params)
        self.param_trainable = np.asarray(
            [n in infos[b].trainable_names for b, n in params], dtype=bool)
        self.param_specs = tuple(infos[b].param_specs.get(n) for b, n in params)
        # the gradient norms follow the parameters: one per learnable parameter, in order
        trainable = [(b, n) for b, info in enumerate(infos) for n in info.trainable_names]
        where = {key: i for i, key in enumerate(params)}
        self.grad_rows = np.asarray([where.get(key, -1) for key in trainable], dtype=np.int64)
        # where the parameters and the gradient norms sit in the vector
        self.param_index = base + np.arange(len(params), dtype=np.int64)
        self.grad_index = base + len(params) + np.arange(len(trainable), dtype=np.int64)
        #: the scalars' tags by (stage, sections), made on the run's first point of each
        self.tags: dict = {}
        self._tiled: dict[tuple[int, int], PointPlan] = {}

    @property
    def num_grads(self) -> int:
        return len(self.grad_rows)

    @property
    def num_blocks(self) -> int:
        return len(self.names)

    def tiled(self, points: int, stride: int) -> PointPlan:
        """The plan of ``points`` read vectors of ``stride`` entries each, laid end to end
        (a ``(points, stride)`` array, flattened), read as one point whose blocks are every
        point's blocks in turn: block ``b`` of point ``p`` is block ``p * num_blocks + b``.
        The collector reads a batch of training points this way (one host copy, one run of
        the rules); :meth:`PointColumns.split` cuts the columns back into points. Index
        arithmetic only; the latest two are kept."""
        key = (points, stride)
        found = self._tiled.get(key)
        if found is not None:
            return found
        if len(self._tiled) >= 2:
            self._tiled.clear()
        blocks = self.num_blocks
        at = np.arange(points, dtype=np.int64)[:, None]
        step, shift = at * stride, at * blocks

        def group(g: tuple[np.ndarray, tuple[str, ...], np.ndarray]) -> tuple:
            block, names, index = g
            return ((block[None, :] + shift).reshape(-1), names * points,
                    (index[None] + step[:, :, None]).reshape(points * len(index), -1)
                    if len(index) else index)

        tiled = copy.copy(self)
        tiled.infos, tiled.layouts = self.infos * points, self.layouts * points
        tiled.names = self.names * points
        tiled.bases = (self.bases[None, :] + step).reshape(-1)
        tiled.masks = group(self.masks)
        tiled.routers = {k: group(g) for k, g in self.routers.items()}
        tiled.heads = {h: group(g) for h, g in self.heads.items()}
        tiled.param_block = (self.param_block[None, :] + shift).reshape(-1)
        tiled.param_names = self.param_names * points
        tiled.param_trainable = np.tile(self.param_trainable, points)
        tiled.param_specs = self.param_specs * points
        tiled.param_index = (self.param_index[None, :] + step).reshape(-1)
        tiled.grad_index = (self.grad_index[None, :] + step).reshape(-1)
        params = len(self.param_names)
        tiled.grad_rows = np.where(self.grad_rows[None, :] >= 0,
                                   self.grad_rows[None, :] + at * params, -1).reshape(-1)
        tiled.tags, tiled._tiled = {}, {}
        self._tiled[key] = tiled
        return tiled


#: What the collector writes for a gradient norm it did not read (no owner stepped, or no
#: gradient): norms are >= 0 or non-finite, so a negative sentinel never collides with one.
NOT_READ = -1.0


class PointColumns:
    """One point's statistics of every block, as columns (see the module docstring).

    Attributes:
        names: the blocks, in order.
        masks: every mask of every block (:class:`Items`).
        routers: the routers, one :class:`Items` per number of branches.
        heads: the head groups, one :class:`Items` per number of heads.
        params: every scalar parameter (:class:`ParamRows`).
        forwards: ``(blocks,)`` the recorded forwards of each block.
    """

    def __init__(
        self,
        names: Sequence[str],
        masks: Items,
        routers: Sequence[Items],
        heads: Sequence[Items],
        params: ParamRows,
        forwards: np.ndarray,
        histograms: Mapping[int, Mapping[str, list[float]]] | None = None,
        infos: Sequence[BlockInfo] = (),
        read: Any = None,
    ) -> None:
        self.names = tuple(names)
        self.masks = masks
        self.routers = tuple(routers)
        self.heads = tuple(heads)
        self.params = params
        self.forwards = forwards
        self._histograms = histograms
        self._read = read  # (plan, host vector): the histograms, cut out when asked for
        self.infos = tuple(infos)
        #: the tags of this point's scalars by (stage, sections): the plan's (one per run)
        #: when the point was read with one, else ``None`` (made again each time)
        self.tag_cache: dict | None = read[0].tags if read is not None else None

    @property
    def num_blocks(self) -> int:
        return len(self.names)

    # -- from the collector's vector --------------------------------------------------------
    @classmethod
    def read(cls, plan: PointPlan, host: np.ndarray, train: bool) -> PointColumns:
        """The columns of a point from the host copy of the read vector."""
        blocks, names, index = plan.masks
        slots = _group_slots(host, index, MASK_SLOTS, 0, 0)
        masks = Items(blocks, names, columns(MaskStats, slots), slots.count > 0)
        routers = []
        for k, (blocks, _, index) in plan.routers.items():
            slots = _group_slots(host, index, ROUTER_SLOTS, k, 0)
            routers.append(Items(blocks, (), columns(RouterStats, slots), slots.count > 0, k))
        heads = []
        for h, (blocks, _, index) in plan.heads.items():
            slots = _group_slots(host, index, HEAD_SLOTS, 0, h)
            present = (slots.count.sum(axis=1) > 0) | np.isfinite(slots.max_logit).any(axis=1)
            heads.append(Items(blocks, (), columns(HeadStats, slots), present, h))
        n_params = len(plan.param_names)
        value = host[plan.param_index]
        grad = np.full(n_params, math.nan)
        has_grad = np.zeros(n_params, dtype=bool)
        if train and plan.num_grads:
            read = host[plan.grad_index]
            taken = (read != NOT_READ) & (plan.grad_rows >= 0)
            grad[plan.grad_rows[taken]] = read[taken]
            has_grad[plan.grad_rows[taken]] = True
        params = ParamRows(plan.param_block, plan.param_names, value, grad, has_grad,
                           plan.param_trainable, plan.param_specs)
        forwards = host[plan.bases] if len(plan.bases) else np.zeros(0)
        return cls(plan.names, masks, routers, heads, params, forwards, infos=plan.infos,
                   read=(plan, host))

    def split(self, plan: PointPlan, host: np.ndarray) -> list[PointColumns]:
        """The points of a batch that was read with ``plan.tiled(*host.shape)`` (``host``:
        the batch's ``(points, stride)`` vectors): each point's columns are views of these,
        with ``plan``'s blocks and tags; its histograms are cut from its own vector."""

        def part(items: Items, single: tuple, p: int) -> Items:
            block, names, _ = single
            start, stop = p * len(block), (p + 1) * len(block)
            return Items(block, names, {q: c[start:stop] for q, c in items.cols.items()},
                         items.present[start:stop], items.width)

        blocks, params, out = plan.num_blocks, len(plan.param_names), []
        for p in range(len(host)):
            rows = slice(p * params, (p + 1) * params)
            pr = self.params
            out.append(PointColumns(
                plan.names, part(self.masks, plan.masks, p),
                [part(g, s, p) for g, s in zip(self.routers, plan.routers.values(), strict=True)],
                [part(g, s, p) for g, s in zip(self.heads, plan.heads.values(), strict=True)],
                ParamRows(plan.param_block, plan.param_names, pr.value[rows], pr.grad[rows],
                          pr.has_grad[rows], plan.param_trainable, plan.param_specs),
                self.forwards[p * blocks:(p + 1) * blocks], infos=plan.infos,
                read=(plan, host[p]),
            ))
        return out

    # -- from per-block objects (the report; tests) ----------------------------------------
    @classmethod
    def of_blocks(cls, blocks: Mapping[str, BlockStats]) -> PointColumns:
        """The columns of per-block statistics (what :meth:`read` would give for them)."""
        names = tuple(blocks)
        masks = _items_of(MaskStats, [(b, n, m) for b, bs in enumerate(blocks.values())
                                      for n, m in bs.masks.items()], 0)
        routers, heads = [], []
        by_k: dict[int, list] = {}
        for b, bs in enumerate(blocks.values()):
            if bs.router is not None:
                by_k.setdefault(bs.router.num_branches, []).append((b, "", bs.router))
        routers = [_items_of(RouterStats, rows, k) for k, rows in by_k.items()]
        by_h: dict[int, list] = {}
        for b, bs in enumerate(blocks.values()):
            if bs.heads is not None:
                by_h.setdefault(bs.heads.num_heads, []).append((b, "", bs.heads))
        heads = [_items_of(HeadStats, rows, h) for h, rows in by_h.items()]
        rows = [(b, n, v, bs.grad_norms.get(n), n in bs.trainable, bs.param_specs.get(n))
                for b, bs in enumerate(blocks.values()) for n, v in bs.params.items()]
        params = ParamRows(
            np.asarray([r[0] for r in rows], dtype=np.int64), tuple(r[1] for r in rows),
            np.asarray([r[2] for r in rows], dtype=float),
            np.asarray([math.nan if r[3] is None else r[3] for r in rows], dtype=float),
            np.asarray([r[3] is not None for r in rows], dtype=bool),
            np.asarray([r[4] for r in rows], dtype=bool), tuple(r[5] for r in rows))
        forwards = np.asarray([bs.forwards for bs in blocks.values()], dtype=float)
        histograms = {b: bs.histograms for b, bs in enumerate(blocks.values())}
        return cls(names, masks, routers, heads, params, forwards, histograms)

    # -- views -------------------------------------------------------------------------------
    def histograms(self, b: int) -> dict[str, list[float]]:
        """Block ``b``'s histogram counts (mask name or ``"router"`` -> bins)."""
        if self._histograms is not None:
            return dict(self._histograms.get(b, {}))
        plan, host = self._read
        layout, base = plan.layouts[b], int(plan.bases[b])
        bins = layout.histogram_bins
        present = set(self.masks.names[i] for i in np.flatnonzero(
            (self.masks.block == b) & self.masks.present))
        if any(b in g.block[g.present] for g in self.routers):
            present.add("router")
        return {name: host[base + off:base + off + bins].tolist()
                for name, off in layout.histogram_offsets.items() if name in present}

    def block(self, b: int) -> BlockStats:
        """Block ``b`` as :class:`~.statistics.BlockStats` (made on each call)."""
        masks = {self.masks.names[i]: materialize(MaskStats, self.masks.cols, i)
                 for i in np.flatnonzero((self.masks.block == b) & self.masks.present)}
        router = next((materialize(RouterStats, g.cols, int(i)) for g in self.routers
                       for i in np.flatnonzero((g.block == b) & g.present)), None)
        heads = next((materialize(HeadStats, g.cols, int(i)) for g in self.heads
                      for i in np.flatnonzero((g.block == b) & g.present)), None)
        p = self.params
        rows = np.flatnonzero(p.block == b)
        params = {p.names[i]: float(p.value[i]) for i in rows}
        grads = {p.names[i]: float(p.grad[i]) for i in rows if p.has_grad[i]}
        trainable = frozenset(p.names[i] for i in rows if p.trainable[i])
        specs = {p.names[i]: p.specs[i] for i in rows if p.specs[i] is not None}
        return BlockStats(masks=masks, router=router, params=params, grad_norms=grads,
                          histograms=self.histograms(b), trainable=trainable,
                          forwards=int(self.forwards[b]), param_specs=specs, heads=heads)

    def stats(self, step: int, phase: str) -> GlobalStats:
        """A :class:`~.statistics.GlobalStats` whose blocks are made when asked for."""
        return GlobalStats(step=step, blocks=LazyBlocks(self), phase=phase, columns=self)

    def groups(self, section: str) -> Iterator[Items]:
        """The groups of items of ``section`` (``"mask"``, ``"router"``, ``"heads"``)."""
        if section == "mask":
            yield self.masks
        else:
            yield from (self.routers if section == "router" else self.heads)


def _items_of(stats_class: type, rows: Sequence[tuple[int, str, Any]], width: int) -> Items:
    """A group of items from per-item statistics objects ``(block, name, stats)``."""
    cols: dict[str, np.ndarray] = {}
    for q in quantities(stats_class):
        values = [getattr(stats, q.name) for _, _, stats in rows]
        shape = (len(rows), width) if q.per_branch or q.per_head else (len(rows),)
        cols[q.name] = np.asarray(values, dtype=float).reshape(shape)
    return Items(np.asarray([b for b, _, _ in rows], dtype=np.int64),
                 tuple(n for _, n, _ in rows) if stats_class is MaskStats else (),
                 cols, np.ones(len(rows), dtype=bool), width)


class LazyBlocks(Mapping):
    """Block name -> :class:`~.statistics.BlockStats` of a point, each made when first asked
    for (the rules and the scalars read the columns: most points never make one)."""

    def __init__(self, point: PointColumns) -> None:
        self._point = point
        self._index = {name: b for b, name in enumerate(point.names)}
        self._made: dict[str, BlockStats] = {}

    def __getitem__(self, name: str) -> BlockStats:
        found = self._made.get(name)
        if found is None:
            found = self._made[name] = self._point.block(self._index[name])
        return found

    def __iter__(self) -> Iterator[str]:
        return iter(self._point.names)

    def __len__(self) -> int:
        return len(self._point.names)

    def __repr__(self) -> str:
        return f"LazyBlocks({list(self._point.names)})"


def breaches(point: PointColumns, sections: Sequence[str] = ("mask", "router")
             ) -> dict[str, list[str]]:
    """Block name -> what it recorded against the contract of ``record()``, in words, for
    the blocks that did (usually none; found with array operations): mask values outside
    ``[0, 1]``, router weights below 0 or rows not summing to 1 (within
    :data:`~.statistics.SIMPLEX_TOLERANCE`: logits passed in place of softmax weights). Read
    from the extremes, which cover every forward of the point; NaN and Inf are the
    ``nonfinite`` rule's, not a breach."""
    found: dict[str, list[str]] = {}
    if "mask" in sections:
        m = point.masks
        c = m.cols
        with np.errstate(invalid="ignore"):
            bad = m.present & (c["nonfinite"] == 0) & ((c["min"] < 0.0) | (c["max"] > 1.0))
        for i in np.flatnonzero(bad).tolist():
            found.setdefault(point.names[m.block[i]], []).append(
                f"mask {m.names[i]!r} took values in [{c['min'][i]:.4g}, {c['max'][i]:.4g}], "
                "outside [0, 1]")
    if "router" in sections:
        for g in point.routers:
            c = g.cols
            ok = g.present & (c["nonfinite"] == 0)
            with np.errstate(invalid="ignore"):
                low = ok & (c["weight_min"] < 0.0)
                off = ok & ((c["row_sum_min"] < 1 - SIMPLEX_TOLERANCE)
                            | (c["row_sum_max"] > 1 + SIMPLEX_TOLERANCE))
            for i in np.flatnonzero(low | off).tolist():
                words = found.setdefault(point.names[g.block[i]], [])
                if low[i]:
                    words.append(f"router weights as low as {c['weight_min'][i]:.4g}, below 0")
                if off[i]:
                    words.append(f"router weight rows summing to [{c['row_sum_min'][i]:.4g}, "
                                 f"{c['row_sum_max'][i]:.4g}], not 1")
    return found
