"""Every statistic of an attention block, defined once, in two halves.

* **On the device, inside the forward** (:func:`accumulate`): tensor operations only (no
  host sync, no Python callback, nothing ``torch.compile`` cannot trace) add a forward's sums,
  sums of squares, counts, extrema and histogram counts into the block's flat accumulator.
  Accumulators of several forwards, micro-batches and processes combine slot by slot: sums
  add, minima take the minimum, maxima the maximum (:attr:`StatisticsLayout.reductions`).
* **On the host, once per logging step** (:func:`block_stats`): the combined accumulator
  becomes the reported values (:class:`MaskStats`, :class:`RouterStats`).

Every consumer (logged scalars, warnings, the summary table, the report,
:func:`~lightning_attn.blocks.quick_mask_check`) reads the dataclasses built here.

Accumulator layout of one block (``D`` = float64, float32 on MPS), see
:class:`StatisticsLayout`::

    forwards                                                                  (1)
    for each mask:   count, sum, sum_sq, n_low, n_high, n_finite, min, max    (8)
    router, if any:  rows, sum_entropy, n_finite_rows, sum_w_0 .. sum_w_K-1   (3 + K)
    histograms, if asked: bins counts per mask, then per router             (bins each)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "HISTOGRAM_BINS",
    "MASK_SLOTS",
    "ROUTER_SLOTS",
    "BlockStats",
    "GlobalStats",
    "MaskStats",
    "RouterStats",
    "StatisticsLayout",
    "accumulate",
    "accumulator_dtype",
    "block_stats",
    "router_entropy",
]

#: A mask's slots (``n_finite`` counts the finite values among ``count``).
MASK_SLOTS: tuple[str, ...] = (
    "count", "sum", "sum_sq", "n_low", "n_high", "n_finite", "min", "max"
)
#: A router's slots, followed by ``K`` per-branch weight sums.
ROUTER_SLOTS: tuple[str, ...] = ("rows", "sum_entropy", "n_finite_rows")
#: Default number of equal bins over ``[0, 1]`` of the mask and router-weight histograms.
HISTOGRAM_BINS = 50

_SUM, _MIN, _MAX = "sum", "min", "max"


def accumulator_dtype(device: torch.device | str) -> torch.dtype:
    """float64 where the device has it (exact counts, sums of squares near collapse),
    float32 on MPS."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


@dataclass(frozen=True)
class StatisticsLayout:
    """Where each statistic of one block sits in its flat accumulator.

    Fixed by what the block declares (``mask_names``, ``num_branches``) and by the number of
    histogram bins (``0``: no histograms), so that every process agrees on it before any
    forward has run. The offsets are plain attributes computed once here (the forward reads
    them inside compiled graphs).

    Attributes:
        mask_offsets: mask name -> offset of its ``MASK_SLOTS``.
        router_offset: offset of ``ROUTER_SLOTS`` and the branch sums (``None``: no router).
        base_size: slots before the histograms.
        histogram_offsets: mask name or ``"router"`` -> offset of its bins.
        size: all slots.
        reductions: how each slot combines across forwards and processes (``sum``, ``min``,
            ``max``).
    """

    mask_names: tuple[str, ...]
    num_branches: int | None = None
    histogram_bins: int = 0
    mask_offsets: dict[str, int] = field(init=False, repr=False, compare=False)
    router_offset: int | None = field(init=False, repr=False, compare=False)
    base_size: int = field(init=False, repr=False, compare=False)
    histogram_offsets: dict[str, int] = field(init=False, repr=False, compare=False)
    size: int = field(init=False, repr=False, compare=False)
    reductions: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        width, k, bins = len(MASK_SLOTS), self.num_branches or 0, self.histogram_bins
        masks = {name: 1 + i * width for i, name in enumerate(self.mask_names)}
        router = 1 + len(masks) * width if k else None
        base = 1 + len(masks) * width + (len(ROUTER_SLOTS) + k if k else 0)
        hist_names = list(self.mask_names) + (["router"] if k else []) if bins else []
        hists = {n: base + i * bins for i, n in enumerate(hist_names)}
        size = base + len(hists) * bins
        kinds = [_SUM] * size
        for off in masks.values():
            kinds[off + MASK_SLOTS.index("min")] = _MIN
            kinds[off + MASK_SLOTS.index("max")] = _MAX
        for name, value in (
            ("mask_offsets", masks), ("router_offset", router), ("base_size", base),
            ("histogram_offsets", hists), ("size", size), ("reductions", tuple(kinds)),
        ):
            object.__setattr__(self, name, value)

    def initial(self, device: torch.device | str) -> torch.Tensor:
        """An empty accumulator: zeros, ``+inf`` in the minima, ``-inf`` in the maxima."""
        values = [
            math.inf if k == _MIN else -math.inf if k == _MAX else 0.0 for k in self.reductions
        ]
        return torch.tensor(values, dtype=accumulator_dtype(device), device=device)


@torch.no_grad()
def accumulate(
    acc: torch.Tensor,
    layout: StatisticsLayout,
    masks: Mapping[str, torch.Tensor],
    router_weights: torch.Tensor | None,
    saturation_low: float,
    saturation_high: float,
    histograms: bool = True,
) -> None:
    """Add one forward's statistics to ``acc`` in place, on its device, without a host sync.

    Args:
        acc: the block's accumulator, ``(layout.size,)``.
        layout: its layout; masks it does not declare are left out.
        masks: name -> mask (any shape, values expected in ``[0, 1]``).
        router_weights: ``(B, K)`` softmax weights, or ``None``.
        saturation_low, saturation_high: a value strictly below / above is saturated.
        histograms: add the histogram counts too (when the layout has bins).
    """
    acc[0].add_(1.0)
    dtype = acc.dtype
    # Few, whole-tensor ops (each costs a dispatch, or a kernel launch on a GPU in eager
    # mode). A NaN or Inf turns the sums and extremes non-finite, as the value they stand
    # for is; `n_finite` says how many, for the warning.
    for name, mask in masks.items():
        off = layout.mask_offsets.get(name)
        if off is None or mask.numel() == 0:
            continue
        v = mask.detach().reshape(-1).float()
        counts = torch.stack((  # int64 counts, converted once
            (v < saturation_low).sum(), (v > saturation_high).sum(), torch.isfinite(v).sum()
        )).to(dtype)
        # float64 sums: the std comes from E[x^2] - E[x]^2, which loses digits to
        # cancellation when the mask barely varies, exactly where the collapse warning
        # decides. (Not torch.dot: its BLAS threads stall on busy CPUs.)
        v64 = v.to(dtype)
        acc[off].add_(v.numel())
        acc[off + 1 : off + 6].add_(torch.cat((torch.stack((v64.sum(), v64.square().sum())),
                                               counts)))
        lo, hi = torch.aminmax(v)
        extremes = acc[off + 6 : off + 8]
        extremes.copy_(torch.stack((torch.minimum(extremes[0], lo.to(dtype)),
                                    torch.maximum(extremes[1], hi.to(dtype)))))
        hist = layout.histogram_offsets.get(name)
        if hist is not None and histograms:
            _add_histogram(acc, hist, layout.histogram_bins, v, torch.isfinite(v))
    off = layout.router_offset
    if off is not None and router_weights is not None and router_weights.shape[0] > 0:
        k = layout.num_branches
        w = router_weights.detach().float()
        acc[off].add_(w.shape[0])
        acc[off + 1 : off + 3 + k].add_(torch.cat((
            torch.stack((
                router_entropy(w).sum(dtype=dtype),
                torch.isfinite(w).all(dim=1).sum(dtype=dtype),
            )),
            w.sum(dim=0, dtype=dtype),
        )))
        hist = layout.histogram_offsets.get("router")
        if hist is not None and histograms:
            v = w.reshape(-1)
            _add_histogram(acc, hist, layout.histogram_bins, v, torch.isfinite(v))


def _add_histogram(
    acc: torch.Tensor, offset: int, bins: int, v: torch.Tensor, finite: torch.Tensor
) -> None:
    # Finite values in [0, 1] only (1.0 in the last bin). index_add_, not histc (its
    # parallel CPU loop stalls on busy machines) nor bincount (on CUDA it reads the index
    # range back to the host, and under torch.compile its output size is data-dependent).
    inside = finite & (v >= 0.0) & (v <= 1.0)
    index = (torch.where(inside, v, 0.0) * bins).long().clamp_(0, bins - 1)
    acc[offset : offset + bins].index_add_(0, index, inside.to(acc.dtype))


def router_entropy(router_weights: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy ``-sum_k w_k log w_k`` (natural log, ``0 log 0 = 0``): ``(B,K) -> (B,)``.
    """
    w = router_weights.detach().float()
    return -torch.special.xlogy(w, w).sum(dim=1)


# ------------------------------------------------------------------------------------------
# Host side: reported values
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskStats:
    """Statistics of one mask over every value it took in a logging step (global batch).

    ``mean``, ``std`` (unbiased, like :meth:`torch.Tensor.std`), ``min`` and ``max``;
    ``sat_low`` / ``sat_high`` are the shares of values below / above the saturation
    thresholds; ``nonfinite`` counts NaN and Inf values (then ``mean``, ``std`` and the
    extremes are NaN or Inf too, as the values they stand for).
    """

    count: int
    mean: float
    std: float
    sat_low: float
    sat_high: float
    nonfinite: int = 0
    min: float = math.nan
    max: float = math.nan

    @property
    def saturated(self) -> float:
        """Share of values below the low or above the high threshold."""
        return self.sat_low + self.sat_high


@dataclass(frozen=True)
class RouterStats:
    """Router statistics over the samples of a logging step (global batch).

    ``entropy`` is the mean over samples of ``-sum_k w_k log w_k``; ``entropy_norm`` the same
    divided by ``log K`` (0 when ``K == 1``); ``usage[k]`` the mean weight of branch ``k``.
    ``nonfinite`` counts the samples with a NaN or Inf weight (they make the others NaN).
    """

    count: int
    entropy: float
    entropy_norm: float
    usage: tuple[float, ...]
    nonfinite: int = 0

    @property
    def num_branches(self) -> int:
        return len(self.usage)


@dataclass(frozen=True)
class BlockStats:
    """Everything one logging step measured about one block (missing parts are left out).

    ``params`` holds the current value of every scalar parameter (temperature, alpha, ...);
    ``trainable`` names the learnable ones; ``grad_norms`` the gradient norm of the
    ``nn.Parameter`` behind each learnable one, when it had a gradient; ``histograms`` maps
    mask names and ``"router"`` to bin counts over ``[0, 1]``; ``forwards`` counts the
    recorded forwards (``0``: the block recorded nothing).
    """

    masks: dict[str, MaskStats] = field(default_factory=dict)
    router: RouterStats | None = None
    params: dict[str, float] = field(default_factory=dict)
    grad_norms: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, list[float]] = field(default_factory=dict)
    trainable: frozenset[str] = frozenset()
    forwards: int = 0


@dataclass(frozen=True)
class GlobalStats:
    """One logging step's statistics of every block, combined over all processes."""

    step: int
    blocks: dict[str, BlockStats]


def _mask_stats(v: Sequence[float]) -> MaskStats | None:
    count, total, total_sq, n_low, n_high, n_finite, lo, hi = v
    if count <= 0:
        return None
    mean = total / count
    if not (math.isfinite(total) and math.isfinite(total_sq)):
        std = math.nan
    elif count > 1:
        std = math.sqrt(max((total_sq - total * total / count) / (count - 1), 0.0))
    else:
        std = 0.0
    return MaskStats(
        count=int(count), mean=mean, std=std, sat_low=n_low / count, sat_high=n_high / count,
        nonfinite=int(round(count - n_finite)), min=lo, max=hi,
    )


def _router_stats(v: Sequence[float]) -> RouterStats | None:
    rows, sum_entropy, n_finite = v[:3]
    usage_sums = v[3:]
    if rows <= 0:
        return None
    k = len(usage_sums)
    entropy = sum_entropy / rows
    return RouterStats(
        count=int(rows),
        entropy=entropy,
        entropy_norm=entropy / math.log(k) if k > 1 else 0.0,
        usage=tuple(s / rows for s in usage_sums),
        nonfinite=int(round(rows - n_finite)),
    )


def block_stats(
    layout: StatisticsLayout,
    values: Sequence[float],
    params: Mapping[str, float] | None = None,
    grad_norms: Mapping[str, float] | None = None,
    trainable: Sequence[str] = (),
) -> BlockStats:
    """One block's combined accumulator (host floats, ``layout.size`` of them) ->
    :class:`BlockStats`; ``params``/``grad_norms`` are read outside the forward."""
    if len(values) != layout.size:
        raise ValueError(f"expected {layout.size} accumulator values, got {len(values)}")
    width = len(MASK_SLOTS)
    masks = {}
    for name, off in layout.mask_offsets.items():
        stats = _mask_stats(values[off : off + width])
        if stats is not None:
            masks[name] = stats
    router = None
    if layout.router_offset is not None:
        off = layout.router_offset
        router = _router_stats(values[off : off + len(ROUTER_SLOTS) + layout.num_branches])
    bins = layout.histogram_bins
    histograms = {
        name: list(values[off : off + bins])
        for name, off in layout.histogram_offsets.items()
        if name in masks or (name == "router" and router is not None)
    }
    return BlockStats(
        masks=masks,
        router=router,
        params=dict(params or {}),
        grad_norms=dict(grad_norms or {}),
        histograms=histograms,
        trainable=frozenset(trainable),
        forwards=int(values[0]),
    )
