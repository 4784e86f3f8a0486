"""``AttentionClassifier``: a LightningModule around :class:`AttentionCNN`."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_attn.blocks import (
    AuxLossWeights,
    attention_aux_terms,
    find_attention_blocks,
    find_router_blocks,
)
from lightning_attn.core.validation import check_int
from lightning_attn.metrics import LocalisationScore
from lightning_attn.schedule import LoggingSchedule

from .backbone import AttentionCNN
from .options import (
    Activation,
    AttentionName,
    CoordOptions,
    Downsample,
    DSAOptions,
    block_kwargs,
    block_options,
)

__all__ = ["AttentionClassifier"]

Batch = tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]


def _check_backbone_arguments(backbone: object, hparams: Mapping[str, Any]) -> None:
    """A backbone replaces the built-in CNN: its arguments must keep their defaults (set,
    they would silently do nothing)."""
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"backbone must be an nn.Module or None, got {type(backbone).__name__}")
    defaults = {
        name: p.default
        for name, p in inspect.signature(AttentionClassifier.__init__).parameters.items()
    }
    defaults["dsa"] = block_options("dsa", None)
    defaults["coord"] = block_options("coord", None)
    changed = [
        f"{name}={hparams[name]!r}" for name in _CNN_ARGUMENTS
        if _normalised(hparams[name]) != _normalised(defaults[name])
    ]
    if changed:
        raise ValueError(
            f"backbone={type(backbone).__name__} replaces the built-in AttentionCNN, which "
            f"{', '.join(changed)} configure(s): leave them out (insert attention into the "
            "backbone with insert_attention or timm's attn_layer / se_layer)"
        )


def _normalised(value: object) -> object:
    # stage_widths=[16, 32, 64] from a config is the default (16, 32, 64)
    return tuple(value) if isinstance(value, list) else value


def _describe(obj: object) -> str:
    if isinstance(obj, Tensor):
        return f"shape {tuple(obj.shape)} dtype {obj.dtype}"
    return type(obj).__name__


# The arguments that configure the built-in AttentionCNN: with backbone= they would do nothing.
_CNN_ARGUMENTS = (
    "in_channels", "stage_widths", "depth", "attention", "attention_kwargs", "activation",
    "downsample", "dropout", "stem_stride", "dsa", "coord",
)
# What the CNN receives otherwise than by name: its blocks' keywords, merged from these.
_BLOCK_ARGUMENTS = ("attention_kwargs", "dsa", "coord")
# Callables and modules: the CLI writes the first two to config.yaml, a module is weights,
# and the factories are code (passed again to load_from_checkpoint, as backbone is).
_NOT_HYPERPARAMETERS = ("optimizer", "lr_scheduler", "backbone", "attention_factories")
# Where a checkpoint of a model with backbone= names the backbone's class (see
# on_save_checkpoint): a reload without backbone= is then a clear error, not a key mismatch.
_BACKBONE_KEY = "lightning_attn_backbone"


class AttentionClassifier(pl.LightningModule):
    """Image classifier: a small CNN with an attention block after every stage, or any
    backbone of yours.

    The network (``self.net``) is :class:`~lightning_attn.modules.AttentionCNN`, or
    ``backbone`` when given: any ``nn.Module`` mapping images ``(B,C,H,W)`` to logits
    ``(B,num_classes)``, e.g. a timm or torchvision model (built with ``num_classes``), with
    or without attention blocks (``attn_layer=``, ``insert_attention``). Batches are
    ``(images (B,C,H,W) float, labels (B,) int64[, boxes (B,4) float])``; with boxes,
    validation and test also score how well each attention block's spatial mask localises
    the object (:class:`~lightning_attn.metrics.LocalisationScore`).

    Logged: ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``,
    ``test/acc`` (``train/aux/...`` too, see ``aux_loss``) and, per block with a spatial
    mask, ``val/loc/<block>`` and ``test/loc/<block>`` (``<block>`` is its
    ``named_modules()`` path, e.g. ``net.features.attn1.block``). Accuracy and
    localisation are torchmetrics objects logged as such, so they are reduced across
    processes.

    Args:
        num_classes: number of classes (``>= 2``).
        in_channels: image channels.
        stage_widths: output width of each stage (one stage per entry, each ``>= 1``).
        depth: ConvBNAct layers per stage.
        attention: ``"dsa"``, ``"coord"`` or ``"none"`` (see ``attention_names()``; from
            Python also a name added with ``register_attention``).
        attention_kwargs: extra constructor arguments of that block, over its options below
            (a plain dict, for Python callers; configs use ``dsa`` / ``coord``).
        activation: ``"relu"``, ``"gelu"`` or ``"silu"``.
        downsample: between stages: ``"maxpool"``, ``"avgpool"`` or ``"stride"``.
        dropout: before the linear head, in ``[0, 1)``.
        stem_stride: stride of the very first conv (2 makes every stage 4x cheaper).
        dsa: DynamicSpatialAttention's constructor arguments, used when ``attention="dsa"``
            (a :class:`~lightning_attn.modules.DSAOptions` or a dict of some of its fields).
        coord: CoordinateAttention's constructor arguments (but ``in_channels``), used when
            ``attention="coord"`` (a :class:`~lightning_attn.modules.CoordOptions` or a dict).
        optimizer: ``params -> Optimizer`` (LightningCLI dependency injection:
            ``--model.optimizer SGD --model.optimizer.lr 0.1``).
        lr_scheduler: ``optimizer -> LRScheduler`` or ``None``; ``ReduceLROnPlateau``
            monitors ``val/loss``.
        backbone: the network to train instead of the built-in CNN (then the CNN's
            arguments, ``in_channels`` to ``coord``, must keep their defaults). Its
            attention blocks are found as the built-in ones are (localisation score,
            diagnostics); assigning ``model.net = other`` before ``fit`` works as well.
        aux_loss: weights of the auxiliary router losses
            (:class:`~lightning_attn.blocks.AuxLossWeights`: ``importance``, ``balance``,
            ``entropy``, ``z_loss``; a dict of some of them works too), added to the training
            loss (:func:`~lightning_attn.blocks.attention_aux_loss`); all zero (default):
            nothing is computed. Non-zero weights need blocks with a router (``"dsa"``).
            Then ``train/loss`` is the cross-entropy plus ``train/aux/loss`` (the weighted
            sum), and each term with a non-zero weight is logged as ``train/aux/<term>``
            (its mean over the blocks, unweighted) at the Trainer's logging steps.
        attention_factories: name -> ``factory(channels, **kwargs)``: blocks of your own
            for ``attention`` to name, for this model only (see
            :func:`~lightning_attn.blocks.create_attention`); code, not a hyperparameter:
            pass them again to ``load_from_checkpoint``.

    ``save_hyperparameters`` keeps everything except ``optimizer`` and ``lr_scheduler``
    (callables do not load with ``torch.load(weights_only=True)``; the CLI writes them to
    the run's ``config.yaml``) and ``backbone`` (a module is weights, not a
    hyperparameter), ``dsa`` and ``coord`` as plain dicts, so
    ``AttentionClassifier.load_from_checkpoint(path)`` rebuilds the network; with a
    backbone, pass a fresh one of the same architecture:
    ``load_from_checkpoint(path, backbone=timm.create_model("resnet18", num_classes=10))``
    (a checkpoint with a backbone says so when it is missing).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        stage_widths: Sequence[int] = (16, 32, 64),
        depth: int = 1,
        attention: AttentionName = "dsa",
        attention_kwargs: dict[str, Any] | None = None,
        activation: Activation = "relu",
        downsample: Downsample = "maxpool",
        dropout: float = 0.0,
        stem_stride: int = 1,
        dsa: DSAOptions = DSAOptions(),  # noqa: B008  (frozen; a default jsonargparse expands)
        coord: CoordOptions = CoordOptions(),  # noqa: B008
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        backbone: nn.Module | None = None,
        aux_loss: AuxLossWeights = AuxLossWeights(),  # noqa: B008  (frozen)
        attention_factories: Mapping[str, Callable[..., nn.Module]] | None = None,
    ) -> None:
        super().__init__()
        # Plain dicts before save_hyperparameters reads them: checkpoints load with
        # torch.load(weights_only=True) and hparams.yaml stays plain YAML.
        dsa, coord = block_options("dsa", dsa), block_options("coord", coord)
        aux_weights = AuxLossWeights.coerce(aux_loss)
        aux_loss = dataclasses.asdict(aux_weights)
        self.save_hyperparameters(ignore=list(_NOT_HYPERPARAMETERS))
        self.net = self._network(backbone, attention_factories)
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.train_acc, self.val_acc, self.test_acc = (
            MulticlassAccuracy(num_classes, average="micro") for _ in range(3))
        self.block_names: list[str] = []
        self.val_loc = nn.ModuleList()
        self.test_loc = nn.ModuleList()
        self._sync_blocks()
        #: ``term -> weight`` of the auxiliary router losses with a non-zero weight.
        self.aux_weights: dict[str, float] = aux_weights.nonzero()
        if self.aux_weights and not find_router_blocks(self.net):
            raise ValueError(
                f"aux_loss={aux_weights} needs attention blocks with a router, but "
                f"attention={attention!r} has none: use attention='dsa' or zero weights"
            )
        self._log_schedule = LoggingSchedule()

    def _network(
        self, backbone: nn.Module | None,
        factories: Mapping[str, Callable[..., nn.Module]] | None,
    ) -> nn.Module:
        """``backbone`` (then the CNN's arguments must keep their defaults), else the built-in
        :class:`AttentionCNN` from the hyperparameters."""
        hp = self.hparams
        if backbone is not None:
            if factories is not None:
                raise ValueError(
                    "attention_factories name blocks for the built-in AttentionCNN, which "
                    f"backbone={type(backbone).__name__} replaces: leave them out"
                )
            _check_backbone_arguments(backbone, hp)
            check_int("num_classes", hp.num_classes, 2)
            return backbone
        return AttentionCNN(
            **{name: hp[name] for name in _CNN_ARGUMENTS if name not in _BLOCK_ARGUMENTS},
            num_classes=hp.num_classes,
            attention_kwargs=block_kwargs(
                hp.attention, {"dsa": hp.dsa, "coord": hp.coord}, hp.attention_kwargs
            ),
            attention_factories=factories,
        )

    def _sync_blocks(self) -> None:
        """One localisation metric per attention block of ``self.net``: again whenever the
        network was replaced (``model.net = timm_model`` after construction)."""
        names = list(find_attention_blocks(self)[0])
        if names == self.block_names and len(self.val_loc) == len(names):
            return
        self.block_names = names
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        self.val_loc = nn.ModuleList(LocalisationScore() for _ in names).to(device)
        self.test_loc = nn.ModuleList(LocalisationScore() for _ in names).to(device)

    # -- checkpoints with a backbone -----------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not isinstance(self.net, AttentionCNN):
            net = type(self.net)
            checkpoint[_BACKBONE_KEY] = f"{net.__module__}.{net.__qualname__}"

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(_BACKBONE_KEY)
        if saved is not None and isinstance(self.net, AttentionCNN):
            raise ValueError(
                f"this checkpoint holds a {saved} backbone, not the built-in AttentionCNN: "
                "pass a fresh one of the same architecture, "
                "AttentionClassifier.load_from_checkpoint(path, backbone=<the model>)"
            )

    def setup(self, stage: str) -> None:
        self._sync_blocks()
        # A label >= num_classes fails deep inside cross_entropy during the sanity check; a
        # data module that says how many classes its labels take is checked before that.
        classes = getattr(getattr(self.trainer, "datamodule", None), "num_classes", None)
        if isinstance(classes, int) and classes > self.num_classes:
            raise ValueError(
                f"num_classes must cover the data module's {classes} classes (labels 0 to "
                f"{classes - 1}), got {self.num_classes}"
            )

    # -- forward and batch checks -------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """``images (B,C,H,W) -> logits (B,num_classes)``."""
        return self.net(x)

    def _check_images(self, x: object) -> None:
        """The network's own check (AttentionCNN's names its input size), else: a float
        ``(B, C, H, W)`` tensor."""
        check = getattr(self.net, "check_input", None)
        if callable(check):
            check(x)
            return
        expected = "images as a float tensor of shape (B, C, H, W)"
        if not isinstance(x, Tensor):
            raise TypeError(f"expected {expected}, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"expected {expected}, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"expected {expected}, got dtype {x.dtype}")

    def _check_logits(self, logits: object, b: int) -> Tensor:
        """A backbone's output must be logits ``(B, num_classes)``: a timm or torchvision
        model built without ``num_classes`` returns 1000 of them."""
        if not isinstance(logits, Tensor) or logits.shape != (b, self.num_classes):
            raise ValueError(
                f"the network must return logits of shape ({b}, {self.num_classes}) "
                f"(num_classes={self.num_classes}), got {_describe(logits)}; build a timm or "
                "torchvision backbone with num_classes="
            )
        return logits

    def _unpack(self, batch: Any) -> tuple[Tensor, Tensor, Tensor | None]:
        """Check a batch and return ``(images, labels, boxes or None)``."""
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            got = _describe(batch) + (
                f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
            )
            raise TypeError(
                "expected a batch (images (B,C,H,W) float, labels (B,) int64"
                f"[, boxes (B,4) float]), got {got}"
            )
        x, y = batch[0], batch[1]
        boxes = batch[2] if len(batch) == 3 else None
        self._check_images(x)
        b = x.shape[0]
        if not isinstance(y, Tensor) or y.shape != (b,) or y.dtype != torch.int64:
            raise ValueError(
                f"expected labels as an int64 tensor of shape ({b},), got {_describe(y)}"
            )
        if boxes is not None and (
            not isinstance(boxes, Tensor) or boxes.shape != (b, 4) or not boxes.is_floating_point()
        ):
            raise ValueError(
                f"expected boxes as a float tensor of shape ({b}, 4), got {_describe(boxes)}"
            )
        return x, y, boxes

    # -- steps ------------------------------------------------------------------------
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        x, y, _ = self._unpack(batch)
        logits = self._check_logits(self(x), x.shape[0])
        loss = F.cross_entropy(logits, y)
        if self.aux_weights:  # only the terms with a non-zero weight are computed
            terms = attention_aux_terms(self.net, tuple(self.aux_weights))
            aux = None
            for term, weight in self.aux_weights.items():
                aux = weight * terms[term] if aux is None else aux + weight * terms[term]
            loss = loss + aux
            if self._logs_this_step():  # LightningModule.log costs ~1 ms a value: not every step
                kw = {"batch_size": x.shape[0]}
                self.log("train/aux/loss", aux.detach(), **kw)
                for term, value in terms.items():
                    self.log(f"train/aux/{term}", value.detach(), **kw)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=True, batch_size=x.shape[0])
        return loss

    def _logs_this_step(self) -> bool:
        """Whether Lightning writes this training batch's ``self.log`` values (its rule, from
        the Trainer's counters); ``True`` without a Trainer."""
        if self._trainer is None:
            return True
        return self._log_schedule.decide(self.trainer)[0] or bool(self.trainer.should_stop)

    def _eval_step(self, batch: Batch, stage: str) -> None:
        x, y, boxes = self._unpack(batch)
        logits, masks = self._forward_capturing(x) if boxes is not None else (self(x), {})
        self._check_logits(logits, x.shape[0])
        if stage == "val":
            acc, loc = self.val_acc, self.val_loc
        else:
            acc, loc = self.test_acc, self.test_loc
        acc(logits, y)
        kw = {"on_step": False, "on_epoch": True, "batch_size": x.shape[0]}
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), sync_dist=True, prog_bar=True, **kw)
        self.log(f"{stage}/acc", acc, prog_bar=True, **kw)
        if boxes is None:
            return
        for i, name in enumerate(self.block_names):
            if name in masks:
                loc[i].update(masks[name], boxes, tuple(x.shape[-2:]))
                self.log(f"{stage}/loc/{name}", loc[i], **kw)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """Class probabilities ``(B, num_classes)``."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        self._check_images(x)
        return self._check_logits(self(x), x.shape[0]).softmax(dim=-1)

    # -- spatial masks for the localisation score (validation and test only) ----------
    def _forward_capturing(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``self(x)`` and each block's spatial map ``(B,1,h,w)`` from that forward."""
        blocks = [(name, self.get_submodule(name)) for name in self.block_names]
        for _, block in blocks:
            block.start_capture(self)
        try:
            logits = self(x)
            masks = {n: b.captured_map for n, b in blocks if b.captured_map is not None}
        finally:  # never leave capture on: the next training forward would pay for it
            for _, block in blocks:
                block.stop_capture(self)
        return logits, masks

    # -- optimisation -----------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}
