"""Collect each attention block's spatial mask through the observation point."""

from __future__ import annotations

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_attn.blocks import ObservableAttention
from lightning_attn.metrics import spatial_mask

__all__ = ["MaskCollector", "observable_blocks"]


def observable_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Every submodule speaking :class:`~lightning_attn.blocks.ObservableAttention`, by
    its ``named_modules()`` path."""
    return {
        name: m for name, m in model.named_modules() if name and isinstance(m, ObservableAttention)
    }


class MaskCollector:
    """While attached, keeps the latest spatial mask ``(B,1,h,w)`` of each observable block.

    ``attach(blocks)`` registers one observer per block; ``pop()`` returns and forgets the
    masks seen since the last call (name -> mask); ``detach()`` removes the observers.
    Blocks without a spatial mask (:func:`~lightning_attn.metrics.spatial_mask` is ``None``)
    never appear. CoordinateAttention's ``mean_C(a_h * a_w)`` is computed in the observer,
    without autograd.
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []
        self._masks: dict[str, Tensor] = {}

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, blocks: dict[str, nn.Module]) -> None:
        self.detach()
        for name, block in blocks.items():

            def observer(_block, obs, name=name) -> None:
                m = spatial_mask(obs.masks)
                if m is not None:
                    self._masks[name] = m

            self._handles.append(block.attach_observer(observer))

    def pop(self) -> dict[str, Tensor]:
        masks, self._masks = self._masks, {}
        return masks

    def __reduce__(self):
        # Observers are closures of a live model: a copy of the model starts detached.
        return (MaskCollector, ())

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._masks.clear()
