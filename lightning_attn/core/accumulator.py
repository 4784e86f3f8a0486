"""The on-device accumulator: what a forward adds to a block's statistics, in the graph.

:class:`Accumulator` lays out the slots declared in :mod:`.statistics` (``MASK_SLOTS``,
``ROUTER_SLOTS``) as one row per phase and adds one forward's contribution with tensor
operations only: no host sync, no Python callback, nothing ``torch.compile`` cannot trace.
The only module of the core that imports torch at import time (the report reads the
declarations without it).

Phases never mix: a forward adds to the row its :attr:`Accumulator.phase` tensor names (set by
the diagnostics when Lightning enters or leaves a loop), so no order of hooks can put an
evaluation forward into a training point, and changing the phase never recompiles anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .statistics import (
    MASK_SLOTS,
    PHASES,
    ROUTER_SLOTS,
    RecordingConfig,
    StatisticsLayout,
    slot_width,
)

__all__ = ["Accumulator", "accumulator_dtype", "empty_row"]

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
        codes = torch.tensor([("sum", "min", "max").index(k) for k in layout.reductions],
                             device=device)
        self._is_min, self._is_max = codes == 1, codes == 2

    @property
    def device(self) -> torch.device:
        return self.values.device

    def set_phase(self, phase: str) -> None:
        """Later forwards add to ``phase``'s row (a device fill; outside the forward)."""
        self.phase.fill_(PHASES.index(phase))

    def reset(self, phase: str) -> None:
        """Empty ``phase``'s row in place (same tensor: no recompilation)."""
        self.values[PHASES.index(phase)].copy_(self.initial)

    def row(self, phase: str) -> torch.Tensor:
        """``phase``'s row ``(layout.size,)``, a view on the device."""
        return self.values[PHASES.index(phase)]

    @torch.no_grad()
    def add(
        self,
        masks: Mapping[str, torch.Tensor],
        router_weights: torch.Tensor | None,
        histograms: bool,
        keep: torch.Tensor | None = None,
    ) -> None:
        """Add one forward's statistics to the current phase's row, on the device.

        ``masks``: name -> mask (any shape, values expected in ``[0, 1]``); masks the layout
        does not declare are left out. ``router_weights``: ``(B, K)`` softmax weights or
        ``None``. ``histograms``: add the histogram counts (when the layout has bins).
        ``keep``: a 0-d bool tensor; ``False`` leaves the row as it is (decided on the device,
        where a compiled graph cannot branch on it).

        One contribution row is built (few whole-tensor ops per mask: each costs a dispatch,
        or a kernel launch on a GPU in eager mode), then combined with the phase's row slot by
        slot and written back: three ops whatever the number of statistics.
        """
        layout, dtype, initial = self.layout, self.values.dtype, self.initial
        bins = layout.histogram_bins
        pieces = [torch.ones(1, dtype=dtype, device=self.device)]  # forwards
        hists: dict[str, torch.Tensor] = {}
        for name, off in layout.mask_offsets.items():
            mask = masks.get(name)
            if mask is None or mask.numel() == 0:
                pieces.append(initial[off:off + len(MASK_SLOTS)])
                continue
            v = mask.detach().reshape(-1).float()
            v64 = v.to(dtype)
            pieces.append(torch.stack([slot.measure(v, v64, self.config) for slot in MASK_SLOTS]))
            if bins and histograms:
                hists[name] = _histogram(v, bins, dtype)
        rw = router_weights
        if layout.router_offset is not None:
            k = layout.num_branches
            width = sum(slot_width(s, k) for s in ROUTER_SLOTS)
            if rw is None or rw.shape[0] == 0:
                pieces.append(initial[layout.router_offset:layout.router_offset + width])
            else:
                w = rw.detach().float()
                pieces += [slot.measure(w, dtype).reshape(-1) for slot in ROUTER_SLOTS]
                if bins and histograms:
                    hists["router"] = _histogram(w.reshape(-1), bins, dtype)
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


def _histogram(v: torch.Tensor, bins: int, dtype: torch.dtype) -> torch.Tensor:
    # Finite values in [0, 1] only (1.0 in the last bin). index_add_, not histc (its parallel
    # CPU loop stalls on busy machines) nor bincount (on CUDA it reads the index range back to
    # the host, and under torch.compile its output size is data-dependent).
    inside = torch.isfinite(v) & (v >= 0.0) & (v <= 1.0)
    index = (torch.where(inside, v, 0.0) * bins).long().clamp_(0, bins - 1)
    return torch.zeros(bins, dtype=dtype, device=v.device).index_add_(0, index, inside.to(dtype))

