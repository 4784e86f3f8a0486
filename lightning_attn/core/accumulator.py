"""The on-device accumulator: what a forward adds to a block's statistics, in the graph.

:class:`Accumulator` lays out the slots declared in :mod:`.statistics` (``MASK_SLOTS``,
``ROUTER_SLOTS``, ``HEAD_SLOTS``) as one row per phase and adds one forward's contribution
with tensor operations only: no host sync, no Python callback, nothing ``torch.compile``
cannot trace. :func:`head_reductions` measures attention heads from the queries and keys a
forward has, a chunk of queries at a time.
The only module of the core that imports torch at import time (the report reads the
declarations without it).

Phases never mix: a forward adds to the row its :attr:`Accumulator.phase` tensor names (set by
the diagnostics when Lightning enters or leaves a loop), so no order of hooks can put an
evaluation forward into a training point, and changing the phase never recompiles anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from .statistics import (
    HEAD_SLOTS,
    MASK_SLOTS,
    PHASES,
    ROUTER_SLOTS,
    RecordingConfig,
    StatisticsLayout,
    slot_width,
)

__all__ = [
    "CUDAGRAPH_UNSAFE",
    "MASKED_BELOW",
    "Accumulator",
    "AccumulatorTable",
    "accumulator_dtype",
    "empty_row",
    "first_query_attention",
    "head_reductions",
    "histogram_counts",
    "logit_reductions",
]

_NEUTRAL = {"sum": 0.0, "min": math.inf, "max": -math.inf}


def accumulator_dtype(device: torch.device | str) -> torch.dtype:
    """float64 where the device has it (exact counts, sums of squares near collapse),
    float32 on MPS."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def empty_row(layout: StatisticsLayout, device: torch.device | str) -> torch.Tensor:
    """An empty row ``(layout.size,)``: zeros, ``+inf`` in the minima, ``-inf`` in the
    maxima."""
    return torch.tensor([_NEUTRAL[k] for k in layout.reductions],
                        dtype=accumulator_dtype(device), device=device)


class Accumulator:
    """One block's on-device accumulator: a row per phase, and the phase being recorded.

    Args:
        layout: the block's layout.
        config: saturation thresholds and bins (constants of the compiled graph).
        device: where the forward runs.

    ``values`` is ``(len(PHASES), layout.size)``; ``phase`` a 0-d int64 tensor indexing it (a
    tensor, not a Python int: changing it never recompiles).
    """

    def __init__(
        self, layout: StatisticsLayout, config: RecordingConfig, device: torch.device | str
    ) -> None:
        self.layout = layout
        self.config = config
        self.initial = empty_row(layout, device)  # what a reset copies from (no host copy)
        self.values = self.initial.repeat(len(PHASES), 1)
        self.phase = torch.zeros((), dtype=torch.long, device=device)
        #: whether compiled forwards add the histogram counts (:func:`histogram_counts`): a
        #: tensor, not a Python bool, so that changing it never recompiles; on the host, so
        #: that reading it costs no device sync
        self.histograms = torch.zeros((), dtype=torch.bool)
        self._histograms = False  # its value, known without reading it
        codes = torch.tensor([("sum", "min", "max").index(k) for k in layout.reductions],
                             device=device)
        self._is_min, self._is_max = codes == 1, codes == 2
        self._phase_name = "train"  # :attr:`phase`, known on the host
        #: the :class:`AccumulatorTable` whose ``base`` holds :attr:`values` (set by it), which
        #: holds back this block's eager training forwards of small masks; where they go in it
        self.table: AccumulatorTable | None = None
        self.home: torch.Tensor | None = None  # the table's tensor that :attr:`values` views
        self.held_forward = 0
        self.held_segments: dict[str, int] = {}

    @property
    def device(self) -> torch.device:
        return self.values.device

    def set_phase(self, phase: str) -> None:
        """Later forwards add to ``phase``'s row (a device fill; outside the forward)."""
        self.phase.fill_(PHASES.index(phase))
        self._phase_name = phase

    def set_histograms(self, on: bool) -> None:
        """Whether compiled forwards add the histogram counts from now on (a fill only when
        it changes: the diagnostics open a point of hundreds of blocks at every step)."""
        if on != self._histograms:
            self.histograms.fill_(on)
            self._histograms = on

    def retire(self) -> None:
        """This accumulator is replaced (its block was configured anew): its table, if any,
        goes stale."""
        if self.table is not None:
            self.table.stale = True

    def reset(self, phase: str) -> None:
        """Empty ``phase``'s row in place (same tensor: no recompilation)."""
        if phase == "train" and self.table is not None:
            self.table.settle()  # held-back forwards reduced, then emptied with the rest
        self.values[PHASES.index(phase)].copy_(self.initial)

    def row(self, phase: str) -> torch.Tensor:
        """``phase``'s row ``(layout.size,)``, a view on the device."""
        return self.values[PHASES.index(phase)]

    @torch.no_grad()
    def add(
        self,
        masks: Mapping[str, torch.Tensor],
        router_weights: torch.Tensor | None,
        histograms: bool | torch.Tensor,
        keep: torch.Tensor | None = None,
        heads: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Add one forward's statistics to the current phase's row, on the device.

        ``masks``: name -> mask (any shape, values expected in ``[0, 1]``); masks the layout
        does not declare are left out. ``router_weights``: ``(B, K)`` softmax weights or
        ``None``. ``histograms``: add the histogram counts (when the layout has bins); a
        compiled forward passes :attr:`histograms`, read as the graph runs.
        ``keep``: a 0-d bool tensor; ``False`` leaves the row as it is (decided on the device,
        where a compiled graph cannot branch on it). ``heads``: the per-head reductions of
        :func:`head_reductions` (each ``(H,)``), or ``None``.

        One contribution row is built (few whole-tensor ops per mask: each costs a dispatch,
        or a kernel launch on a GPU in eager mode), then combined with the phase's row slot by
        slot and written back: three ops whatever the number of statistics. In a
        :attr:`table`, an eager training forward that records small masks only is held back
        there (:meth:`AccumulatorTable.hold`) and reduced with the other blocks'.
        """
        # a compiled forward (``keep`` given) is decided first: its graph never reads the table
        if (keep is None and self.table is not None and router_weights is None
                and heads is None and self._phase_name == "train"
                and not isinstance(histograms, torch.Tensor)
                and all(m is None or m.numel() <= HELD_ELEMENTS for m in masks.values())):
            self.table.hold(self, masks, bool(histograms))
            return
        layout, dtype, initial = self.layout, self.values.dtype, self.initial
        bins = layout.histogram_bins
        pieces = [torch.ones(1, dtype=dtype, device=self.device)]  # forwards
        counted: dict[str, torch.Tensor] = {}  # what the histograms count, by name
        for name, off in layout.mask_offsets.items():
            mask = masks.get(name)
            if mask is None or mask.numel() == 0:
                pieces.append(initial[off:off + len(MASK_SLOTS)])
                continue
            v = mask.detach().reshape(-1).float()
            v64 = v.to(dtype)
            pieces.append(torch.stack([slot.measure(v, v64, self.config) for slot in MASK_SLOTS]))
            counted[name] = v
        rw = router_weights
        if layout.router_offset is not None:
            k = layout.num_branches
            width = sum(slot_width(s, k) for s in ROUTER_SLOTS)
            if rw is None or rw.shape[0] == 0:
                pieces.append(initial[layout.router_offset:layout.router_offset + width])
            else:
                w = rw.detach().float()
                pieces += [slot.measure(w, dtype).reshape(-1) for slot in ROUTER_SLOTS]
                counted["router"] = w.reshape(-1)
        if layout.head_offset is not None:
            if heads is None:
                width = sum(slot_width(s, 0, layout.num_heads) for s in HEAD_SLOTS)
                pieces.append(initial[layout.head_offset:layout.head_offset + width])
            else:
                pieces += [slot.measure(heads).to(dtype).reshape(-1) for slot in HEAD_SLOTS]
        if bins and counted and histograms is not False:
            counts = (histogram_counts(list(counted.values()), histograms, bins, dtype)
                      if isinstance(histograms, torch.Tensor)
                      else torch.stack([_counts(v, bins, dtype) for v in counted.values()]))
            hists = dict(zip(counted, counts.unbind(0), strict=True))
        else:
            hists = {}
        for name, off in layout.histogram_offsets.items():
            pieces.append(hists[name] if name in hists else initial[off:off + bins])
        contribution = torch.cat(pieces)
        phase = self.phase.reshape(1)
        row = self.values.index_select(0, phase)[0]
        combined = torch.where(
            self._is_min, torch.minimum(row, contribution),
            torch.where(self._is_max, torch.maximum(row, contribution), row + contribution),
        )
        if keep is not None:
            combined = torch.where(keep, combined, row)
        self.values.index_copy_(0, phase, combined.unsqueeze(0))


class AccumulatorTable:
    """The accumulators of a fixed list of blocks on one device, their values in one tensor:
    each accumulator's :attr:`~Accumulator.values` becomes a view of :attr:`base` (moved
    there once, when the table is made before the first forward; a compiled forward adds to
    its view as before). Every block's row of a phase is then read (:meth:`gather`) or
    emptied (:meth:`empty`) with one operation, however many blocks there are.

    The eager training forwards that record small masks only (:data:`HELD_ELEMENTS` values
    each at most: squeeze-excite gates) are held back (:meth:`hold`, from
    :meth:`Accumulator.add`) and reduced together by :meth:`settle`: every mask's values in
    one vector, each slot's terms (:data:`~.statistics.MASK_SLOTS`) summed per (block, mask)
    in one ``index_add_`` and the extremes in one ``scatter_reduce_`` each, combined with the
    rows in :attr:`base` at once, the histogram counts in one more ``index_add_``. The same
    numbers as :meth:`Accumulator.add` (to the order of float64 summation), and no Python
    loop over the blocks.

    Args:
        accumulators: on one device (one config's saturation thresholds: a block refuses
            another's).
    """

    @torch.inference_mode(False)  # made during an evaluation, used in training too
    @torch.no_grad()
    def __init__(self, accumulators: list[Accumulator]) -> None:
        self.accumulators = list(accumulators)
        #: whether a holder joined one of its blocks' training windows: the collector then
        #: lets go and starts anew at each point rather than empty every row itself
        self.shared = False
        #: whether an accumulator of it was replaced (:meth:`Accumulator.retire`) or taken
        #: by another table: whoever uses it makes a new one
        self.stale = False
        for old in {acc.table for acc in self.accumulators} - {None, self}:
            old.settle()  # what it holds belongs to the rows, wherever they move
            old.stale = True
        first = self.accumulators[0]
        device, self.config = first.device, first.config
        base = first.home
        if base is None or any(acc.home is not base for acc in self.accumulators):
            # moved into one tensor (another table's, holding them all, is kept)
            base = torch.cat([acc.values.reshape(-1) for acc in self.accumulators])
            offset = 0
            for acc in self.accumulators:
                n = acc.values.numel()
                acc.values = base[offset:offset + n].view(acc.values.shape)
                acc.home = base
                offset += n
        self.base = base
        starts = [acc.values.storage_offset() - base.storage_offset()
                  for acc in self.accumulators]
        sizes = [acc.layout.size for acc in self.accumulators]
        #: each phase's row of every block, one after the other: indices into ``base``
        self.rows = {phase: torch.cat([torch.arange(s + p * n, s + (p + 1) * n)
                                       for s, n in zip(starts, sizes, strict=True)]).to(device)
                     for p, phase in enumerate(PHASES)}
        self.initial = torch.cat([acc.initial for acc in self.accumulators])
        self._sizes = sizes
        # Where a held-back forward's numbers go (the training row): its forward count, and
        # each (block, mask) segment's slots and histogram bins.
        train = PHASES.index("train")
        width = len(MASK_SLOTS)
        slots, hist_start, bins = [], [], []
        for acc, s, n in zip(self.accumulators, starts, sizes, strict=True):
            row = s + train * n
            acc.held_forward = row  # the forward count leads the row
            acc.held_segments = {}
            for name, off in acc.layout.mask_offsets.items():
                acc.held_segments[name] = len(slots)
                slots.append([row + off + i for i in range(width)])
                # no bins: counted with weight 0 into the segment's own first slot
                hist_start.append(row + acc.layout.histogram_offsets.get(name, off))
                bins.append(acc.layout.histogram_bins if name in acc.layout.histogram_offsets
                            else 0)
            acc.table = self
        self._slots = torch.tensor(slots, dtype=torch.long, device=device).reshape(-1, width)
        kinds = [slot.reduce for slot in MASK_SLOTS]
        self._slot_is_min = torch.tensor([k == "min" for k in kinds], device=device)
        self._slot_is_max = torch.tensor([k == "max" for k in kinds], device=device)
        self._hist_start = torch.tensor(hist_start, dtype=torch.long, device=device)
        self._bins = torch.tensor([max(b, 1) for b in bins], device=device)
        self._has_bins = torch.tensor([b > 0 for b in bins], device=device)
        self._drop()

    def _drop(self) -> None:
        self._forwards: list[int] = []  # each held forward's count position
        #: held masks by their number of values: each mask's values (a copy), its segment,
        #: and whether its forward counts histograms (masks of one size reduce as a matrix)
        self._held: dict[int, tuple[list[torch.Tensor], list[int], list[bool]]] = {}
        self._held_values = 0

    @property
    def holding(self) -> bool:
        """Whether forwards are held back, not reduced yet."""
        return bool(self._forwards)

    def detach(self) -> None:
        """The accumulators record each forward as it runs again (what is held is dropped)."""
        self._drop()
        self.stale = True
        for acc in self.accumulators:
            if acc.table is self:
                acc.table = None

    def gather(self, phase: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """``phase``'s rows of every block, one after the other (a copy, on the device; into
        ``out`` if given)."""
        if out is None:
            return self.base.index_select(0, self.rows[phase])
        return torch.index_select(self.base, 0, self.rows[phase], out=out)

    def empty(self, phase: str, which: list[bool] | None = None) -> None:
        """Empty ``phase``'s rows (``which``: of the blocks marked ``True``; all by default) in
        one operation. The training rows' held-back forwards are reduced first (then emptied
        with the rest)."""
        if phase == "train":
            self.settle()
        if which is None:
            self.base.index_copy_(0, self.rows[phase], self.initial)
            return
        keep = torch.tensor([w for w, n in zip(which, self._sizes, strict=True)
                             for _ in range(n)], device=self.base.device)
        self.base.index_copy_(0, self.rows[phase][keep], self.initial[keep])

    def hold(self, acc: Accumulator, masks: Mapping[str, torch.Tensor | None],
             histograms: bool) -> None:
        """Keep one eager training forward of ``acc`` (one of this table's) for
        :meth:`settle`: copies of its masks, so that what the forward recorded is measured
        whatever happens to its tensors later."""
        counted = histograms and acc.layout.histogram_bins > 0
        for name, segment in acc.held_segments.items():
            mask = masks.get(name)
            if mask is None or mask.numel() == 0:
                continue
            n = mask.numel()
            group = self._held.get(n)
            if group is None:
                group = self._held[n] = ([], [], [])
            group[0].append(mask.detach().reshape(-1).clone())
            group[1].append(segment)
            group[2].append(counted)
            self._held_values += n
        self._forwards.append(acc.held_forward)
        self._held_values += 1
        if self._held_values >= HELD_VALUES:  # a consumer that never reads: bounded
            self.settle()

    @torch.no_grad()
    def settle(self) -> None:
        """Add the held-back forwards to the training rows (nothing when none is held)."""
        if not self._forwards:
            return
        forwards, held = self._forwards, self._held
        self._drop()
        base = self.base
        device, dtype = base.device, base.dtype
        base.index_put_((torch.tensor(forwards, device=device),),
                        base.new_ones(len(forwards)), accumulate=True)
        if not held:
            return
        tables, owners = [], []
        for pieces, segments, counted in held.values():  # one matrix per mask size
            v = torch.stack(pieces).float()  # (masks, values)
            owner = torch.tensor(segments, device=device)
            tables.append(_row_slots(v, v.to(dtype), self.config))
            owners.append(owner)
            if any(counted):
                index, inside = _bin_index(v, self._bins[owner, None])
                weight = inside & self._has_bins[owner, None]
                if not all(counted):
                    weight &= torch.tensor(counted, device=device)[:, None]
                base.index_add_(0, (self._hist_start[owner, None] + index).reshape(-1),
                                weight.reshape(-1).to(dtype))
        table = _by_segment(torch.cat(tables), torch.cat(owners), len(self._slots))
        row = base[self._slots]
        base[self._slots] = torch.where(
            self._slot_is_min, torch.minimum(row, table),
            torch.where(self._slot_is_max, torch.maximum(row, table), row + table))


def _row_slots(v: torch.Tensor, v64: torch.Tensor, config: RecordingConfig) -> torch.Tensor:
    """``(rows, len(MASK_SLOTS))``: each slot of each row of ``v`` ``(rows, values)`` (float32,
    ``v64`` the same in the accumulator's dtype), from the slots' terms."""
    reduce = {"sum": lambda t: t.sum(1), "min": lambda t: t.amin(1), "max": lambda t: t.amax(1)}
    return torch.stack([reduce[slot.reduce](slot.term(v, v64, config)).to(v64.dtype)
                        for slot in MASK_SLOTS], dim=1)


def _by_segment(table: torch.Tensor, owners: torch.Tensor, segments: int) -> torch.Tensor:
    """``(segments, len(MASK_SLOTS))``: the rows of ``table`` (each the slots of one mask,
    ``owners`` its segment) combined per segment (sums added, extremes kept); an empty segment
    holds each slot's neutral value."""
    columns = []
    for j, slot in enumerate(MASK_SLOTS):
        column = table[:, j]
        if slot.reduce == "sum":
            columns.append(column.new_zeros(segments).index_add_(0, owners, column))
        else:
            columns.append(column.new_full((segments,), _NEUTRAL[slot.reduce]).scatter_reduce_(
                0, owners, column, "amin" if slot.reduce == "min" else "amax"))
    return torch.stack(columns, dim=1)


#: The largest mask a held-back forward may record (elements): below it a forward's own
#: reduction costs its few dozen operations' overhead, which the batch shares; above it the
#: values' own passes dominate, and a forward reduces them faster itself (on this project's
#: 2-core CPU the batch's per-value cost caught up near 8k values).
HELD_ELEMENTS = 4096
#: Values (and forwards) a table holds back at most, then it reduces them: a point usually
#: holds a forward or a few of each block; a consumer that records for long without reading
#: stays bounded (a megabyte of float32 masks).
HELD_VALUES = 1 << 18


#: CUDA graphs would freeze an answer decided when an op runs (the tag is torch >= 2.7's;
#: older ones run such an op eagerly).
CUDAGRAPH_UNSAFE = tuple(t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t)


@torch.library.custom_op("lightning_attn::histogram_counts", mutates_args=(),
                         tags=CUDAGRAPH_UNSAFE)
def histogram_counts(values: list[torch.Tensor], when: torch.Tensor, bins: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """``(len(values), bins)``: the counts of each of ``values`` in ``bins`` bins over
    ``[0, 1]`` if ``when`` (a 0-d bool tensor on the host), else zeros: decided when the op
    runs, not when it is traced. A compiled forward counts only at the points that write
    histograms, in the one graph it has for recording (a flag would add a graph; counting at
    every point cost more than the rest of the recording: inductor makes the scatter atomic
    adds)."""
    if bool(when):
        return torch.stack([_counts(v, bins, dtype) for v in values])
    return torch.zeros(len(values), bins, dtype=dtype, device=values[0].device)


@histogram_counts.register_fake
def _(values: list[torch.Tensor], when: torch.Tensor, bins: int,
      dtype: torch.dtype) -> torch.Tensor:
    return values[0].new_empty(len(values), bins, dtype=dtype)


def _bin_index(v: torch.Tensor, bins: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Each value's bin over [0, 1] (1.0 in the last), and whether it is counted: finite
    # values in [0, 1] only. ``bins``: one number, or each value's (at least 1).
    inside = torch.isfinite(v) & (v >= 0.0) & (v <= 1.0)
    index = (torch.where(inside, v, 0.0) * bins).long()
    if isinstance(bins, torch.Tensor):
        return torch.minimum(index, bins - 1), inside
    return index.clamp_(max=bins - 1), inside


def _counts(v: torch.Tensor, bins: int, dtype: torch.dtype) -> torch.Tensor:
    # index_add_, not histc (its parallel CPU loop stalls on busy machines) nor bincount (on
    # CUDA it reads the index range back to the host, and under torch.compile its output size
    # is data-dependent).
    index, inside = _bin_index(v, bins)
    return torch.zeros(bins, dtype=dtype, device=v.device).index_add_(0, index, inside.to(dtype))



#: A float attention mask entry at or below this hides its key (``-inf``, ``finfo.min``, the
#: ``-1e4`` / ``-1e9`` of older models); above it, the entry is a bias added to the logit. A
#: mask of a model whose hidden keys get a milder value (Swin's ``-100``) is given as booleans.
MASKED_BELOW = -1e4


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    # SDPA's broadcasting: a mask or bias of fewer dims lines up on the right.
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() < 4 else t


def _grouped(t: torch.Tensor, kv_heads: int, group: int) -> torch.Tensor:
    """``(b, Hq or 1, n, m)`` -> ``(b, kv_heads, group or 1, n, m)``: query heads grouped by the
    key head they share (grouped-query attention; head ``h`` uses key head ``h // group``)."""
    t = _as_4d(t)
    if t.shape[1] == 1:
        return t.unsqueeze(2)
    return t.reshape(t.shape[0], kv_heads, group, *t.shape[2:])


def _rows(t: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    # The chunk's queries of a grouped tensor (its query dim may broadcast).
    if t is None or t.shape[3] == 1:
        return t
    return t[:, :, :, start:stop]


def _reduce_chunk(
    s: torch.Tensor, visible: torch.Tensor | None, out: dict[str, torch.Tensor]
) -> None:
    """Add the rows of one chunk of logits ``s (B, Hk, g, c, Nk)`` (hidden keys: ``visible``
    False, broadcastable, or ``None`` when every key is visible) to ``out`` (each ``(Hk, g)``;
    only ``max_logit`` when that is all ``out`` holds)."""
    keys = s.shape[-1]
    if visible is not None:
        visible = visible.expand(s.shape)
        s = s.masked_fill(~visible, -math.inf)
    row_max = s.amax(dim=-1, keepdim=True)  # -inf for a row that sees no key; NaN stays
    out["max_logit"] = torch.maximum(out["max_logit"], row_max.amax(dim=(0, 3, 4)))
    if "count" not in out:
        return
    shifted = s - row_max.masked_fill(row_max == -math.inf, 0.0)
    e = shifted.exp()  # a hidden key: exp(-inf) = 0
    z = e.sum(dim=-1)
    if visible is not None:
        shifted = shifted.masked_fill(~visible, 0.0)  # 0 * -inf would be NaN
        n = visible.sum(dim=-1)
        counted = n >= 2
        log_n = n.clamp_min(2).to(s.dtype).log()
    else:
        counted = None
        log_n = math.log(keys) if keys >= 2 else 1.0
    # -sum p log p with p = e / z: log z - sum(e * shifted) / z
    entropy = (z.log() - (e * shifted).sum(dim=-1) / z) / log_n
    sink = e[..., 0] / z
    if counted is None:
        rows = s.shape[0] * s.shape[3] if keys >= 2 else 0
        count = s.new_full(s.shape[1:3], float(rows))
        if keys < 2:
            entropy, sink = entropy * 0.0, sink * 0.0
    else:
        count = counted.to(s.dtype).sum(dim=(0, 3))
        entropy = entropy.masked_fill(~counted, 0.0)
        sink = sink.masked_fill(~counted, 0.0)
    out["count"] = out["count"] + count
    out["sum_entropy"] = out["sum_entropy"] + entropy.sum(dim=(0, 3))
    out["sum_sink"] = out["sum_sink"] + sink.sum(dim=(0, 3))


def _visibility(
    mask: torch.Tensor | None, start: int, stop: int, keys: int, causal: bool,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(visible, added)`` of a chunk: which keys its queries may see (``None``: all), and
    the float mask's finite part added to the logits (``None``: nothing)."""
    visible = added = None
    if mask is not None:
        if mask.dtype == torch.bool:
            visible = mask
        else:
            visible = mask > MASKED_BELOW
            added = mask.masked_fill(~visible, 0.0)
    if causal:  # SDPA's is_causal: query i sees keys 0..i (upper-left aligned)
        rows = torch.arange(start, stop, device=device).unsqueeze(-1)
        cols = torch.arange(keys, device=device)
        lower = cols <= rows  # (c, Nk)
        visible = lower if visible is None else visible & lower
    return visible, added


def _start(
    heads: int, kv_heads: int, dtype: torch.dtype, device, max_only: bool = False
) -> dict[str, torch.Tensor]:
    shape = (kv_heads, heads // kv_heads)
    out = {"max_logit": torch.full(shape, -math.inf, dtype=dtype, device=device)}
    if not max_only:
        zeros = torch.zeros(shape, dtype=dtype, device=device)
        out.update(count=zeros, sum_entropy=zeros, sum_sink=zeros)
    return out


def _chunk_rows(batch: int, heads: int, queries: int, keys: int, chunk_elements: int) -> int:
    return max(1, min(queries, chunk_elements // max(1, batch * heads * keys)))


def _in_chunks(
    logits_of: Callable[[int, int], torch.Tensor], queries: int, rows: int,
    mask: torch.Tensor | None, causal: bool, out: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Reduce the logits of queries ``[start, stop)`` (``logits_of``: ``(B, Hk, g, c, Nk)``),
    ``rows`` queries at a time, into ``out``; each result flattened to ``(H,)``."""
    for start in range(0, queries, rows):
        stop = min(queries, start + rows)
        s = logits_of(start, stop)
        visible, added = _visibility(_rows(mask, start, stop), start, stop, s.shape[-1], causal,
                                     s.device)
        if added is not None:
            s = s + added.to(s.dtype)
        _reduce_chunk(s, visible, out)
    return {name: value.reshape(-1) for name, value in out.items()}


@torch.no_grad()
def head_reductions(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float | torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    causal: bool = False,
    softcap: float | None = None,
    chunk_elements: int,
    dtype: torch.dtype = torch.float64,
    max_only: bool = False,
) -> dict[str, torch.Tensor]:
    """The per-head sums of :data:`~.statistics.HEAD_SLOTS` of one attention call, from its
    queries and keys, ``chunk_elements`` logits at a time (never every head's ``N x N`` at
    once). Tensor operations only: compile-safe, no host sync.

    Args:
        q: queries ``(B, Hq, Nq, D)``, as the attention uses them (after any norm or rotary
            embedding).
        k: keys ``(B, Hk, Nk, D)``; ``Hq`` a multiple of ``Hk`` (grouped-query attention:
            query head ``h`` uses key head ``h // (Hq // Hk)``).
        scale: the logits' factor: a number, a tensor of ``Hq`` values (one per head) or one
            broadcastable to ``(B, Hq, 1, 1)``; ``None``: ``D ** -0.5``.
        mask: SDPA's ``attn_mask``, broadcastable to ``(B, Hq, Nq, Nk)``: booleans (True:
            the query may see the key) or floats added to the logits (an entry at or below
            :data:`MASKED_BELOW` hides its key).
        bias: floats added to the logits, broadcastable like ``mask`` (relative position
            bias, ALiBi).
        causal: query ``i`` sees keys ``0..i`` only (SDPA's ``is_causal``).
        softcap: logits become ``softcap * tanh(logits / softcap)`` before bias and mask
            (Gemma 2's soft capping).
        chunk_elements: logits computed at once (the queries are taken in chunks).
        dtype: the precision of the computation (the accumulator's).
        max_only: only ``max_logit`` (no softmax: what a per-step logit clip needs).

    Returns:
        ``count``, ``sum_entropy``, ``sum_sink``, ``max_logit``: each ``(Hq,)`` in ``dtype``.
    """
    logits_of, mask5 = _grouped_logits(q, k, scale, mask, bias, softcap, dtype)
    batch, heads, queries, keys = max(q.shape[0], k.shape[0]), q.shape[1], q.shape[2], k.shape[2]
    out = _start(heads, k.shape[1], dtype, q.device, max_only)
    rows = _chunk_rows(batch, heads, queries, keys, chunk_elements)
    return _in_chunks(logits_of, queries, rows, mask5, causal, out)


def _grouped_logits(
    q: torch.Tensor, k: torch.Tensor, scale: float | torch.Tensor | None,
    mask: torch.Tensor | None, bias: torch.Tensor | None, softcap: float | None,
    dtype: torch.dtype,
) -> tuple[Callable[[int, int], torch.Tensor], torch.Tensor | None]:
    """``(logits_of, mask)`` of :func:`head_reductions`' arguments: ``logits_of(start, stop)``
    the logits of queries ``[start, stop)`` as ``(B, Hk, g, c, Nk)`` (query heads grouped by
    their key head), with the scale, soft cap and bias applied; the mask grouped alike."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[-1] != k.shape[-1] or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"head statistics need queries (B, Hq, Nq, D) and keys (B, Hk, Nk, D) with Hq a "
            f"multiple of Hk, got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    heads, queries, dim = q.shape[1], q.shape[2], q.shape[3]
    kv_heads = k.shape[1]
    group = heads // kv_heads
    q5 = q.detach().to(dtype).reshape(q.shape[0], kv_heads, group, queries, dim)
    kt = k.detach().to(dtype).unsqueeze(2).transpose(-1, -2)  # (B, Hk, 1, D, Nk)
    if scale is None:
        scale = dim ** -0.5
    if isinstance(scale, torch.Tensor):
        scale = scale.detach().to(dtype)
        scale = _grouped(scale.reshape(1, -1, 1, 1) if scale.dim() == 1 else scale,
                         kv_heads, group)
    mask5 = None if mask is None else _grouped(mask.detach(), kv_heads, group)
    bias5 = None if bias is None else _grouped(bias.detach().to(dtype), kv_heads, group)

    def logits_of(start: int, stop: int) -> torch.Tensor:
        s = torch.matmul(q5[:, :, :, start:stop], kt) * scale  # (B, Hk, g, c, Nk)
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        return s if bias5 is None else s + _rows(bias5, start, stop)

    return logits_of, mask5


@torch.no_grad()
def first_query_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    scale: float | torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    causal: bool = False,
    softcap: float | None = None,
) -> torch.Tensor:
    """The attention of the first query (a ViT's class token) over the keys, averaged over
    the heads: ``(B, Nk)`` float32, each row summing to 1 (0 where no key is visible).
    Arguments as :func:`head_reductions`'s; one query's logits: ``B x H x Nk`` values."""
    logits_of, mask5 = _grouped_logits(q, k, scale, mask, bias, softcap, torch.float32)
    s = logits_of(0, 1)  # (B, Hk, g, 1, Nk)
    visible, added = _visibility(_rows(mask5, 0, 1), 0, 1, s.shape[-1], causal, s.device)
    if added is not None:
        s = s + added.to(s.dtype)
    if visible is not None:
        s = s.masked_fill(~visible.expand(s.shape), -math.inf)
    probs = torch.nan_to_num(s.softmax(dim=-1), nan=0.0)  # a row seeing no key: 0
    return probs.mean(dim=(1, 2, 3))


@torch.no_grad()
def logit_reductions(
    logits: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    chunk_elements: int,
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """:func:`head_reductions` of attention whose logits the forward computed already:
    ``logits (B, H, Nq, Nk)`` (scaled, with their biases, before the softmax), ``mask`` and
    ``causal`` as there. For a softmax over positions (a gate's spatial attention: one query,
    the positions as keys)."""
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, H, Nq, Nk), got shape {tuple(logits.shape)}")
    batch, heads, queries, keys = logits.shape
    s5 = logits.detach().to(dtype).unsqueeze(2).transpose(1, 2)  # (B, 1, H, Nq, Nk)
    mask5 = None if mask is None else _grouped(mask.detach(), 1, heads)
    out = _start(heads, 1, dtype, logits.device)
    rows = _chunk_rows(batch, heads, queries, keys, chunk_elements)
    return _in_chunks(lambda start, stop: s5[:, :, :, start:stop], queries, rows, mask5,
                      causal, out)
