"""AttentionMapLogger: each block's mask over a fixed set of validation images, every epoch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ..blocks import AttentionObservation, Observer
from ._checks import check_fraction, check_interval, check_patterns
from .discovery import find_attention_blocks
from .image_grid import make_grid, overlay, to_display, upsample_mask
from .tensorboard import tensorboard_loggers, warn_no_tensorboard

__all__ = ["AttentionMapLogger"]


def _images_of(batch: Any) -> torch.Tensor | None:
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if isinstance(x, torch.Tensor) and x.dim() == 4 and x.is_floating_point():
        return x
    return None


class AttentionMapLogger(Callback):
    """At the end of every validation epoch, an image grid of attention maps to TensorBoard.

    The images are the first ``num_images`` of the first validation batch(es) (dataloader 0;
    ``batch[0]`` for a tuple/list batch, else the batch itself, ``(N,C,H,W)``), chosen once
    and kept in the checkpoint, so every epoch (and a resumed run) shows the same images.
    At each validation epoch end the LightningModule's ``forward`` runs on them in eval mode
    under ``no_grad`` with observers attached; the train/eval mode is restored afterwards.

    Grid (tag ``tag``, x-axis ``global_step``): one row per image; column 0 is the input
    (min-max normalised, grey for 1 channel), then one column per block in module order: the
    block's mask upsampled to the input size, viridis-coloured, blended over the input. The
    mask is ``mask`` for DSA and ``mask_h * mask_w`` averaged over channels for
    CoordinateAttention (in general: the product of a block's masks, channel mean).

    Args:
        num_images: images in the fixed set (``>= 1``).
        include, exclude: fnmatch patterns of block names to show / leave out.
        overlay_alpha: opacity of the mask over the image, in ``[0, 1]``.
        tag: TensorBoard image tag.
    """

    def __init__(
        self,
        num_images: int = 8,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        overlay_alpha: float = 0.5,
        tag: str = "attn/maps",
    ) -> None:
        self.num_images = check_interval("num_images", num_images, minimum=1)
        self.include = check_patterns("include", include, allow_none=True)
        self.exclude = check_patterns("exclude", exclude, allow_none=False) or ()
        self.overlay_alpha = check_fraction("overlay_alpha", overlay_alpha)
        if not isinstance(tag, str) or not tag:
            raise ValueError(f"tag must be a non-empty string, got {tag!r}")
        self.tag = tag
        self._images: torch.Tensor | None = None  # (N,C,H,W) on the CPU
        self._frozen = False
        self._num_logged = 0
        self._blocks: dict[str, nn.Module] = {}
        self._failed = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            num_images=self.num_images, include=self.include, exclude=self.exclude, tag=self.tag
        )

    @property
    def images(self) -> torch.Tensor | None:
        """The fixed image set ``(N,C,H,W)`` (CPU), once chosen."""
        return self._images

    # -- setup -----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            warn_no_tensorboard(trainer, type(self).__name__, "attention-map images")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        blocks = find_attention_blocks(pl_module, self.include, self.exclude)
        if not blocks:
            rank_zero_warn(
                f"{type(self).__name__}: no attention block found in "
                f"{type(pl_module).__name__}; no attention maps will be logged"
            )
        self._bind(blocks)

    def _bind(self, blocks: dict[str, nn.Module]) -> None:
        self._blocks = dict(blocks)
        self._failed = False

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._blocks = {}

    # -- choosing the images ---------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._frozen:
            self._images = None  # a partial set from an earlier pass would repeat images

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._frozen or not self._blocks or dataloader_idx != 0:
            return
        x = _images_of(batch)
        if x is None:
            rank_zero_warn(
                f"{type(self).__name__}: the validation batch is not an (N,C,H,W) float tensor "
                "nor a tuple/list starting with one; no attention maps will be logged"
            )
            self._frozen, self._failed = True, True
            return
        have = 0 if self._images is None else self._images.shape[0]
        take = x[: self.num_images - have].detach().to("cpu", copy=True)
        self._images = take if self._images is None else torch.cat((self._images, take))
        self._frozen = self._images.shape[0] >= self.num_images

    # -- rendering -------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._images is None or not self._blocks or self._failed:
            return
        if trainer.sanity_checking:
            return
        self._frozen = True  # whatever the first real validation epoch gave is the set
        grid = self.render(trainer, pl_module)
        if grid is None or not trainer.is_global_zero:
            return
        for logger in tensorboard_loggers(trainer):
            logger.experiment.add_image(self.tag, grid, global_step=trainer.global_step)
        self._num_logged += 1

    @torch.no_grad()
    def render(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.Tensor | None:
        """Run the forward on the fixed images and return the ``(3, H', W')`` grid (CPU)."""
        assert self._images is not None
        captured: dict[str, dict[str, torch.Tensor]] = {}

        def capture(name: str) -> Observer:
            def observe(block: nn.Module, obs: AttentionObservation) -> None:
                captured.setdefault(name, dict(obs.masks))

            return observe

        handles = [b.attach_observer(capture(n)) for n, b in self._blocks.items()]
        was_training = pl_module.training
        pl_module.eval()
        try:
            x = self._images.to(pl_module.device)
            plugin = trainer.precision_plugin
            with plugin.forward_context():
                pl_module(plugin.convert_input(x))
        except Exception as err:  # the user's forward may not take images: tell, don't crash
            rank_zero_warn(
                f"{type(self).__name__}: calling {type(pl_module).__name__}(images) on the "
                f"validation images failed ({type(err).__name__}: {err}); no attention maps "
                "will be logged"
            )
            self._failed = True
            return None
        finally:
            for handle in handles:
                handle.remove()
            pl_module.train(was_training)

        images = to_display(self._images)
        size = (images.shape[-2], images.shape[-1])
        columns = [images]
        for name in self._blocks:
            heat = self._heat(captured.get(name, {}), images.shape[0])
            if heat is not None:
                columns.append(overlay(images, upsample_mask(heat, size), self.overlay_alpha))
        tiles = torch.stack(columns, dim=1)  # (N, columns, 3, H, W)
        return make_grid(tiles)

    @staticmethod
    def _heat(masks: dict[str, torch.Tensor], n: int) -> torch.Tensor | None:
        """Product of a block's masks, channel mean: ``(N,1,h,w)`` on the CPU, or ``None``."""
        heat = None
        try:
            for mask in masks.values():
                m = mask.detach().float().cpu()
                heat = m if heat is None else heat * m
        except RuntimeError:
            return None
        if heat is None or heat.dim() != 4 or heat.shape[0] != n:
            return None
        return heat.mean(dim=1, keepdim=True)

    # -- checkpointing and pickling --------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "images": None if self._images is None else self._images.clone(),
            "frozen": self._frozen,
            "num_logged": self._num_logged,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        images = state_dict.get("images")
        self._images = None if images is None else images.detach().cpu()
        self._frozen = bool(state_dict.get("frozen", False)) and self._images is not None
        self._num_logged = int(state_dict.get("num_logged", 0))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_blocks"] = {}
        state["_images"] = None  # no tensors travel; the set is chosen again the same way
        state["_frozen"] = False
        return state
