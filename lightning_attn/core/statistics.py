"""Every statistic of an attention block, declared once; everything else is derived.

A statistic has two declarations, both in this file (which imports no torch: the report reads
it without):

* **Slots** (:data:`MASK_SLOTS`, :data:`ROUTER_SLOTS`, :data:`HEAD_SLOTS`): what a forward
  adds to the block's
  on-device accumulator and how accumulators combine across forwards, micro-batches and
  processes (``sum``, ``min`` or ``max``) — torchmetrics' ``add_state(dist_reduce_fx=...)``.
  :class:`~.accumulator.Accumulator` lays them out and adds them inside the forward with
  tensor operations only (each measure is a function of tensors, using their methods).
* **Quantities**: the fields of :class:`MaskStats`, :class:`RouterStats`, :class:`HeadStats` (and
  :data:`PARAM_QUANTITIES`), each with its :func:`quantity` metadata: how it is computed from
  the reduced slots on the host, its tag leaf, its chart and its title. Tags
  (:mod:`.tags`), the TensorBoard chart layout, the summary table (:mod:`.presentation`),
  the report's series and figures all iterate these declarations.

Adding a statistic is a slot (if it needs a new sum) and a field here; a warning on it is one
:class:`~.problems.ProblemKind` in :mod:`.problems` and its category in :mod:`.categories`.

The accumulator holds one row per phase (:data:`PHASES`): phases never mix.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

from .validation import check_fraction, check_int

__all__ = [
    "HEAD_SLOTS",
    "HISTOGRAM_BINS",
    "Cell",
    "Chart",
    "Comparison",
    "MASK_SLOTS",
    "PARAM_QUANTITIES",
    "PHASES",
    "ROUTER_SLOTS",
    "SECTIONS",
    "BlockInfo",
    "BlockStats",
    "GlobalStats",
    "HeadStats",
    "MaskStats",
    "ParameterSpec",
    "Quantity",
    "RecordingConfig",
    "RouterStats",
    "Slot",
    "StatisticsLayout",
    "all_quantities",
    "columns",
    "materialize",
    "block_stats",
    "contract_breaches",
    "from_logged",
    "logged_quantities",
    "quantities",
    "router_entropy",
]

#: The statistics a consumer can ask for: router weights, masks, scalar parameters, and the
#: heads of softmax attention (transformer self-attention, a gate's spatial softmax).
SECTIONS: tuple[str, ...] = ("router", "mask", "param", "heads")
#: The phases a forward records in, one accumulator row each (Lightning's loops).
PHASES: tuple[str, ...] = ("train", "val", "test", "predict")
#: Default number of equal bins over ``[0, 1]`` of the mask and router-weight histograms.
HISTOGRAM_BINS = 50
#: Group names a mask may not take (they name the router's, the parameters' and the heads'
#: tags).
RESERVED_GROUPS: tuple[str, ...] = ("router", "param", "heads")
#: Default bound on the attention logits held at once while the head statistics of one
#: forward are computed, in elements (``2**22`` float64 values: 32 MiB per temporary).
HEAD_CHUNK_ELEMENTS = 2**22



@dataclass(frozen=True)
class RecordingConfig:
    """How a block records: saturation thresholds, histogram bins (``0``: none), and how many
    attention logits the head statistics hold at once (``head_chunk_elements``: the queries
    are taken in chunks of ``max(1, head_chunk_elements // (batch * heads * keys))``).

    Frozen: its values are constants of the compiled graph, fixed for a run.
    """

    saturation_low: float = 0.05
    saturation_high: float = 0.95
    histogram_bins: int = HISTOGRAM_BINS
    head_chunk_elements: int = HEAD_CHUNK_ELEMENTS

    def __post_init__(self) -> None:
        check_fraction("saturation_low", self.saturation_low)
        check_fraction("saturation_high", self.saturation_high)
        check_int("histogram_bins", self.histogram_bins, 0)
        check_int("head_chunk_elements", self.head_chunk_elements, 1)
        if not self.saturation_low < self.saturation_high:
            raise ValueError(
                f"saturation_low must be below saturation_high, got saturation_low="
                f"{self.saturation_low} and saturation_high={self.saturation_high}"
            )


# ------------------------------------------------------------------------------------------
# Slots: what a forward adds, and how it reduces
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One accumulator entry of a mask or a router.

    Attributes:
        name: its name (the quantities read it by this name).
        reduce: how two accumulators combine: ``"sum"``, ``"min"`` or ``"max"``.
        measure: one forward's contribution, a 0-d tensor (``(K,)`` when ``per_branch``,
            ``(H,)`` when ``per_head``) in the accumulator's dtype: ``measure(v, v64, config)``
            of a mask flattened to ``v`` (float32) and ``v64`` (accumulator dtype);
            ``measure(w, dtype)`` of router weights ``w (B, K)`` (float32); ``measure(r)`` of
            the per-head reductions ``r`` (name -> ``(H,)`` tensor,
            :func:`~.accumulator.head_reductions`).
        per_branch: one entry per router branch.
        per_head: one entry per attention head.
        term: a mask slot's part of each value, ``term(v, v64, config)`` ``(n,)``: float64
            values whose sum is ``measure``'s (a ``"sum"`` slot), or the values whose extreme
            it is (``"min"`` / ``"max"``); the forwards recorded in batches
            (:func:`~.accumulator.settle`) reduce it over many masks at once.
    """

    name: str
    reduce: str
    measure: Callable[..., torch.Tensor]
    per_branch: bool = False
    per_head: bool = False
    term: Callable[..., torch.Tensor] | None = None


def router_entropy(router_weights: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy ``-sum_k w_k log w_k`` (natural log, ``0 log 0 = 0``): ``(B,K) -> (B,)``.
    """
    w = router_weights.detach().float()
    return -w.xlogy(w).sum(dim=1)


def _count(v: torch.Tensor, v64: torch.Tensor, config: RecordingConfig) -> torch.Tensor:
    # A fill with the element count, not a tensor copied from the host.
    return v64.new_full((), v.numel())


def _flags_counted(flags: torch.Tensor) -> torch.Tensor:
    # The number of 1.0s in a tensor of 0.0 / 1.0: summed in float32 (exact below 2**24
    # values), as integers for a larger mask (int64 exists on every device).
    return flags.sum() if flags.numel() < 1 << 24 else flags.long().sum()


#: A mask's slots. float64 sums: the std comes from E[x^2] - E[x]^2, which loses digits to
#: cancellation when the mask barely varies, exactly where the collapse warning decides. A NaN
#: or Inf turns the sums and extremes non-finite, as the value they stand for is; ``n_finite``
#: says how many. A measure may give a 0-d tensor of any dtype (the row's ``torch.stack``
#: promotes it, exactly): a cast per slot cost as much as the slot.
MASK_SLOTS: tuple[Slot, ...] = (
    Slot("count", "sum", _count, term=lambda v, v64, c: v64.new_ones(()).expand_as(v64)),
    Slot("sum", "sum", lambda v, v64, c: v64.sum(), term=lambda v, v64, c: v64),
    Slot("sum_sq", "sum", lambda v, v64, c: v64.dot(v64),  # one pass, no temporary
         term=lambda v, v64, c: v64 * v64),
    Slot("n_low", "sum", lambda v, v64, c: (v < c.saturation_low).count_nonzero(),
         term=lambda v, v64, c: (v < c.saturation_low).to(v64.dtype)),
    Slot("n_high", "sum", lambda v, v64, c: (v > c.saturation_high).count_nonzero(),
         term=lambda v, v64, c: (v > c.saturation_high).to(v64.dtype)),
    # x - x is 0, NaN for NaN and Inf
    Slot("n_finite", "sum", lambda v, v64, c: _flags_counted((v - v).eq_(0.0)),
         term=lambda v, v64, c: ((v - v) == 0).to(v64.dtype)),
    Slot("min", "min", lambda v, v64, c: v.amin(), term=lambda v, v64, c: v),
    Slot("max", "max", lambda v, v64, c: v.amax(), term=lambda v, v64, c: v),
)

#: A router's slots (``count`` counts samples). The extremes of the weights and of their row
#: sums say whether they were weights on the simplex (:func:`contract_breaches`).
ROUTER_SLOTS: tuple[Slot, ...] = (
    Slot("count", "sum", lambda w, dtype: w.new_full((), w.shape[0], dtype=dtype)),
    Slot("sum_entropy", "sum", lambda w, dtype: router_entropy(w).sum(dtype=dtype)),
    Slot("n_finite", "sum", lambda w, dtype: w.isfinite().all(dim=1).sum(dtype=dtype)),
    Slot("sum_w", "sum", lambda w, dtype: w.sum(dim=0, dtype=dtype), per_branch=True),
    Slot("w_min", "min", lambda w, dtype: w.amin()),  # float32: the row's cat promotes it
    Slot("row_sum_min", "min", lambda w, dtype: w.sum(dim=1).amin()),
    Slot("row_sum_max", "max", lambda w, dtype: w.sum(dim=1).amax()),
)

#: The slots of a block's attention heads, one entry per head each. Rows are the (batch,
#: query) pairs of every forward; ``count`` counts those that see at least two keys (a query
#: that may see one key has no choice to measure); ``sum_entropy`` adds their entropy divided
#: by the log of the number of keys they may see (1: uniform, 0: one-hot), ``sum_sink`` their
#: attention mass on the first key; ``max_logit`` is the largest logit a query may see (scaled,
#: with the biases and masks the model applies, before the softmax).
HEAD_SLOTS: tuple[Slot, ...] = tuple(
    Slot(name, reduce, lambda r, _name=name: r[_name], per_head=True)
    for name, reduce in (("count", "sum"), ("sum_entropy", "sum"), ("sum_sink", "sum"),
                         ("max_logit", "max"))
)


def slot_width(slot: Slot, k: int, heads: int = 0) -> int:
    """Entries of ``slot`` in a row of a block whose router has ``k`` branches and whose
    attention has ``heads`` heads."""
    return k if slot.per_branch else heads if slot.per_head else 1


@dataclass(frozen=True)
class StatisticsLayout:
    """Where each slot of one block sits in one row of its accumulator.

    Fixed by what the block declares (``mask_names``, ``num_branches``, ``num_heads``) and by
    the number of histogram bins (``0``: no histograms), so that every process agrees on it
    before any forward has run. A row is: the forward count, each mask's :data:`MASK_SLOTS`,
    the router's :data:`ROUTER_SLOTS` (if any), the heads' :data:`HEAD_SLOTS` (if any, each
    ``num_heads`` wide), then the histogram bins of each mask and of the router.

    Attributes:
        mask_offsets: mask name -> offset of its slots.
        router_offset: offset of the router's slots (``None``: no router).
        head_offset: offset of the heads' slots (``None``: no heads).
        histogram_offsets: mask name or ``"router"`` -> offset of its bins.
        size: entries in a row.
        reductions: how each entry combines (``sum``, ``min``, ``max``).
    """

    mask_names: tuple[str, ...]
    num_branches: int | None = None
    histogram_bins: int = 0
    num_heads: int | None = None
    mask_offsets: dict[str, int] = field(init=False, repr=False, compare=False)
    router_offset: int | None = field(init=False, repr=False, compare=False)
    head_offset: int | None = field(init=False, repr=False, compare=False)
    histogram_offsets: dict[str, int] = field(init=False, repr=False, compare=False)
    size: int = field(init=False, repr=False, compare=False)
    reductions: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        clash = [n for n in self.mask_names if n in RESERVED_GROUPS or "/" in n or not n]
        if clash:
            raise ValueError(
                f"mask_names {clash} are not allowed: a mask name is a tag part, so it must "
                f"be non-empty, without '/', and none of {list(RESERVED_GROUPS)}"
            )
        if self.num_heads is not None:
            check_int("num_heads", self.num_heads, 1)
        k, h, bins = self.num_branches or 0, self.num_heads or 0, self.histogram_bins
        kinds = ["sum"]  # forwards
        masks = {}
        for name in self.mask_names:
            masks[name] = len(kinds)
            kinds += [s.reduce for s in MASK_SLOTS]
        router = None
        if k:
            router = len(kinds)
            kinds += [s.reduce for s in ROUTER_SLOTS for _ in range(slot_width(s, k))]
        heads = None
        if h:
            heads = len(kinds)
            kinds += [s.reduce for s in HEAD_SLOTS for _ in range(slot_width(s, k, h))]
        hists = {}
        if bins:
            for name in (*self.mask_names, *(("router",) if k else ())):
                hists[name] = len(kinds)
                kinds += ["sum"] * bins
        for name, value in (
            ("mask_offsets", masks), ("router_offset", router), ("head_offset", heads),
            ("histogram_offsets", hists), ("size", len(kinds)), ("reductions", tuple(kinds)),
        ):
            object.__setattr__(self, name, value)

    def slots(self, values: Sequence[float], offset: int, declared: Sequence[Slot]) -> _Slots:
        """The host values of the slots ``declared`` starting at ``offset`` of a row."""
        k, h = self.num_branches or 0, self.num_heads or 0
        out, pos = {}, offset
        for slot in declared:
            width = slot_width(slot, k, h)
            out[slot.name] = (tuple(values[pos:pos + width]) if slot.per_branch or slot.per_head
                              else values[pos])
            pos += width
        return _Slots(out)


class _Slots(dict):
    """Reduced slot values by name, readable as attributes (``s.sum / s.count``): columns, one
    entry per item (a mask, a router, the heads of a block) on the first axis, ``(n,)``, or
    ``(n, K)`` / ``(n, H)`` for the per-branch and per-head slots."""

    __getattr__ = dict.__getitem__


# ------------------------------------------------------------------------------------------
# Quantities: what is reported, each declared once
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chart:
    """Where a quantity is drawn in the report's block figure: its panel's title and the
    curve's label (a format string over ``{mask}``, ``{branch}``, ``{param}`` and the
    thresholds' fields); ``band``: ``"low"``/``"high"`` draws it as the edge of a shaded band
    instead of a curve."""

    panel: str
    label: str
    band: str | None = None


@dataclass(frozen=True)
class Cell:
    """Where a quantity shows in the console's summary table: the ``column`` it joins, and
    how one value is written (``format`` over ``{value}``, and ``{branch}`` or ``{symbol}``
    for per-branch and parameter quantities). Quantities that share a column and a ``line``
    are written on one line (per mask), joined by ``join`` (``"0.50±0.10"``); a per-branch
    quantity takes a line per branch, a parameter quantity a line per parameter."""

    column: str
    format: str = "{value:.2f}"
    join: str = " "
    justify: str = "left"
    line: int = 0


@dataclass(frozen=True)
class Comparison:
    """A quantity compared across runs in the report (one panel per run): the figure's
    ``title`` and its y range (``None``: automatic)."""

    title: str
    ylim: tuple[float, float] | None = None


@dataclass(frozen=True)
class Quantity:
    """One reported statistic.

    Attributes:
        name: the field's name (``"std"``).
        group: ``"mask"``, ``"router"``, ``"param"`` or ``"heads"``.
        tag: its tag leaf (``"std"``, ``"usage_{branch}"``, ``"{param}_grad_norm"``), or
            ``None`` when it is not logged.
        title: what it is, for chart titles and the docs (``"{mask} std"``).
        value: from the reduced slots (live), or ``None`` when derived: a function of columns
            (:class:`_Slots`, one entry per item on the first axis) giving a column, so one
            call computes the quantity for every mask, router or head group of a point.
        derive: from the group's other quantities (columns by name): what a reader of logged
            scalars uses when the quantity is not logged.
        inputs: the quantities ``derive`` reads (a reader derives it where they are logged).
        chart: where the report's block figure draws it.
        cell: where the console's summary table shows it.
        compare: the report's comparison of runs that shows it.
        per_branch: one value per router branch (a tuple).
        per_head: one value per attention head (a tuple; not a scalar: the per-head values
            go to :func:`~.tags.head_record`, the scalars are their summaries).
    """

    name: str
    group: str
    tag: str | None
    title: str
    value: Callable[[_Slots], Any] | None = None
    derive: Callable[[Mapping[str, Any]], Any] | None = None
    inputs: tuple[str, ...] = ()
    chart: Chart | None = None
    cell: Cell | None = None
    compare: Comparison | None = None
    per_branch: bool = False
    per_head: bool = False

    def leaf(self, branch: int | None = None, param: str | None = None) -> str:
        """The tag leaf for one branch / parameter."""
        return self.tag.format(branch=branch, param=param)


def quantity(group: str, tag: str | None, title: str, default: Any = math.nan, **kwargs: Any):
    """A dataclass field declared as a :class:`Quantity` (its name is the field's)."""
    spec = dict(group=group, tag=tag, title=title, **kwargs)
    return field(default=default, metadata={"quantity": spec})


@functools.cache
def quantities(stats_class: type) -> tuple[Quantity, ...]:
    """The :class:`Quantity` declarations of :class:`MaskStats`, :class:`RouterStats` or
    :class:`HeadStats`."""
    return tuple(
        Quantity(name=f.name, **f.metadata["quantity"])
        for f in dataclasses.fields(stats_class) if "quantity" in f.metadata
    )


def _rows(q: Mapping[str, Any]) -> int:
    """The number of items of a group of columns."""
    return len(next(iter(q.values()))) if q else 1


def _column(q: Mapping[str, Any], name: str, default: float) -> np.ndarray:
    found = q.get(name)
    return np.full(_rows(q), default) if found is None else np.asarray(found, dtype=float)


def _any_nonfinite(*names: str) -> Callable[[Mapping[str, Any]], np.ndarray]:
    # Counts are not logged: a reader sees only whether the statistics a NaN or Inf always
    # reaches (the sums behind them) are NaN or Inf.
    def derive(q: Mapping[str, Any]) -> np.ndarray:
        bad = np.zeros(_rows(q), dtype=bool)
        for name in names:
            if name in q:
                values = np.asarray(q[name], dtype=float)
                bad |= ~np.isfinite(values).reshape(len(bad), -1).all(axis=1)
        return bad.astype(float)

    return derive


def _ones(q: Mapping[str, Any]) -> np.ndarray:
    return np.ones(_rows(q))


def _divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.true_divide(a, b)


def _std(s: _Slots) -> np.ndarray:
    # NaN for a NaN or Inf value, as the sums; NaN as well where the unbiased std is
    # undefined: one value (batch 1 and a 1x1 map, a gate of one channel).
    count, total, squares = s.count, s.sum, s.sum_sq
    defined = np.isfinite(total) & np.isfinite(squares) & (count > 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = (squares - total * total / count) / (count - 1)
    return np.where(defined, np.sqrt(np.maximum(np.where(defined, var, 0.0), 0.0)), math.nan)


@dataclass(frozen=True)
class MaskStats:
    """Statistics of one mask over every value it took in a point (global batch).

    ``mean``, ``std`` (unbiased, like :meth:`torch.Tensor.std`), ``min`` and ``max``;
    ``sat_low`` / ``sat_high`` are the shares of values below / above the saturation
    thresholds, ``saturated`` their sum; ``nonfinite`` counts NaN and Inf values (then
    ``mean``, ``std`` and the extremes are NaN or Inf too, as the values they stand for).

    A point of a single value has no unbiased std: ``std`` is NaN with a finite ``mean``
    (:attr:`std_defined` is ``False``), and no rule judges it — undefined, not non-finite.
    """

    count: int = quantity("mask", None, "{mask} values counted", 0,
                          value=lambda s: s.count, derive=_ones)
    mean: float = quantity("mask", "mean", "{mask} mean", value=lambda s: _divide(s.sum, s.count),
                           chart=Chart("mask mean", "mean"),
                           cell=Cell("mean±std", join="±", justify="right"),
                           compare=Comparison("mask mean", (0.0, 1.0)))
    std: float = quantity("mask", "std", "{mask} std", value=_std,
                          chart=Chart("mask std", "std"),
                          cell=Cell("mean±std", join="±", justify="right"),
                          compare=Comparison("mask std"))
    sat_low: float = quantity("mask", "sat_low", "{mask} share below saturation_low", 0.0,
                              value=lambda s: _divide(s.n_low, s.count),
                              chart=Chart("mask saturation (share of values)",
                                          "below {saturation_low:g}"),
                              cell=Cell("sat\nlo/hi", "{value:.0%}", "/", "right"))
    sat_high: float = quantity("mask", "sat_high", "{mask} share above saturation_high", 0.0,
                               value=lambda s: _divide(s.n_high, s.count),
                               chart=Chart("mask saturation (share of values)",
                                           "above {saturation_high:g}"),
                               cell=Cell("sat\nlo/hi", "{value:.0%}", "/", "right"))
    nonfinite: int = quantity("mask", None, "{mask} NaN or Inf values", 0,
                              value=lambda s: np.rint(s.count - s.n_finite),
                              # the mean, not the std: a std is NaN for one value as well
                              derive=_any_nonfinite("mean"), inputs=("mean",))
    min: float = quantity("mask", "min", "{mask} min", value=lambda s: s.min,
                          chart=Chart("mask mean", "min to max", band="low"))
    max: float = quantity("mask", "max", "{mask} max", value=lambda s: s.max,
                          chart=Chart("mask mean", "min to max", band="high"))
    saturated: float = quantity("mask", None, "{mask} saturated share (below + above)",
                                derive=lambda q: (_column(q, "sat_low", 0.0)
                                                  + _column(q, "sat_high", 0.0)),
                                inputs=("sat_low", "sat_high"),
                                chart=Chart("mask saturation (share of values)",
                                            "below + above"),
                                compare=Comparison(
                                    "saturated share of mask values (below + above)",
                                    (0.0, 1.0)))

    def __post_init__(self) -> None:
        if math.isnan(self.saturated):  # derived unless given
            object.__setattr__(self, "saturated", self.sat_low + self.sat_high)

    @property
    def std_defined(self) -> bool:
        """Whether ``std`` means something: more than one value, none of them NaN or Inf (a
        NaN ``std`` beside a finite ``mean`` is a point of one value)."""
        return math.isfinite(self.std)


def _normalised(entropy: np.ndarray, k: int) -> np.ndarray:
    return np.asarray(entropy, dtype=float) / math.log(k) if k > 1 else np.zeros_like(
        np.asarray(entropy, dtype=float))


def _branches(q: Mapping[str, Any]) -> int:
    usage = q.get("usage")
    return 0 if usage is None else np.asarray(usage).reshape(_rows(q), -1).shape[1]


@dataclass(frozen=True)
class RouterStats:
    """Router statistics over the samples of a point (global batch).

    ``entropy`` is the mean over samples of ``-sum_k w_k log w_k``; ``entropy_norm`` the same
    divided by ``log K`` (0 when ``K == 1``); ``usage[k]`` the mean weight of branch ``k``.
    ``nonfinite`` counts the samples with a NaN or Inf weight (they make the others NaN).
    """

    count: int = quantity("router", None, "router samples counted", 0,
                          value=lambda s: s.count, derive=_ones)
    entropy: float = quantity("router", "entropy", "router entropy",
                              value=lambda s: _divide(s.sum_entropy, s.count),
                              chart=Chart("router entropy", "entropy (nats)"))
    entropy_norm: float = quantity("router", "entropy_norm",
                                   "router entropy / log K (1 = uniform)",
                                   value=lambda s: _normalised(_divide(s.sum_entropy, s.count),
                                                               s.sum_w.shape[1]),
                                   derive=lambda q: _normalised(_column(q, "entropy", math.nan),
                                                                _branches(q)),
                                   inputs=("entropy", "usage"),
                                   chart=Chart("router entropy",
                                               "normalised (0: one branch, 1: uniform)"),
                                   cell=Cell("router\nH/logK", "H {value:.2f}"),
                                   compare=Comparison("normalised router entropy",
                                                      (0.0, 1.05)))
    usage: tuple[float, ...] = quantity("router", "usage_{branch}", "usage of {branch}", (),
                                        value=lambda s: _divide(s.sum_w, s.count[:, None]),
                                        chart=Chart("branch usage (mean router weight)",
                                                    "{branch}"),
                                        cell=Cell("router\nH/logK", "{branch} {value:.2f}",
                                                  line=1),
                                        per_branch=True)
    nonfinite: int = quantity("router", None, "router samples with NaN or Inf", 0,
                              value=lambda s: np.rint(s.count - s.n_finite),
                              derive=_any_nonfinite("usage", "entropy_norm"),
                              inputs=("usage", "entropy_norm"))
    weight_min: float = quantity("router", None, "smallest router weight",
                                 value=lambda s: s.w_min)
    row_sum_min: float = quantity("router", None, "smallest sum of a sample's router weights",
                                  value=lambda s: s.row_sum_min)
    row_sum_max: float = quantity("router", None, "largest sum of a sample's router weights",
                                  value=lambda s: s.row_sum_max)

    @property
    def num_branches(self) -> int:
        return len(self.usage)


def _per_head(s: _Slots, name: str) -> np.ndarray:
    # A head whose queries never saw two keys has no entropy or sink share to report.
    return np.where(s.count > 0, _divide(s[name], s.count), math.nan)


def _heads_nonfinite(s: _Slots) -> np.ndarray:
    # A NaN or Inf query or key makes its head's sums (and its max logit) NaN or Inf.
    bad = ~np.isfinite(s.sum_entropy) | np.isnan(s.max_logit) | (s.max_logit == math.inf)
    return bad.sum(axis=1).astype(float)


#: How :func:`_of_heads` reduces the heads: a ufunc, and what fills a head left out.
_REDUCE = {"min": (np.min, math.inf), "max": (np.max, -math.inf), "mean": (np.sum, 0.0)}


def _of_heads(per_head: str, reduce: str, counted: bool = True):
    """A summary over heads of the per-head quantity ``per_head``: ``reduce`` (``"min"``,
    ``"max"``, ``"mean"``) of the heads that counted a query (``counted``; every head for the
    max logit), NaN if one of them is NaN or none counted."""
    ufunc, fill = _REDUCE[reduce]

    def derive(q: Mapping[str, Any]) -> np.ndarray:
        values = np.asarray(q.get(per_head, ()), dtype=float).reshape(_rows(q), -1)
        counts = q.get("head_count")
        measured = (np.ones_like(values, dtype=bool) if counts is None or not counted
                    else np.asarray(counts, dtype=float).reshape(values.shape) > 0)
        n = measured.sum(axis=1)
        if values.shape[1] == 0:
            return np.full(len(values), math.nan)
        out = ufunc(np.where(measured, values, fill), axis=1)
        if reduce == "mean":
            out = _divide(out, n)
        nan = (np.isnan(values) & measured).any(axis=1) | (n == 0)
        return np.where(nan, math.nan, out)

    return derive


@dataclass(frozen=True)
class HeadStats:
    """Statistics of a block's attention heads over the queries of a point (global batch).

    Per head (tuples, one value per head): ``head_entropy``, the mean over queries of the
    entropy of its attention divided by the log of the number of keys the query may see (1:
    uniform, 0: one-hot); ``head_max_logit``, the largest attention logit any query may see
    (scaled, with the biases and masks the model applies, before the softmax);
    ``head_sink``, the mean attention mass on the first key. Queries that may see fewer than
    two keys are left out of the entropy and the sink share (``head_count``: those counted).

    Summaries over the heads (the logged scalars): ``entropy_min`` (the lowest head),
    ``entropy_mean``, ``max_logit`` (the largest over heads), ``sink_max`` and ``sink_mean``.
    ``nonfinite`` counts the heads whose statistics are NaN or Inf.
    """

    head_count: tuple[int, ...] = quantity(
        "heads", None, "queries counted per head", (), per_head=True,
        value=lambda s: s.count)
    head_entropy: tuple[float, ...] = quantity(
        "heads", None, "normalised attention entropy of each head", (), per_head=True,
        value=lambda s: _per_head(s, "sum_entropy"))
    head_max_logit: tuple[float, ...] = quantity(
        "heads", None, "max attention logit of each head", (), per_head=True,
        value=lambda s: s.max_logit)
    head_sink: tuple[float, ...] = quantity(
        "heads", None, "attention mass on the first key, of each head", (), per_head=True,
        value=lambda s: _per_head(s, "sum_sink"))
    entropy_min: float = quantity(
        "heads", "entropy_min", "lowest head entropy / log(keys) (1 = uniform)",
        derive=_of_heads("head_entropy", "min"), inputs=("head_entropy",),
        chart=Chart("head entropy (normalised: 0 one-hot, 1 uniform)", "lowest head"),
        cell=Cell("heads\nH min/mean", "H {value:.2f}", "/"))
    entropy_mean: float = quantity(
        "heads", "entropy_mean", "mean head entropy / log(keys)",
        derive=_of_heads("head_entropy", "mean"), inputs=("head_entropy",),
        chart=Chart("head entropy (normalised: 0 one-hot, 1 uniform)", "mean over heads"),
        cell=Cell("heads\nH min/mean", "{value:.2f}", "/"))
    max_logit: float = quantity(
        "heads", "max_logit", "max attention logit over heads (before softmax)",
        derive=_of_heads("head_max_logit", "max", counted=False),
        inputs=("head_max_logit",),
        chart=Chart("max attention logit", "max over heads"),
        cell=Cell("heads\nH min/mean", "logit {value:.1f}", line=1))
    sink_max: float = quantity(
        "heads", "sink_max", "largest head share of attention on the first key",
        derive=_of_heads("head_sink", "max"), inputs=("head_sink",),
        chart=Chart("attention sink (mass on the first key)", "largest head"),
        cell=Cell("heads\nH min/mean", "sink {value:.2f}", line=2))
    sink_mean: float = quantity(
        "heads", "sink_mean", "mean head share of attention on the first key",
        derive=_of_heads("head_sink", "mean"), inputs=("head_sink",),
        chart=Chart("attention sink (mass on the first key)", "mean over heads"))
    nonfinite: int = quantity(
        "heads", None, "heads with NaN or Inf statistics", 0, value=_heads_nonfinite,
        derive=_any_nonfinite("entropy_mean", "max_logit"), inputs=("entropy_mean", "max_logit"))

    @property
    def num_heads(self) -> int:
        return len(self.head_entropy)


#: The scalar parameters' quantities (temperature, alpha, ...; read outside the forward).
PARAM_QUANTITIES: tuple[Quantity, ...] = (
    Quantity("value", "param", "{param}", "{param}", chart=Chart("parameters", "{param}"),
             cell=Cell("params", "{symbol} {value:.2f}"),
             compare=Comparison("attention parameters")),
    Quantity("grad_norm", "param", "{param}_grad_norm", "{param} gradient norm",
             chart=Chart("gradient norms of the learnable parameters", "{param}")),
)


@functools.cache
def all_quantities() -> tuple[Quantity, ...]:
    """Every reported quantity, section by section (:data:`SECTIONS`: the router's, masks',
    the heads', then the parameters'): the order of the table's columns and the report's
    panels."""
    return quantities(RouterStats) + quantities(MaskStats) + quantities(HeadStats) + (
        PARAM_QUANTITIES)


def columns(stats_class: type, s: _Slots) -> dict[str, np.ndarray]:
    """Every quantity of ``stats_class`` (:class:`MaskStats`, :class:`RouterStats`,
    :class:`HeadStats`) for every item of the slot columns ``s``, as columns: one call per
    quantity however many masks, routers or heads a point holds."""
    values: dict[str, np.ndarray] = {}
    for q in quantities(stats_class):
        if q.value is not None:
            values[q.name] = np.asarray(q.value(s), dtype=float)
    for q in quantities(stats_class):
        if q.value is None and q.derive is not None:
            values[q.name] = np.asarray(q.derive(values), dtype=float)
    return values


@functools.cache
def _integer_fields(stats_class: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(stats_class) if "int" in str(f.type))


def materialize(stats_class: type, cols: Mapping[str, np.ndarray], i: int) -> Any:
    """Item ``i`` of the columns ``cols`` as a ``stats_class`` (Python numbers and tuples)."""
    ints = _integer_fields(stats_class)
    kwargs: dict[str, Any] = {}
    for name, col in cols.items():
        item = col[i]
        if np.ndim(item):
            kwargs[name] = tuple(int(x) if name in ints else x for x in item.tolist())
        else:
            kwargs[name] = int(item) if name in ints else float(item)
    return stats_class(**kwargs)


def _one_row(values: Mapping[str, Any]) -> _Slots:
    """Scalars and tuples by name as columns of one item."""
    return _Slots({k: np.asarray([v], dtype=float) for k, v in values.items()})


def logged_quantities(stats_class: type, logged: Mapping[str, np.ndarray]
                      ) -> dict[str, np.ndarray]:
    """Every quantity of :class:`MaskStats` / :class:`RouterStats` / :class:`HeadStats` as
    columns, from the columns of the quantities that were logged (``(n,)``, ``(n, K)``):
    the rest derived where they can be (``nonfinite``: 1 when a logged value is NaN or
    Inf), else their defaults."""
    values = dict(logged)
    rows = _rows(values)
    for q in quantities(stats_class):
        if q.name not in values:
            if q.derive is not None:
                values[q.name] = np.asarray(q.derive(values), dtype=float)
            else:
                default = _defaults(stats_class)[q.name]
                values[q.name] = (np.zeros((rows, 0)) if isinstance(default, tuple)
                                  else np.full(rows, float(default)))
    return values


@functools.cache
def _defaults(stats_class: type) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(stats_class)}


def from_logged(stats_class: type, logged: Mapping[str, Any]) -> Any:
    """A :class:`MaskStats` / :class:`RouterStats` / :class:`HeadStats` from logged quantities
    (name -> value): :func:`logged_quantities` of one item."""
    values = _one_row({q.name: logged[q.name] for q in quantities(stats_class)
                       if q.name in logged})
    return materialize(stats_class, logged_quantities(stats_class, values), 0)


# ------------------------------------------------------------------------------------------
# Blocks and points
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParameterSpec:
    """What a block declares about one of its scalar parameters.

    ``low``/``high``: the range in which it keeps its meaning; each a number, or the name of a
    :class:`~.problems.HealthThresholds` field (``"temperature_min"``). ``margin``: how far
    outside the range a learnable value may go before it has drifted (a number or a field
    name). ``symbol``: its short name in the summary table. ``hint``: what to do when it
    drifts.
    """

    low: float | str | None = None
    high: float | str | None = None
    margin: float | str = 0.0
    symbol: str = ""
    hint: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ParameterSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in names})


@dataclass(frozen=True)
class BlockInfo:
    """What a watched block reports, fixed when the diagnostics start (and written to the
    run's ``attn/config``, from which the report reads it back).

    Attributes:
        name: qualified module name (the ``<block>`` of every tag).
        layout: its accumulator layout (mask names, branches, histogram bins).
        param_names: its scalar parameters (``attention_parameters()`` keys).
        trainable_names: the learnable ones.
        branch_names: labels of the router's branches (``("3x3", "7x7", "7x7 d2")``), if any.
        param_specs: parameter name -> :class:`ParameterSpec` (ranges, symbols, hints).

    The number of attention heads, if any, is the layout's (``layout.num_heads``).
    """

    name: str
    layout: StatisticsLayout
    param_names: tuple[str, ...] = ()
    trainable_names: tuple[str, ...] = ()
    branch_names: tuple[str, ...] | None = None
    param_specs: Mapping[str, ParameterSpec] = field(default_factory=dict)

    def branch_label(self, k: int) -> str:
        names = self.branch_names
        return f"branch {k} ({names[k]})" if names and k < len(names) else f"branch {k}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "masks": list(self.layout.mask_names),
            "num_branches": self.layout.num_branches, "num_heads": self.layout.num_heads,
            "branches": list(self.branch_names or ()), "params": list(self.param_names),
            "trainable": list(self.trainable_names),
            "param_specs": {n: s.to_json() for n, s in self.param_specs.items()},
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> BlockInfo:
        branches = tuple(str(b) for b in doc.get("branches") or ())
        k = doc.get("num_branches") or (len(branches) or None)
        specs = doc.get("param_specs") or {}
        return cls(
            name=str(doc["name"]),
            layout=StatisticsLayout(tuple(str(m) for m in doc.get("masks") or ()), k,
                                    num_heads=doc.get("num_heads") or None),
            param_names=tuple(str(p) for p in doc.get("params") or ()),
            trainable_names=tuple(str(p) for p in doc.get("trainable") or ()),
            branch_names=branches or None,
            param_specs={str(n): ParameterSpec.from_json(s) for n, s in specs.items()
                         if isinstance(s, Mapping)},
        )


@dataclass(frozen=True)
class BlockStats:
    """Everything one point measured about one block (missing parts are left out).

    ``params`` holds the current value of every scalar parameter (temperature, alpha, ...);
    ``trainable`` names the learnable ones; ``grad_norms`` the gradient norm of the
    ``nn.Parameter`` behind each learnable one, read at the step of the optimizer that owns
    it (NaN or Inf when the gradient was; absent when it had none); ``histograms`` maps mask
    names and ``"router"`` to bin counts over ``[0, 1]``; ``forwards`` counts the recorded
    forwards (``0``: the block recorded nothing); ``param_specs`` what the block declares
    about its parameters (ranges, for the drift rule); ``heads`` the statistics of its
    attention heads, if it has any.
    """

    masks: dict[str, MaskStats] = field(default_factory=dict)
    router: RouterStats | None = None
    params: dict[str, float] = field(default_factory=dict)
    grad_norms: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, list[float]] = field(default_factory=dict)
    trainable: frozenset[str] = frozenset()
    forwards: int = 0
    param_specs: Mapping[str, ParameterSpec] = field(default_factory=dict)
    heads: HeadStats | None = None


@dataclass(frozen=True)
class GlobalStats:
    """One point's statistics of every block, combined over all processes.

    ``blocks``: name -> :class:`BlockStats` (made when asked for, when the point came from
    the collector); ``columns``: the same as columns (:class:`~.point.PointColumns`), what
    the rules and the scalars read.
    """

    step: int
    blocks: Mapping[str, BlockStats]
    phase: str = "train"
    columns: Any = field(default=None, repr=False, compare=False)

    def point(self) -> Any:
        """The point as columns (:class:`~.point.PointColumns`): its own, or made from
        ``blocks``."""
        if self.columns is None:
            from .point import PointColumns  # builds on this module

            object.__setattr__(self, "columns", PointColumns.of_blocks(self.blocks))
        return self.columns


def block_stats(
    layout: StatisticsLayout,
    values: Sequence[float],
    params: Mapping[str, float] | None = None,
    grad_norms: Mapping[str, float] | None = None,
    trainable: Sequence[str] = (),
    param_specs: Mapping[str, ParameterSpec] | None = None,
) -> BlockStats:
    """One block's combined row (host floats, ``layout.size`` of them) -> :class:`BlockStats`;
    ``params``/``grad_norms`` are read outside the forward."""
    if len(values) != layout.size:
        raise ValueError(f"expected {layout.size} accumulator values, got {len(values)}")
    def stats(stats_class: type, offset: int, declared: Sequence[Slot]) -> Any:
        return materialize(stats_class, columns(
            stats_class, _one_row(layout.slots(values, offset, declared))), 0)

    masks = {}
    for name, off in layout.mask_offsets.items():
        if layout.slots(values, off, MASK_SLOTS).count > 0:
            masks[name] = stats(MaskStats, off, MASK_SLOTS)
    router = None
    if layout.router_offset is not None:
        if layout.slots(values, layout.router_offset, ROUTER_SLOTS).count > 0:
            router = stats(RouterStats, layout.router_offset, ROUTER_SLOTS)
    heads = None
    if layout.head_offset is not None:
        s = layout.slots(values, layout.head_offset, HEAD_SLOTS)
        if sum(s.count) > 0 or any(math.isfinite(m) for m in s.max_logit):
            heads = stats(HeadStats, layout.head_offset, HEAD_SLOTS)
    bins = layout.histogram_bins
    histograms = {
        name: list(values[off:off + bins])
        for name, off in layout.histogram_offsets.items()
        if name in masks or (name == "router" and router is not None)
    }
    return BlockStats(
        masks=masks, router=router, params=dict(params or {}), grad_norms=dict(grad_norms or {}),
        histograms=histograms, trainable=frozenset(trainable), forwards=int(values[0]),
        param_specs=dict(param_specs or {}), heads=heads,
    )




#: How far a row of router weights may sum away from 1 and still be on the simplex: float32
#: softmax rounding is ~1e-7 per weight, bf16's ~4e-3.
SIMPLEX_TOLERANCE = 1e-2


def contract_breaches(bs: BlockStats) -> list[str]:
    """What ``bs`` shows of a recording that broke the contract of ``record()``, in words
    (empty when kept): :func:`~.point.breaches` of one block."""
    from .point import PointColumns, breaches  # builds on this module

    return breaches(PointColumns.of_blocks({"": bs})).get("", [])
