"""The recording protocol: what an attention block measures about itself, inside its forward.

A block records by calling :meth:`RecordingMixin.record` at the end of its ``forward`` with
the masks (and router weights) it computed anyway::

    class MyGate(RecordingMixin, nn.Module):
        mask_names = ("mask",)                      # declared up front (same on every process)

        def forward(self, x):                       # x: (B, C, H, W)
            mask = torch.sigmoid(self.conv(x))      # (B, 1, H, W)
            self.record(masks={"mask": mask})       # compile-safe; free when recording is off
            return x * mask

While recording is off (every step but the logging steps) ``record`` tests two flags and
returns. While it is on, it adds the forward's sums, counts, extrema and histogram counts
into the block's accumulator on the device with tensor operations only
(:meth:`~lightning_attn.core.statistics.Accumulator.add`): no Python callback, no ``.item()``,
no host sync, nothing ``torch.compile`` cannot trace. Flipping the flag adds at most one graph
per compiled frame (dynamo guards on it); nothing is kept between forwards but the
accumulator, a plain tensor attribute (not a buffer: never in the state dict, never broadcast
by DDP, never copied with the model).

The diagnostics (or :func:`~lightning_attn.blocks.quick_mask_check`) drive it from outside the
forward::

    block.configure_recording(RecordingConfig(), device)  # once, before the first forward
    block.start_recording(holder)      # a logging step begins (empties the accumulator)
    ...forwards...
    values = block.recorded_statistics("train")  # the phase's row, on the device
    block.stop_recording(holder)

While capture is held (:meth:`RecordingMixin.start_capture`), the forward also keeps its
spatial map ``(B, 1, H, W)``
(:func:`spatial_map`) as :attr:`RecordingMixin.captured_map`, for attention-map images and
localisation scores.

A block joins the diagnostics by implementing :class:`AttentionBlock` (inherit
:class:`RecordingMixin`, declare ``mask_names`` and, if it routes, ``num_branches``, call
``record``, and override :meth:`~RecordingMixin.attention_parameters` /
:meth:`~RecordingMixin.trainable_attention_parameters` if it has scalar parameters).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..core.accumulator import CUDAGRAPH_UNSAFE, Accumulator
from ..core.statistics import (
    PHASES,
    ParameterSpec,
    RecordingConfig,
    StatisticsLayout,
)

__all__ = [
    "AttentionBlock",
    "RecordingMixin",
    "recomputing",
    "spatial_map",
    "start_recording_of",
    "stop_recording_of",
]


def spatial_map(masks: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """One spatial map ``(B, 1, H, W)`` from a block's masks, or ``None``.

    The product of the 4-D masks broadcast together, averaged over channels: DSA's ``mask``
    ``(B,1,H,W)`` as it is; CoordinateAttention's ``mask_h (B,C,H,1) * mask_w (B,C,1,W)``
    averaged over ``C``; CBAM's channel and spatial masks. ``None`` when no mask is spatial
    (a squeeze-excite gate ``(B,C,1,1)`` has no map).
    """
    heat = None
    for mask in masks.values():
        if mask.dim() != 4:
            continue
        m = mask.detach().float()
        heat = m if heat is None else heat * m
    if heat is None or heat.shape[-2:] == (1, 1):
        return None
    return heat.mean(dim=1, keepdim=True)


def recomputing() -> bool:
    """Whether the code running now is a forward run again inside a backward pass: the
    recomputation of activation checkpointing (:func:`torch.utils.checkpoint.checkpoint`
    reentrant or not, ``checkpoint_sequential``, and what builds on them: timm's
    ``set_grad_checkpointing``, torch's ``checkpoint_wrapper``). Such a forward already ran,
    and was recorded, before.

    Eager forwards only: while ``torch.compile`` traces, ``False`` (a compiled backward
    recomputes from its graph, which replays no recording; and asking the autograd engine
    would break the graph).
    """
    # The autograd engine's current graph task: -1 outside a backward pass.
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


@torch.library.custom_op("lightning_attn::first_run", mutates_args=(), tags=CUDAGRAPH_UNSAFE)
def first_run(like: torch.Tensor) -> torch.Tensor:
    """``not recomputing()`` as a 0-d bool tensor on ``like``'s device, asked when the op
    runs, not when it is traced: what a compiled graph (a block compiled on its own and
    called inside an eager :func:`torch.utils.checkpoint.checkpoint`) needs to leave a
    recomputation out. A fill, no host sync."""
    return torch.full((), not recomputing(), dtype=torch.bool, device=like.device)


@first_run.register_fake
def _(like: torch.Tensor) -> torch.Tensor:
    return torch.empty((), dtype=torch.bool, device=like.device)


@runtime_checkable
class AttentionBlock(Protocol):
    """What the diagnostics look for on every submodule (:class:`RecordingMixin` has it all).

    Attributes ``mask_names`` (tuple of str) and ``num_branches`` (int or ``None``) declare the
    statistics' layout; ``branch_names`` (optional) labels the branches.
    """

    def configure_recording(self, config: RecordingConfig, device: torch.device) -> None: ...

    def record(
        self, masks: Mapping[str, torch.Tensor], router_weights: torch.Tensor | None = None
    ) -> None: ...

    def attention_parameters(self) -> dict[str, torch.Tensor]: ...

    def trainable_attention_parameters(self) -> dict[str, nn.Parameter]: ...


#: Instance attributes of the recording state (never pickled, copied or saved).
_RECORDING_STATE = (
    "_attn_recording", "_attn_recording_holders", "_attn_histograms", "_attn_capture",
    "_attn_capture_holders", "_attn_accumulator", "_attn_captured",
)
#: What belongs to the live run and never travels with a copy: the recording state, and the
#: TemperatureSchedule driving the block (if any).
_LIVE_STATE = (*_RECORDING_STATE, "_attn_schedule_owner")


class RecordingMixin:
    """Recording for an ``nn.Module`` (put it before ``nn.Module`` in the bases; no ``__init__``).

    Class attributes a block sets: ``mask_names`` (default ``("mask",)``), ``num_branches``
    (``K`` of its router, ``None`` without one) and optionally ``branch_names``.
    """

    mask_names: tuple[str, ...] = ("mask",)
    num_branches: int | None = None
    branch_names: tuple[str, ...] | None = None
    num_heads: int | None = None  # attention heads (``HeadRecordingMixin``)

    # Plain class-level defaults: a block never configured records nothing and holds nothing.
    _attn_recording: bool = False
    _attn_capture: bool = False
    _attn_histograms: bool = False
    _attn_accumulator: Accumulator | None = None
    _attn_captured: torch.Tensor | None = None

    # -- inside forward -------------------------------------------------------------------
    def record(
        self,
        masks: Mapping[str, torch.Tensor],
        router_weights: torch.Tensor | None = None,
        heads: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Record one forward's masks (name -> tensor, values in ``[0, 1]``) and router weights
        ``(B, K)`` (non-negative, each row summing to 1: softmax probabilities, not logits).
        Call it at the end of ``forward``; it never changes what the forward returns. Costs
        two attribute tests when neither recording nor capture is on. What breaks the
        contract is not checked here (that would sync the host every forward): the
        diagnostics read it from the point's extremes and warn once per block
        (:class:`~lightning_attn.core.RecordingContractWarning`).

        A forward that runs again to recompute activations for the backward pass
        (:func:`torch.utils.checkpoint.checkpoint`, reentrant or not) records nothing
        (:func:`recomputing`): its values were recorded when it first ran. A module called
        ``k`` times in one forward of the model records ``k`` forwards' values. ``heads``:
        per-head reductions (:meth:`~.heads.HeadRecordingMixin.record_heads` gives them)."""
        if not (self._attn_recording or self._attn_capture) or recomputing():
            return
        if self._attn_recording:
            self._check_recorded(masks, router_weights)
            # The histogram counts only at the points that write them; compiled, whether
            # they are due and whether this forward is a recomputation are asked when the
            # graph runs (a flag would add a graph).
            acc, compiling = self._attn_accumulator, torch.compiler.is_compiling()
            acc.add(masks, router_weights,
                    histograms=acc.histograms if compiling else self._attn_histograms,
                    keep=first_run(acc.phase) if compiling else None, heads=heads)
        if self._attn_capture:
            self._attn_captured = spatial_map(masks)

    def _check_recorded(
        self, masks: Mapping[str, torch.Tensor], router_weights: torch.Tensor | None
    ) -> None:
        # What a forward records must match what the block declared (every process lays out
        # its accumulator from the declaration before any forward); shapes and names only,
        # so compiled graphs fold the check away.
        layout = self._attn_accumulator.layout
        unknown = [name for name in masks if name not in layout.mask_offsets]
        if unknown:
            raise ValueError(
                f"{type(self).__name__}.record() got masks {unknown}, which mask_names="
                f"{tuple(self.mask_names)} does not declare"
            )
        k = layout.num_branches
        rw = router_weights
        if rw is not None and (rw.dim() != 2 or rw.shape[1] != k):
            raise ValueError(
                f"{type(self).__name__}.record() got router_weights of shape "
                f"{tuple(rw.shape)}, but num_branches={k}: set num_branches to the router's K "
                "(weights of shape (B, K))"
            )

    # -- outside forward ------------------------------------------------------------------
    @property
    def statistics_layout(self) -> StatisticsLayout:
        """The layout of a row of :attr:`accumulator` (histograms once configured)."""
        if self._attn_accumulator is None:
            return self._layout(0)
        return self._attn_accumulator.layout

    def _layout(self, histogram_bins: int) -> StatisticsLayout:
        return StatisticsLayout(tuple(self.mask_names), self.num_branches or None,
                                histogram_bins, self.num_heads or None)

    @property
    def accumulator(self) -> Accumulator | None:
        """The on-device accumulator (``None`` before :meth:`configure_recording`)."""
        return self._attn_accumulator

    def configure_recording(self, config: RecordingConfig, device: torch.device | str) -> None:
        """Allocate an empty accumulator on ``device`` for ``config`` (recording stays off).

        Call it before the first (compiled) forward: creating the accumulator later costs one
        more compilation. Several consumers may configure one block: the same config keeps
        the accumulator, more histogram bins widen it, and different saturation thresholds
        are an error (the forward computes one set of counts).
        """
        if not isinstance(config, RecordingConfig):
            raise TypeError(f"config must be a RecordingConfig, got {type(config).__name__}")
        device = torch.device(device)
        current = self._attn_accumulator
        if current is not None:
            old = current.config
            if (old.saturation_low, old.saturation_high) != (
                config.saturation_low, config.saturation_high
            ):
                raise ValueError(
                    f"{type(self).__name__} already records with saturation_low="
                    f"{old.saturation_low}, saturation_high={old.saturation_high}; another "
                    f"consumer asks for {config.saturation_low}, {config.saturation_high}: "
                    "give every diagnostics callback the same saturation thresholds"
                )
            if config.histogram_bins < old.histogram_bins:
                config = old  # a consumer without histograms reads the wider layout
            if config == old and current.device == device:
                return
            if self._attn_recording:
                raise RuntimeError(
                    f"{type(self).__name__} is recording with {old}; it cannot be "
                    f"reconfigured to {config} until every consumer stops recording"
                )
        if current is not None:
            current.retire()
        self._attn_accumulator = Accumulator(self._layout(config.histogram_bins), config, device)
        # The flags the forward reads become instance attributes now, before the first
        # compiled call: dynamo guards on where an attribute comes from, and a flag moving
        # from the class to the instance later would recompile every frame once more.
        self._attn_recording = bool(self._attn_recording)
        self._attn_capture = bool(self._attn_capture)

    @property
    def recording(self) -> bool:
        """Whether forwards add to the accumulator (some consumer holds recording)."""
        return self._attn_recording

    def set_recording_phase(self, phase: str) -> None:
        """Later forwards add to ``phase``'s row (``"train"``, ``"val"``, ``"test"``,
        ``"predict"``): the diagnostics call it when Lightning enters and leaves a loop."""
        if self._attn_accumulator is not None:
            self._attn_accumulator.set_phase(phase)

    def start_recording(
        self, holder: Hashable = "default", histograms: bool = True, phase: str = "train",
        reset: bool = True,
    ) -> bool:
        """Turn recording on for ``holder`` in ``phase``. The first holder of a phase empties
        that phase's row; later ones share it, so several consumers can measure the same
        steps. ``histograms=False``: this holder does not need the histogram counts (forwards
        then skip them unless another holder asks).
        ``reset=False``: the caller empties the row itself (a collector empties every
        block's in one operation); returns whether the row is to be emptied."""
        return start_recording_of([self], holder, histograms, phase, reset)[0]

    def stop_recording(self, holder: Hashable = "default", phase: str = "train") -> None:
        """Release ``holder``'s hold on ``phase`` (read :meth:`recorded_statistics` first);
        recording stops when the last holder of every phase releases it. The row keeps its
        values until that phase's next window starts."""
        stop_recording_of([self], holder, phase)

    def recorded_statistics(self, phase: str = "train") -> torch.Tensor | None:
        """``phase``'s row of the accumulator ``(statistics_layout.size,)`` on the device
        (``None`` before :meth:`configure_recording`)."""
        acc = self._attn_accumulator
        if acc is None:
            return None
        if acc.table is not None:  # the forwards held back
            acc.table.settle()
        return acc.row(phase)

    @property
    def capture(self) -> bool:
        """Whether forwards keep their spatial map in :attr:`captured_map`."""
        return self._attn_capture

    def start_capture(self, holder: Hashable = "default") -> None:
        """Keep each forward's spatial map until every holder has called :meth:`stop_capture`
        (an attention-map callback and a localisation metric may hold it at once)."""
        self.__dict__.setdefault("_attn_capture_holders", set()).add(holder)
        self._attn_capture = True

    def stop_capture(self, holder: Hashable = "default") -> None:
        """Release ``holder``'s hold; the last release turns capture off and drops the map."""
        holders = self.__dict__.get("_attn_capture_holders", set())
        holders.discard(holder)
        if not holders:
            self._attn_capture = False
            self._attn_captured = None

    @property
    def captured_map(self) -> torch.Tensor | None:
        """The spatial map ``(B, 1, H, W)`` of the latest forward while capture was held."""
        return self._attn_captured

    def clear_recording(self) -> None:
        """Everything off and dropped: holders, flags, accumulator, captured map."""
        acc = self.__dict__.get("_attn_accumulator")
        if acc is not None:
            acc.retire()
        for key in _RECORDING_STATE:
            self.__dict__.pop(key, None)

    # -- scalar parameters ----------------------------------------------------------------
    def attention_parameters(self) -> dict[str, torch.Tensor]:
        """Current scalar parameters (temperature, alpha, ...) as detached 0-d tensors."""
        return {}

    def trainable_attention_parameters(self) -> dict[str, nn.Parameter]:
        """The learnable ones among them, mapped to the ``nn.Parameter`` behind each (which may
        be a reparametrisation, like DSA's ``t_raw`` for ``temperature``)."""
        return {}

    def attention_parameter_specs(self) -> dict[str, ParameterSpec]:
        """What each scalar parameter means: the range in which it keeps its meaning (the
        drift rule's limits, for the learnable ones), its symbol in the summary table, and
        the hint a drift warning gives. Default: none (no drift rule)."""
        return {}

    # -- copies ---------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        # A pickled or deep-copied model (ddp_spawn, EMA copies, checkpoints of the module)
        # starts without recording state: flags and accumulators belong to the live run.
        state = self.__dict__.copy()  # type: ignore[attr-defined]
        for key in _LIVE_STATE:
            state.pop(key, None)
        return state


def start_recording_of(
    blocks: Iterable[RecordingMixin], holder: Hashable, histograms: bool, phase: str,
    reset: bool,
) -> list[bool]:
    """:meth:`RecordingMixin.start_recording` of each of ``blocks`` in one loop (a collector
    opens every watched block at every logging point); whether each row is to be emptied."""
    # The state is read and written in the instances' dicts, not through nn.Module's
    # attribute hooks, and the arguments are checked once: 300 blocks cost a tenth of a
    # millisecond, where a method call each cost half of one.
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {list(PHASES)}, got {phase!r}")
    histograms = bool(histograms)
    first = []
    for block in blocks:
        state = block.__dict__
        acc = state.get("_attn_accumulator")
        if acc is None:
            raise RuntimeError(
                f"{type(block).__name__}: call configure_recording(config, device) before "
                "start_recording()"
            )
        holders = state.get("_attn_recording_holders")
        if holders is None:
            holders = state["_attn_recording_holders"] = {}
        held = holders.get(phase)
        empty = not held  # (an emptied set is no holder)
        if held and holder not in held and acc.table is not None:
            acc.table.shared = True  # the window is shared with another holder
        if empty and reset:
            acc.reset(phase)
        on = histograms or (state.get("_attn_histograms", False) and any(holders.values()))
        if held is None:
            holders[phase] = {holder}
        else:
            held.add(holder)
        state["_attn_histograms"] = on
        acc.set_histograms(on)
        state["_attn_recording"] = True
        first.append(empty)
    return first


def stop_recording_of(blocks: Iterable[RecordingMixin], holder: Hashable, phase: str) -> None:
    """:meth:`RecordingMixin.stop_recording` of each of ``blocks`` in one loop."""
    for block in blocks:
        state = block.__dict__
        holders = state.get("_attn_recording_holders")
        if holders:
            held = holders.get(phase)
            if held:
                held.discard(holder)
            if any(holders.values()):
                continue
        state["_attn_recording"] = False
