"""Reading the blocks' recordings: one vector, one collective, one host copy per point.

The path of a number, from block to logger::

    block.forward -> block.record() -> the block's accumulator (on the device)
        -> StatisticsCollector.finish(): every block's accumulator, the scalar parameters and
           the gradient norms in one vector -> one all_gather across processes -> one copy to
           the host -> combined slot by slot (sums added, minima and maxima taken)
        -> GlobalStats (lightning_attn.blocks.statistics) -> problems, loggers, table, report

Between points the collector holds no tensor and the blocks do not record.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import lightning.pytorch as pl
import torch
from torch import nn

from ..blocks.recording import RecordingConfig
from ..blocks.statistics import GlobalStats, block_stats
from .tags import BlockInfo

__all__ = ["StatisticsCollector", "combine_processes"]

# How a slot of the read vector combines over processes.
_SUM, _MIN, _MAX, _FIRST = 0, 1, 2, 3
_CODES = {"sum": _SUM, "min": _MIN, "max": _MAX}


def combine_processes(
    trainer: pl.Trainer, vector: torch.Tensor, kinds: torch.Tensor
) -> list[float]:
    """``vector`` combined over every process, slot by slot as ``kinds`` says (0: sum,
    1: min, 2: max, 3: rank 0's value), as host floats: one collective (``all_gather``) and
    one device-to-host copy; on one process, only the copy."""
    world = int(trainer.world_size)
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        rows = [torch.empty_like(vector) for _ in range(world)]
        torch.distributed.all_gather(rows, vector)
        table = torch.stack(rows)  # (world, N)
        vector = torch.where(
            kinds == _SUM, table.sum(0),
            torch.where(kinds == _MIN, table.amin(0),
                        torch.where(kinds == _MAX, table.amax(0), table[0])),
        )
    return vector.tolist()


class StatisticsCollector:
    """Drives the recording of a fixed set of blocks and reads it back.

    Args:
        config: what the blocks record (saturation thresholds, histogram bins).
    """

    def __init__(self, config: RecordingConfig) -> None:
        self.config = config
        self.blocks: dict[str, nn.Module] = {}
        self.infos: list[BlockInfo] = []
        self._open = False
        self._grad_norms: torch.Tensor | None = None
        self._kinds: torch.Tensor | None = None

    # -- setup -------------------------------------------------------------------------------
    def bind(self, blocks: Mapping[str, nn.Module], device: torch.device) -> None:
        """Watch ``blocks`` (name -> block) and give each an accumulator on its device.

        Call before the first forward of the run: the accumulators then exist when a compiled
        graph is first traced, and no extra compilation follows.
        """
        self.unbind()
        self.blocks = dict(blocks)
        self.infos = []
        for name, block in self.blocks.items():
            param = next(block.parameters(), None)
            block.configure_recording(self.config, param.device if param is not None else device)
            params = tuple(block.attention_parameters())
            trainable = tuple(n for n in block.trainable_attention_parameters() if n in params)
            branch_names = getattr(block, "branch_names", None)
            self.infos.append(
                BlockInfo(
                    name, block.statistics_layout, params, trainable,
                    tuple(branch_names) if branch_names else None,
                )
            )


    def unbind(self) -> None:
        """Stop watching: recording off, accumulators and captured maps dropped."""
        self.close()
        for block in self.blocks.values():
            block.clear_recording()
        self.blocks, self.infos, self._kinds = {}, [], None

    # -- one point ---------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        """Whether a point is being recorded."""
        return self._open

    def open(self, histograms: bool = False) -> None:
        """Start recording a point (a training logging step, or an evaluation epoch);
        ``histograms``: the point writes histograms."""
        if self._open:
            return
        for block in self.blocks.values():
            block.start_recording(self, histograms)
        self._open = True
        self._grad_norms = None

    def close(self) -> None:
        """Stop recording without reading (an interrupted point)."""
        if self._open:
            for block in self.blocks.values():
                block.stop_recording(self)
        self._open = False
        self._grad_norms = None

    @torch.no_grad()
    def record_gradients(self) -> None:
        """Gradient norms of the learnable scalars, for the open point (call it in
        ``on_before_optimizer_step``: after unscaling and the DDP all-reduce)."""
        if not self._open:
            return
        norms = []
        for info in self.infos:
            trainable = self.blocks[info.name].trainable_attention_parameters()
            for name in info.trainable_names:
                param = trainable.get(name)
                grad = None if param is None else param.grad
                norms.append(
                    torch.full((), math.nan) if grad is None
                    else torch.linalg.vector_norm(grad.detach().double())
                )
        if norms:
            device = self._device()
            self._grad_norms = torch.stack([n.to(device) for n in norms])

    def _device(self) -> torch.device:
        first = next(iter(self.blocks.values()))
        return first.recorded_statistics.device

    @torch.no_grad()
    def finish(self, trainer: pl.Trainer, step: int) -> GlobalStats:
        """Close the point and read it: parameters in, one collective, one host copy."""
        if not self._open:
            raise RuntimeError("StatisticsCollector.finish() without an open point")
        if not self.blocks:
            self.close()
            return GlobalStats(step=step, blocks={})
        device = self._device()
        parts, params = [], []
        # The blocks' layouts now: another consumer may have widened one since `bind`.
        layouts = [self.blocks[info.name].statistics_layout for info in self.infos]
        for info in self.infos:
            block = self.blocks[info.name]
            parts.append(block.recorded_statistics.to(device))
            current = block.attention_parameters()
            params += [
                torch.as_tensor(current[n], dtype=torch.float64).to(device).reshape(())
                if n in current else torch.full((), math.nan, dtype=torch.float64, device=device)
                for n in info.param_names
            ]
        n_grads = sum(len(info.trainable_names) for info in self.infos)
        grads = self._grad_norms
        if grads is None:
            grads = torch.full((n_grads,), math.nan, dtype=torch.float64, device=device)
        dtype = parts[0].dtype
        if params:  # blocks without scalar parameters (a user's gate) have none
            parts.append(torch.stack(params).to(dtype))
        vector = torch.cat(parts + [grads.to(dtype)])
        self.close()  # the values are in `vector`
        host = combine_processes(trainer, vector, self._reductions(layouts, vector.device))
        return self._parse(host, layouts, step)

    def _reductions(self, layouts: list, device: torch.device) -> torch.Tensor:
        """How each slot of the read vector combines over processes: every block's
        accumulator, then the parameters and gradient norms (identical on every process:
        rank 0's are taken). Cached: it changes only if another consumer widens a layout."""
        codes = self._kind_codes(layouts)
        if self._kinds is None or self._kinds.numel() != len(codes):
            self._kinds = torch.tensor(codes, device=device)
        return self._kinds

    def _kind_codes(self, layouts: list) -> list[int]:
        codes = [_CODES[k] for layout in layouts for k in layout.reductions]
        return codes + [_FIRST] * sum(
            len(i.param_names) + len(i.trainable_names) for i in self.infos
        )

    def _parse(self, host: list[float], layouts: list, step: int) -> GlobalStats:
        pos, stats = 0, {}
        param_pos = sum(layout.size for layout in layouts)
        grad_pos = param_pos + sum(len(info.param_names) for info in self.infos)
        for info, layout in zip(self.infos, layouts, strict=True):
            size = layout.size
            values = host[pos : pos + size]
            pos += size
            params = dict(zip(info.param_names, host[param_pos:], strict=False))
            param_pos += len(info.param_names)
            grads = {
                n: g for n, g in zip(info.trainable_names, host[grad_pos:], strict=False)
                if math.isfinite(g)
            }
            grad_pos += len(info.trainable_names)
            stats[info.name] = block_stats(layout, values, params, grads, info.trainable_names)
        return GlobalStats(step=step, blocks=stats)
