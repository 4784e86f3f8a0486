"""Reading the blocks' recordings: one vector and one collective per point, one host copy
per batch of points, and the statistics of every block from it as columns (a few array
operations, however many blocks and points).

The path of a number, from block to logger::

    block.forward -> block.record() -> the block's accumulator row of the current phase
        -> StatisticsCollector.finish_later(): every block's row, the scalar parameters (as
           the forwards used them: taken before the optimizer step) and the gradient norms
           in one vector -> one all_gather across processes -> combined slot by slot on the
           device (sums added, minima and maxima taken), kept there
        -> StatisticsCollector.read_later(): the batch's vectors stacked, one copy to the
           host -> PointColumns of every point's blocks at once (lightning_attn.core.point;
           the rules read them so), cut into each point's columns (a GlobalStats whose
           BlockStats are made only when asked for) -> problems, loggers, table, report

An evaluation point (one per validation / test run) is read at once (:meth:`finish`).
Between points the collector holds no tensor but the finished vectors (and spare ones to fill
again), and the blocks do not record, but for the step after a training point: its blocks stay
held until that step starts (:meth:`StatisticsCollector.release`), so that consecutive points
switch nothing.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from ..blocks.recording import start_recording_of, stop_recording_of
from ..core.accumulator import AccumulatorTable
from ..core.point import NOT_READ, PointColumns, PointPlan
from ..core.statistics import (
    BlockInfo,
    GlobalStats,
    ParameterSpec,
    RecordingConfig,
)

__all__ = ["PointBatch", "StatisticsCollector", "combine_processes"]

# How a slot of the read vector combines over processes.
_SUM, _MIN, _MAX, _FIRST = 0, 1, 2, 3
_CODES = {"sum": _SUM, "min": _MIN, "max": _MAX}
_ACCUMULATOR = operator.attrgetter("accumulator")


@dataclass(frozen=True)
class PointBatch:
    """Training points read together (:meth:`StatisticsCollector.read_later`).

    Attributes:
        columns: every point's blocks as the blocks of one point (block ``b`` of point ``p``
            is block ``p * B + b``, ``B`` blocks a point): the rules read them all at once.
        points: each point's own columns (views of ``columns``).
        steps: each point's step.
        tags: what :meth:`StatisticsCollector.finish_later` was given with each point.
    """

    columns: PointColumns
    points: list[PointColumns]
    steps: list[int]
    tags: list[Any]


def combine_processes(
    trainer: pl.Trainer, vector: torch.Tensor, kinds: torch.Tensor
) -> torch.Tensor:
    """``vector`` combined over every process, slot by slot as ``kinds`` says (0: sum,
    1: min, 2: max, 3: rank 0's value), on the device: one collective, no host sync of its
    own; on one process, ``vector`` itself.

    The collective is ``torch.distributed.all_gather`` itself: ``trainer.strategy.all_gather``
    first runs a barrier and an all-gather of the shapes (with two host syncs), three
    collectives per logging step where one will do (every process lays out the same vector,
    so the shapes are known to agree). ``tests/callbacks/test_ddp.py`` counts them.
    """
    if (int(trainer.world_size) > 1 and torch.distributed.is_available()
            and torch.distributed.is_initialized()):
        rows = [torch.empty_like(vector) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(rows, vector)
        table = torch.stack(rows)  # (world, N)
        vector = torch.where(
            kinds == _SUM, table.sum(0),
            torch.where(kinds == _MIN, table.amin(0),
                        torch.where(kinds == _MAX, table.amax(0), table[0])),
        )
    return vector


def _specs(block: nn.Module) -> dict[str, ParameterSpec]:
    # Optional in the protocol: a user's block without parameters need not declare any.
    declare = getattr(block, "attention_parameter_specs", None)
    return dict(declare()) if callable(declare) else {}


class StatisticsCollector:
    """Drives the recording of a fixed set of blocks and reads it back, phase by phase.

    Args:
        config: what the blocks record (saturation thresholds, histogram bins).
    """

    def __init__(self, config: RecordingConfig) -> None:
        self.config = config
        self.blocks: dict[str, nn.Module] = {}
        self._recorders: list[nn.Module] = []
        self.infos: list[BlockInfo] = []
        self._open: set[str] = set()
        self._grad_norms: dict[int, torch.Tensor] = {}
        self._params: dict[str, torch.Tensor | None] = {}  # phase -> values the forwards used
        self._kinds: torch.Tensor | None = None
        #: where each block's slots sit in the read vector: made once per run
        self._plan: PointPlan | None = None
        self._accumulators: list = []  # those the plan was made for
        #: their values in one tensor per device (every block's row read or emptied in one
        #: operation), and the blocks (plan indices) of each
        self._tables: list[AccumulatorTable] = []
        self._members: list[list[int]] = []
        #: on several devices: the tables' rows, put back in the plan's order of blocks
        self._order: torch.Tensor | None = None
        self._trainables: list[tuple[nn.Module, str]] | None = None
        #: training points finished, not read yet: (plan, vector on the device, step, tag)
        self._later: list[tuple[PointPlan, torch.Tensor, int, Any]] = []
        #: the histograms flag of the training point whose hold is kept until the next step
        #: starts (:meth:`release`), ``None`` when none is kept
        self._lingering: bool | None = None
        self._histograms = False  # the open training point's
        #: vectors of training points already read, filled again by later points
        self._spare: list[torch.Tensor] = []

    # -- setup -------------------------------------------------------------------------------
    def bind(self, blocks: Mapping[str, nn.Module], device: torch.device) -> None:
        """Watch ``blocks`` (name -> block) and give each an accumulator on its device.

        Call before the first forward of the run: the accumulators then exist when a compiled
        graph is first traced, and no extra compilation follows.
        """
        self.unbind()
        self.blocks = dict(blocks)
        # the modules that hold the recording state: a block compiled on its own is an
        # OptimizedModule, whose recording methods are those of the module it wraps
        self._recorders = [block.start_recording.__self__ for block in self.blocks.values()]
        self.infos = []
        for name, block in self.blocks.items():
            param = next(block.parameters(), None)
            block.configure_recording(self.config, param.device if param is not None else device)
            params = tuple(block.attention_parameters())
            trainable = tuple(n for n in block.trainable_attention_parameters() if n in params)
            branch_names = getattr(block, "branch_names", None)
            self.infos.append(BlockInfo(
                name, block.statistics_layout, params, trainable,
                tuple(branch_names) if branch_names else None,
                {n: s for n, s in _specs(block).items() if n in params},
            ))
        self._plan_now()  # the accumulators in their tables now, before any graph sees them

    def unbind(self) -> None:
        """Stop watching: recording off, accumulators and captured maps dropped."""
        for table in self._tables:  # what they hold is dropped with them: nothing to reduce
            table.detach()
        self.release()
        for phase in self._open:  # dropped, not read (a peer may have dropped the blocks'
            stop_recording_of(self._recorders, self, phase)  # accumulators already)
        self._open.clear()
        self._params, self._grad_norms = {}, {}
        for block in self.blocks.values():
            block.clear_recording()
        self.blocks, self.infos, self._kinds, self._plan = {}, [], None, None
        self._recorders = []
        self._accumulators, self._tables, self._members = [], [], []
        self._order = None
        self._trainables = None
        self._later, self._spare = [], []

    def set_phase(self, phase: str) -> None:
        """Forwards from now on record into ``phase``'s rows (Lightning entered a loop)."""
        self.release()  # an evaluation's forwards record only for an evaluation point
        for block in self.blocks.values():
            block.set_recording_phase(phase)

    # -- one point ---------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        """Whether a point of any phase is being recorded."""
        return bool(self._open)

    def open(self, phase: str = "train", histograms: bool = False) -> None:
        """Start recording a point of ``phase`` (a training logging step, or an evaluation
        run); ``histograms``: the point writes histograms."""
        if phase in self._open:
            return
        self._plan_now()  # the rows of this run's accumulators
        if phase == "train" and self._lingering is not None:
            if self._lingering == bool(histograms) and not any(t.shared for t in self._tables):
                # every block still held by this collector alone, as this point wants
                self._lingering = None
                for table in self._tables:
                    table.empty(phase)
                self._begin(phase)
                return
            self.release()
        if phase == "train":
            self._histograms = bool(histograms)
        first = start_recording_of(self._recorders, self, histograms, phase, reset=False)
        if all(first):  # the usual case: every row emptied in one operation
            for table in self._tables:
                table.empty(phase)
        elif any(first):  # another consumer holds some of them: only this one's first rows
            for table, members in zip(self._tables, self._members, strict=True):
                table.empty(phase, [first[i] for i in members])
        self._begin(phase)

    def _begin(self, phase: str) -> None:
        self._open.add(phase)
        self._params.pop(phase, None)
        if phase == "train":
            self._grad_norms = {}

    def release(self) -> None:
        """Let go of the hold a training point kept (``close(linger=True)``): call it before a
        forward that is not part of the next point (a step that logs nothing, an evaluation).
        Nothing when none is kept."""
        if self._lingering is not None:
            self._lingering = None
            stop_recording_of(self._recorders, self, "train")

    def settle(self) -> None:
        """Reduce the eager training forwards the blocks hold back (:meth:`~lightning_attn.
        core.accumulator.AccumulatorTable.settle`): at the end of the point, or earlier to
        free the masks they keep (after the forward, before the backward)."""
        if self._plan is not None:
            self._plan_now()  # another collector may have taken some of the blocks
        for table in self._tables:
            table.settle()

    def close(self, phase: str = "train", linger: bool = False) -> None:
        """Stop recording ``phase`` without reading (an interrupted point). ``linger``: a
        training point keeps every block's hold until :meth:`open` starts the next point
        (its rows then emptied in one operation) or :meth:`release` lets go: at every-step
        logging, no block is switched off and on between two points."""
        if phase == "train":
            self.settle()  # into the row, which another holder may read
            if not linger:
                self.release()
        if phase in self._open:
            # kept only while this collector holds the blocks alone: holders that share a
            # window must each let go for the next one to start it (and empty the rows)
            if linger and phase == "train" and not any(t.shared for t in self._tables):
                self._lingering = self._histograms
            else:
                stop_recording_of(self._recorders, self, phase)
        self._open.discard(phase)
        self._params.pop(phase, None)
        if phase == "train":
            self._grad_norms = {}

    def _trainable(self) -> list[tuple[nn.Module, str]]:
        # (block, parameter name) of every learnable scalar, in order: fixed once bound
        if self._trainables is None:
            self._trainables = [(self.blocks[info.name], name) for info in self.infos
                                for name in info.trainable_names]
        return self._trainables

    @torch.no_grad()
    def record_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradient norms of the learnable scalars that ``optimizer`` owns, for the open
        training point. Call it in ``on_before_optimizer_step``: after unscaling and the DDP
        all-reduce, with the gradient this optimizer applies (a parameter of another
        optimizer is read at that optimizer's step, not after a later backward added to it)."""
        if "train" not in self._open:
            return
        self.snapshot_parameters("train")  # before this (or any) optimizer updates them
        trainable = self._trainable()
        if not trainable:  # adapted gates have no learnable scalars: nothing to read
            return
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for i, (block, name) in enumerate(trainable):
            param = block.trainable_attention_parameters().get(name)
            if param is None or id(param) not in owned:
                continue
            grad = param.grad
            self._grad_norms[i] = (
                torch.full((), NOT_READ, dtype=torch.float64, device=param.device)
                if grad is None else torch.linalg.vector_norm(grad.detach(), dtype=torch.float64)
            )

    @torch.no_grad()
    def snapshot_parameters(self, phase: str = "train") -> None:
        """Take the scalar parameters' values for ``phase``'s open point now, the values its
        forwards used: before the optimizer updates them (training; the first optimizer step
        of the point) or while an evaluation runs (a callback such as Lightning's
        ``WeightAveraging`` swaps the averaged weights in for validation only). Only the
        first call of a point counts; a point never snapshot reads them when it finishes.
        A device copy, no host sync."""
        if phase in self._open and phase not in self._params and self.blocks:
            self._params[phase] = self._parameter_values(self._device())

    def _parameter_values(self, device: torch.device) -> torch.Tensor | None:
        # Stacked: a copy, which an in-place update of the parameter leaves as it was.
        values = []
        for info in self.infos:
            if not info.param_names:  # a gate without scalar parameters
                continue
            current = self.blocks[info.name].attention_parameters()
            values += [
                (current[n] if isinstance(current[n], torch.Tensor)
                 else torch.tensor(current[n], dtype=torch.float64)).to(device).reshape(())
                if n in current else torch.full((), math.nan, dtype=torch.float64, device=device)
                for n in info.param_names
            ]
        # one cast for them all (the stack promotes mixed dtypes exactly)
        return torch.stack(values).to(torch.float64) if values else None

    def _device(self) -> torch.device:
        return next(iter(self.blocks.values())).accumulator.device

    @torch.no_grad()
    def finish(self, trainer: pl.Trainer, step: int, phase: str = "train") -> GlobalStats:
        """Close ``phase``'s point and read it: parameters in, one collective, one host copy,
        then every block's statistics as columns (:class:`~lightning_attn.core.point.
        PointColumns`; the per-block view is made only for the blocks asked for)."""
        plan = self._plan  # as the point's opening found it (recording blocks keep theirs)
        vector = self._combined(trainer, phase)
        if vector is None:
            return GlobalStats(step=step, blocks={}, phase=phase)
        host = vector.to("cpu", torch.float64).numpy()
        return PointColumns.read(plan, host, phase == "train").stats(step, phase)

    @torch.no_grad()
    def finish_later(self, trainer: pl.Trainer, step: int, tag: Any = None,
                     linger: bool = True) -> None:
        """Close the training point and combine it over the processes now (the one
        collective of the point, at the same step on every process), on the device; it is
        read with the others by :meth:`read_later`: one host copy for them all. ``tag``:
        what the caller wants back with the point; ``linger``: keep the blocks held for a
        point at the next step (:meth:`close`)."""
        plan = self._plan
        vector = self._combined(trainer, "train", linger=linger, later=True)
        if vector is not None:
            self._later.append((plan, vector, step, tag))

    @property
    def num_later(self) -> int:
        """Training points finished and not read yet."""
        return len(self._later)

    @torch.no_grad()
    def read_later(self) -> list[PointBatch]:
        """The points :meth:`finish_later` holds, in order, in as few batches as their plans
        allow (one unless an accumulator changed between them): each batch one stack on the
        device, one host copy, and every point's blocks read as those of one point
        (:meth:`~lightning_attn.core.point.PointPlan.tiled`)."""
        later, self._later = self._later, []
        batches, start = [], 0
        while start < len(later):
            plan, size = later[start][0], later[start][1].numel()
            stop = start + 1
            while stop < len(later) and later[stop][0] is plan and (
                    later[stop][1].numel() == size):
                stop += 1
            points = later[start:stop]
            host = torch.stack([p[1] for p in points]).to("cpu", torch.float64).numpy()
            self._spare += [p[1] for p in points]  # copied: theirs to fill again
            columns = PointColumns.read(plan.tiled(*host.shape), host.reshape(-1), True)
            batches.append(PointBatch(columns, columns.split(plan, host),
                                      [p[2] for p in points], [p[3] for p in points]))
            start = stop
        return batches

    def _combined(self, trainer: pl.Trainer, phase: str, linger: bool = False,
                  later: bool = False) -> torch.Tensor | None:
        """Close ``phase``'s point: its vector (every block's row, the parameters, on a
        training point the gradient norms) combined over the processes, on the device
        (``None``: no block)."""
        if phase not in self._open:
            raise RuntimeError(f"StatisticsCollector.finish() without an open {phase} point")
        if not self.blocks:
            self.close(phase)
            return None
        if phase == "train":
            self.settle()
        else:
            self._plan_now()
        device = self._device()
        self.snapshot_parameters(phase)  # no optimizer stepped: the values are still those
        params = self._params.pop(phase)
        plan = self._plan
        dtype = self._tables[0].base.dtype
        parts = []  # after the rows
        if params is not None:  # blocks without scalar parameters (a user's gate) have none
            parts.append(params.to(dtype))
        n_grads = plan.num_grads
        if phase == "train" and n_grads:
            grads = [self._grad_norms.get(i) for i in range(n_grads)]
            parts.append(torch.stack([
                torch.full((), NOT_READ, dtype=dtype, device=device) if g is None
                else g.to(device, dtype) for g in grads
            ]))
        size = sum(table.rows[phase].numel() for table in self._tables)
        total = size + sum(p.numel() for p in parts)
        # A training point's vector is a spare one of the points already read: no allocation
        # here (on the CPU, the first allocation after a backward sorts every chunk it freed).
        vector = self._spare.pop() if later and self._spare and (
            self._spare[-1].numel() == total) else torch.empty(total, dtype=dtype, device=device)
        if self._order is None:  # one operation a device
            self._tables[0].gather(phase, out=vector[:size])
        else:
            vector[:size] = torch.cat([t.gather(phase).to(device) for t in self._tables]
                                      ).index_select(0, self._order)
        if parts:
            vector[size:] = torch.cat(parts) if len(parts) > 1 else parts[0]
        self.close(phase, linger)  # the values are in `vector`
        # several processes: the combined vector is kept, and given back once read
        return combine_processes(trainer, vector, self._reductions(plan, vector))

    def _plan_now(self) -> PointPlan:
        """The plan of the read vector and the accumulators' tables: made again only when a
        table went stale (an accumulator was replaced, as when another consumer widened it,
        or another collector watching other blocks made its own table over some of them),
        which costs no look at each block (the check runs several times a point)."""
        if self._plan is not None and not any(t.stale for t in self._tables):
            return self._plan
        accumulators = list(map(_ACCUMULATOR, self.blocks.values()))
        if self._plan is None or accumulators != self._accumulators:
            self._accumulators = accumulators
            self._plan = PointPlan(self.infos, [acc.layout for acc in accumulators])
            self._kinds = None
        members: dict[torch.device, list[int]] = {}
        for i, acc in enumerate(accumulators):
            members.setdefault(acc.device, []).append(i)
        self._tables, self._members = [], list(members.values())
        for indices in self._members:
            chosen = [accumulators[i] for i in indices]
            table = chosen[0].table  # one watching the same blocks shares it
            if table is None or table.stale or table.accumulators != chosen:
                table = AccumulatorTable(chosen)
            self._tables.append(table)
        self._order = None
        if len(self._tables) > 1:  # each device's rows, then the plan's order
            sizes = [acc.layout.size for acc in accumulators]
            starts, at = [0] * len(accumulators), 0
            for i in (i for indices in self._members for i in indices):
                starts[i], at = at, at + sizes[i]
            self._order = torch.cat([torch.arange(s, s + n) for s, n in zip(
                starts, sizes, strict=True)]).to(self._device())
        return self._plan

    def _reductions(self, plan: PointPlan, vector: torch.Tensor) -> torch.Tensor:
        """How each slot of the read vector combines over processes: every block's row,
        then the parameters and gradient norms (identical on every process: rank 0's are
        taken). Made once per plan (and length: a training point has the norms)."""
        if self._kinds is None or len(self._kinds) != vector.numel():
            codes = [_CODES[k] for layout in plan.layouts for k in layout.reductions]
            codes += [_FIRST] * (vector.numel() - len(codes))
            self._kinds = torch.tensor(codes, device=vector.device)
        return self._kinds
