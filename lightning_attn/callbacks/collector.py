"""The single observation and statistics pass shared by all consumers of one callback.

``StatisticsCollector`` owns one flat accumulator for *all* blocks. On a logging step it
attaches one observer per block; each forward adds that block's sums (``statistics.*_sums``)
into its slots, on the device, without a sync. At the end of the optimizer step it writes the
current parameter values, sums the accumulator over all processes with one all-reduce (every
process, same step, same layout: blocks that ran no forward contribute zeros), and copies it
to the host once, which is the only host-device sync of the logging step. Between logging
steps it holds no tensor and no observer.

Accumulator layout (``D`` = float64, float32 on MPS), per block, in discovery order::

    for each mask name:   count, sum, sum_sq, n_low, n_high, n_finite       (6)
    router, if any:       count, sum_entropy, n_finite, sum_w_0..sum_w_K-1  (3 + K)
    parameters:           value_0..value_P-1, grad_norm_0..grad_norm_T-1, has_grad_0..  (P + 2T)

then, on histogram steps only, ``HISTOGRAM_BINS`` counts per mask and per router.
Parameter values and gradient norms are identical on every process under DDP; they travel in
the same all-reduce (summed, then divided by the number of processes, which is exact in
float64) so that every process takes the same warning decisions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..blocks import AttentionObservation, Observer
from . import statistics as S
from .discovery import BlockLayout, describe_block

__all__ = ["SECTIONS", "StatisticsCollector"]

#: What a collector can gather: masks, router weights, scalar parameters.
SECTIONS: frozenset[str] = frozenset({"mask", "router", "param"})

_MASK_WIDTH = len(S.MASK_SLOTS)
_ROUTER_HEAD = len(S.ROUTER_SLOTS)


@dataclass
class _Offsets:
    masks: dict[str, int] = field(default_factory=dict)
    router: int | None = None
    params: int | None = None
    hist_masks: dict[str, int] = field(default_factory=dict)
    hist_router: int | None = None


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it (exact counts and sums), float32 on MPS."""
    return torch.float32 if device.type == "mps" else torch.float64


def all_reduce_sum(trainer: pl.Trainer, tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes (in place where possible); a no-op on one process.

    Calls ``torch.distributed.all_reduce`` directly when a process group is up: Lightning's
    ``strategy.reduce`` puts a barrier first, which on NCCL is an extra device sync.
    """
    if trainer.world_size <= 1:
        return tensor
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor
    return trainer.strategy.reduce(tensor, reduce_op="sum")


class StatisticsCollector:
    """Gathers the sections of statistics asked for, for a fixed set of blocks.

    Args:
        sections: subset of :data:`SECTIONS`.
        saturation_low, saturation_high: thresholds of the saturation counts.
        histogram_bins: bins of the histograms over ``[0, 1]``.
    """

    def __init__(
        self,
        sections: frozenset[str] | set[str],
        saturation_low: float = 0.05,
        saturation_high: float = 0.95,
        histogram_bins: int = S.HISTOGRAM_BINS,
    ) -> None:
        unknown = set(sections) - SECTIONS
        if unknown:
            raise ValueError(
                f"unknown statistics sections {sorted(unknown)}; known: {sorted(SECTIONS)}"
            )
        self.sections = frozenset(sections)
        self.saturation_low = saturation_low
        self.saturation_high = saturation_high
        self.histogram_bins = histogram_bins
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._blocks: list[nn.Module] = []
        self.layouts: list[BlockLayout] = []
        self._offsets: list[_Offsets] = []
        self._base_size = 0
        self._full_size = 0
        self._handles: list[RemovableHandle] = []
        self._buffer: torch.Tensor | None = None
        self._histograms = False
        self._undeclared: set[tuple[str, str]] = set()

    # -- setup ---------------------------------------------------------------------------
    def bind(self, blocks: Mapping[str, nn.Module]) -> None:
        """Fix the blocks (name -> module) and the accumulator layout."""
        self.reset()
        self._init_runtime()
        offsets: list[_Offsets] = []
        pos = 0
        for name, block in blocks.items():
            layout = describe_block(name, block)
            off = _Offsets()
            if "mask" in self.sections:
                for mask in layout.mask_names:
                    off.masks[mask] = pos
                    pos += _MASK_WIDTH
            if "router" in self.sections and layout.num_branches:
                off.router = pos
                pos += _ROUTER_HEAD + layout.num_branches
            if "param" in self.sections and layout.param_names:
                off.params = pos
                pos += len(layout.param_names) + 2 * len(layout.trainable_names)
            self._blocks.append(block)
            self.layouts.append(layout)
            offsets.append(off)
        self._base_size = pos
        for off in offsets:
            for mask in off.masks:
                off.hist_masks[mask] = pos
                pos += self.histogram_bins
            if off.router is not None:
                off.hist_router = pos
                pos += self.histogram_bins
        self._full_size = pos
        self._offsets = offsets

    @property
    def active(self) -> bool:
        """Whether a logging point is being gathered (an accumulator exists)."""
        return self._buffer is not None

    # -- one logging point ---------------------------------------------------------------
    def attach(self, device: torch.device, histograms: bool = False) -> None:
        """Attach the observers (allocating the accumulator at the first micro-batch)."""
        self.detach()
        if not self._blocks:
            return
        if self._buffer is None:
            self._histograms = histograms
            size = self._full_size if histograms else self._base_size
            self._buffer = torch.zeros(size, dtype=accumulator_dtype(device), device=device)
        self._handles = [
            block.attach_observer(self._observer(i)) for i, block in enumerate(self._blocks)
        ]

    def detach(self) -> None:
        """Remove every observer this collector attached (idempotent)."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def reset(self) -> None:
        """Detach and drop the accumulator (after an exception, at teardown)."""
        self.detach()
        self._buffer = None

    def _observer(self, index: int) -> Observer:
        def observe(block: nn.Module, observation: AttentionObservation) -> None:
            self._observe(index, observation)

        return observe

    @torch.no_grad()
    def _observe(self, index: int, obs: AttentionObservation) -> None:
        buf = self._buffer
        if buf is None:
            return
        off, layout = self._offsets[index], self.layouts[index]
        bins = self.histogram_bins
        if off.masks:
            for name, mask in obs.masks.items():
                pos = off.masks.get(name)
                if pos is None:
                    self._warn_undeclared(layout.name, f"mask {name!r}")
                    continue
                sums = S.mask_sums(mask, self.saturation_low, self.saturation_high, buf.dtype)
                buf[pos + 1 : pos + _MASK_WIDTH].add_(sums.to(buf.device, non_blocking=True))
                buf[pos].add_(mask.numel())
                if self._histograms:
                    h = off.hist_masks[name]
                    counts = S.histogram_counts(mask, bins).to(buf.device, buf.dtype)
                    buf[h : h + bins].add_(counts)
        rw = obs.router_weights
        if off.router is not None and rw is not None:
            k = layout.num_branches
            if rw.dim() != 2 or rw.shape[1] != k:
                self._warn_undeclared(layout.name, f"router weights of shape {tuple(rw.shape)}")
                return
            pos = off.router
            sums = S.router_sums(rw, buf.dtype).to(buf.device, non_blocking=True)
            buf[pos + 1 : pos + _ROUTER_HEAD + k].add_(sums)
            buf[pos].add_(rw.shape[0])
            if self._histograms:
                h = off.hist_router
                buf[h : h + bins].add_(S.histogram_counts(rw, bins).to(buf.device, buf.dtype))

    def _warn_undeclared(self, block: str, what: str) -> None:
        if (block, what) in self._undeclared:
            return
        self._undeclared.add((block, what))
        rank_zero_warn(
            f"attention block {block!r} reported {what}, which its layout does not declare "
            "(set `mask_names` / `num_branches` on the block); it is left out of the statistics"
        )

    @torch.no_grad()
    def record_gradients(self) -> None:
        """Store the gradient norms of the learnable parameters (``on_before_optimizer_step``)."""
        buf = self._buffer
        if buf is None:
            return
        for block, layout, off in zip(self._blocks, self.layouts, self._offsets, strict=True):
            if off.params is None or not layout.trainable_names:
                continue
            trainable = block.trainable_attention_parameters()
            n_params, n_train = len(layout.param_names), len(layout.trainable_names)
            for j, name in enumerate(layout.trainable_names):
                param = trainable.get(name)
                if param is None or param.grad is None:
                    continue
                norm = torch.linalg.vector_norm(param.grad.detach().float())
                buf[off.params + n_params + j].copy_(norm)
                buf[off.params + n_params + n_train + j].fill_(1.0)

    @torch.no_grad()
    def finish(self, trainer: pl.Trainer, step: int) -> S.GlobalStats:
        """Close the logging point: parameters in, one all-reduce, one host copy, parse."""
        buf = self._buffer
        self.detach()
        self._buffer = None
        if buf is None:
            raise RuntimeError("StatisticsCollector.finish() without an open logging point")
        for block, layout, off in zip(self._blocks, self.layouts, self._offsets, strict=True):
            if off.params is None:
                continue
            current = block.attention_parameters()
            values = [
                current[n].detach().float().reshape(()).to(buf.device, non_blocking=True)
                if n in current else torch.full((), math.nan, device=buf.device)
                for n in layout.param_names
            ]
            buf[off.params : off.params + len(values)].copy_(torch.stack(values))
        buf = all_reduce_sum(trainer, buf)
        host = buf.tolist()  # the one host-device sync of the logging step
        return self._parse(host, max(int(trainer.world_size), 1), step)

    def _parse(self, host: list[float], world_size: int, step: int) -> S.GlobalStats:
        histograms = len(host) > self._base_size
        bins = self.histogram_bins
        blocks: dict[str, S.BlockStats] = {}
        for layout, off in zip(self.layouts, self._offsets, strict=True):
            masks = {}
            for name, pos in off.masks.items():
                stats = S.mask_stats_from_sums(host[pos : pos + _MASK_WIDTH])
                if stats is not None:
                    masks[name] = stats
            router = None
            if off.router is not None:
                end = off.router + _ROUTER_HEAD + (layout.num_branches or 0)
                router = S.router_stats_from_sums(host[off.router : end])
            params: dict[str, float] = {}
            grads: dict[str, float] = {}
            if off.params is not None:
                n_params, n_train = len(layout.param_names), len(layout.trainable_names)
                for j, name in enumerate(layout.param_names):
                    params[name] = host[off.params + j] / world_size
                for j, name in enumerate(layout.trainable_names):
                    seen = host[off.params + n_params + n_train + j]
                    if seen > 0:
                        grads[name] = host[off.params + n_params + j] / seen
            hists: dict[str, list[float]] = {}
            if histograms:
                for name, pos in off.hist_masks.items():
                    if name in masks:
                        hists[name] = host[pos : pos + bins]
                if off.hist_router is not None and router is not None:
                    hists["router"] = host[off.hist_router : off.hist_router + bins]
            blocks[layout.name] = S.BlockStats(masks, router, params, grads, hists)
        return S.GlobalStats(step=step, blocks=blocks)

    # -- pickling (ddp_spawn): configuration only, never handles, modules or tensors -------
    def __getstate__(self) -> dict:
        return {
            "sections": self.sections,
            "saturation_low": self.saturation_low,
            "saturation_high": self.saturation_high,
            "histogram_bins": self.histogram_bins,
        }

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime()
