"""The statistics, each defined once: on-device sums per batch, host-side values per logging step.

A statistic is split in two halves so that it is exact under data-parallel training:

* ``*_sums`` run on the device, in float32, under ``no_grad``, and return a small vector of
  sums and counts. Vectors of several batches, micro-batches and processes simply add up.
* ``*_from_sums`` turn the added-up vector (already on the host) into the reported values.

Every consumer (scalar tags, warnings, the summary table) reads the dataclasses built here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
    "histogram_counts",
    "mask_stats_from_sums",
    "mask_sums",
    "router_entropy",
    "router_stats_from_sums",
    "router_sums",
]

#: Layout of a mask's slots: ``count`` is added on the host side, :func:`mask_sums` fills the rest.
MASK_SLOTS: tuple[str, ...] = ("count", "sum", "sum_sq", "n_low", "n_high", "n_finite")
#: Layout of a router's slots, followed by ``K`` per-branch weight sums.
ROUTER_SLOTS: tuple[str, ...] = ("count", "sum_entropy", "n_finite")
#: Number of equal bins over ``[0, 1]`` of the mask and router-weight histograms.
HISTOGRAM_BINS = 50


@torch.no_grad()
def mask_sums(
    mask: torch.Tensor, low: float, high: float, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Sums of one mask, on its device, without a host sync.

    Args:
        mask: any shape, values expected in ``[0, 1]``.
        low, high: saturation thresholds (strictly below ``low`` / strictly above ``high``).
        dtype: dtype of the result (the accumulator's).

    Returns:
        ``(5,)``: sum, sum of squares, count below ``low``, count above ``high``, count finite
        (``MASK_SLOTS[1:]``). Values in float32, the two sums accumulated in ``dtype``: the
        std comes from ``E[x^2] - E[x]^2``, which loses digits to cancellation when the
        mask barely varies, exactly where the collapse warning decides. NaN or Inf make the
        two sums non-finite.
    """
    m = mask.detach().reshape(-1).float()
    # not torch.dot: BLAS threads stall
    sums = torch.stack((m.sum(dtype=dtype), m.square().sum(dtype=dtype)))
    counts = torch.stack(((m < low).sum(), (m > high).sum(), torch.isfinite(m).sum()))
    return torch.cat((sums.to(dtype), counts.to(dtype)))


@torch.no_grad()
def router_entropy(router_weights: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy ``-sum_k w_k log w_k`` (natural log, ``0 log 0 = 0``): ``(B,K) -> (B,)``.
    """
    w = router_weights.detach().float()
    return -torch.special.xlogy(w, w).sum(dim=1)


@torch.no_grad()
def router_sums(router_weights: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Sums of one batch of router weights ``(B,K)``, on its device, without a host sync.

    Returns:
        ``(2 + K,)``: sum over samples of the entropy, count of finite weights, then the sum
        over samples of each branch's weight (``ROUTER_SLOTS[1:]`` then ``K`` values).
    """
    w = router_weights.detach().float()
    head = torch.stack((-torch.special.xlogy(w, w).sum(), torch.isfinite(w).sum().to(w.dtype)))
    return torch.cat((head.to(dtype), w.sum(dim=0).to(dtype)))


@torch.no_grad()
def histogram_counts(values: torch.Tensor, bins: int = HISTOGRAM_BINS) -> torch.Tensor:
    """Counts of the finite values in ``bins`` equal bins over ``[0, 1]``: ``(*) -> (bins,)``.

    Values outside ``[0, 1]`` and non-finite values are left out; 1.0 falls in the last bin.
    """
    v = values.detach().reshape(-1).float()
    v = torch.nan_to_num(v, nan=-1.0, posinf=-1.0, neginf=-1.0)
    inside = (v >= 0.0) & (v <= 1.0)
    index = (v * bins).long().clamp_(0, bins - 1)
    # index_add_, not histc (its parallel loop stalls on busy CPUs) nor bincount (on CUDA it
    # reads the index's min and max back to the host: a sync per forward)
    dtype = torch.float32 if v.device.type == "mps" else torch.float64  # exact counts
    counts = torch.zeros(bins, dtype=dtype, device=v.device)
    return counts.index_add_(0, index, inside.to(dtype))


@dataclass(frozen=True)
class MaskStats:
    """Statistics of one mask over the global batch of one logging step.

    ``std`` is the unbiased (``n - 1``) standard deviation over every value of the mask,
    like :meth:`torch.Tensor.std`; ``sat_low`` / ``sat_high`` are the shares of values
    below / above the saturation thresholds. ``mean`` and ``std`` are NaN or Inf when
    ``nonfinite > 0``.
    """

    count: int
    mean: float
    std: float
    sat_low: float
    sat_high: float
    nonfinite: int

    @property
    def saturated(self) -> float:
        """Share of values below the low or above the high threshold."""
        return self.sat_low + self.sat_high


def mask_stats_from_sums(sums: Sequence[float]) -> MaskStats | None:
    """``MASK_SLOTS`` values (summed over batches and processes) -> :class:`MaskStats`.

    ``None`` when no value was seen (the block ran no forward on any process).
    """
    count, total, total_sq, n_low, n_high, n_finite = (float(v) for v in sums)
    if count <= 0:
        return None
    mean = total / count
    if not (math.isfinite(total) and math.isfinite(total_sq)):
        std = math.nan
    elif count > 1:
        var = (total_sq - total * total / count) / (count - 1)
        std = math.sqrt(max(var, 0.0))
    else:
        std = 0.0
    return MaskStats(
        count=int(count), mean=mean, std=std, sat_low=n_low / count, sat_high=n_high / count,
        nonfinite=int(round(count - n_finite)),
    )


@dataclass(frozen=True)
class RouterStats:
    """Router statistics over the global batch of one logging step.

    ``entropy`` is the mean over samples of ``-sum_k w_k log w_k``; ``entropy_norm`` the same
    divided by ``log K`` (0 when ``K == 1``); ``usage[k]`` the mean weight of branch ``k``.
    """

    count: int
    entropy: float
    entropy_norm: float
    usage: tuple[float, ...]
    nonfinite: int

    @property
    def num_branches(self) -> int:
        return len(self.usage)


def router_stats_from_sums(sums: Sequence[float]) -> RouterStats | None:
    """``ROUTER_SLOTS`` then ``K`` branch sums -> :class:`RouterStats` (``None`` if no sample)."""
    values = [float(v) for v in sums]
    count, sum_entropy, n_finite = values[:3]
    branch_sums = values[3:]
    if count <= 0:
        return None
    k = len(branch_sums)
    entropy = sum_entropy / count
    return RouterStats(
        count=int(count),
        entropy=entropy,
        entropy_norm=entropy / math.log(k) if k > 1 else 0.0,
        usage=tuple(s / count for s in branch_sums),
        nonfinite=int(round(count * k - n_finite)),
    )


@dataclass(frozen=True)
class BlockStats:
    """Everything one logging step measured about one block (missing parts are left out).

    ``params`` holds the current value of every scalar parameter (temperature, alpha, ...);
    ``grad_norms`` the gradient norm of the ``nn.Parameter`` behind each learnable one, when it
    had a gradient; ``histograms`` maps ``mask`` names and ``"router"`` to bin counts.
    """

    masks: dict[str, MaskStats] = field(default_factory=dict)
    router: RouterStats | None = None
    params: dict[str, float] = field(default_factory=dict)
    grad_norms: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, list[float]] = field(default_factory=dict)


@dataclass(frozen=True)
class GlobalStats:
    """One logging step's statistics of every block, reduced over all processes."""

    step: int
    blocks: dict[str, BlockStats]
