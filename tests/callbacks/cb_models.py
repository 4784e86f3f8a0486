"""Tiny LightningModules and a fake recording block for the callback tests."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_attn.blocks import RecordingMixin, attention_adapter, create_attention
from lightning_attn.core import ParameterSpec
from lightning_attn.core.statistics import router_entropy


def make_data(n: int = 32, channels: int = 1, size: int = 8, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(x, y)


class TinyAttnNet(LightningModule):
    """conv stem -> DynamicSpatialAttention -> CoordinateAttention -> linear head."""

    def __init__(
        self,
        channels: int = 4,
        size: int = 8,
        n: int = 32,
        batch_size: int = 8,
        per_axis_alpha: bool = False,
        lr: float = 0.05,
        fail_at_step: int | None = None,
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.dsa = create_attention("dsa", channels, learnable_temperature=True, kernels=(3,))
        self.coord = create_attention(
            "coord", channels, learnable_alpha=True, per_axis_alpha=per_axis_alpha,
            beta=0.5, min_mid_channels=4,
        )
        self.head = nn.Linear(channels, 3)
        self.size, self.n, self.batch_size, self.lr = size, n, batch_size, lr
        self.fail_at_step = fail_at_step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        h = self.dsa(h)[0]
        h = self.coord(h)
        return self.head(h.mean(dim=(2, 3)))

    def training_step(self, batch, batch_idx):
        if self.fail_at_step is not None and self.global_step >= self.fail_at_step:
            raise RuntimeError("planned failure")
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(make_data(self.n, size=self.size), batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(make_data(16, size=self.size, seed=1), batch_size=self.batch_size)


def offline_stats(xs: torch.Tensor, k: int, scale: float = 1.0, low=0.05, high=0.95):
    """What the callbacks must log for a FakeBlock that saw the batches ``xs`` (concatenated).

    Computed as the block records, value by value: the mask in float64, each sample's router
    entropy in float32 from its float32 weights (:func:`router_entropy`), the means over
    samples in float64; so the logged numbers equal these to 1e-12, whatever path sums them.
    """
    mask = xs[:, :1].double().flatten()
    rw = torch.softmax(scale * xs[:, 0, 0, :k].float(), dim=1)
    ent = router_entropy(rw).double()
    return {
        "mask/mean": mask.mean().item(),
        "mask/std": mask.std().item(),
        "mask/min": mask.min().item(),
        "mask/max": mask.max().item(),
        "mask/sat_low": (mask < low).double().mean().item(),
        "mask/sat_high": (mask > high).double().mean().item(),
        "router/entropy": ent.mean().item(),
        "router/entropy_norm": ent.mean().item() / math.log(k),
        **{f"router/usage_{i}": rw[:, i].double().mean().item() for i in range(k)},
    }


class FakeBlock(RecordingMixin, nn.Module):
    """A user's recording block whose mask and router weights are known functions of the input.

    ``mask = x[:, :1]`` (the input itself, ``(B,1,H,W)``) and ``rw = softmax(x[:, 0, 0, :K])``
    ``(B,K)``, so tests can compute every statistic offline from the data. ``gain`` is a
    learnable scalar reported as ``temperature``.
    """

    mask_names = ("mask",)

    def __init__(self, num_branches: int = 3, router_scale: float = 1.0) -> None:
        super().__init__()
        self.num_branches = num_branches
        self.router_scale = router_scale
        self.gain = nn.Parameter(torch.tensor(1.0))

    @staticmethod
    def mask_of(x: torch.Tensor) -> torch.Tensor:
        return x[:, :1]

    def router_of(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.router_scale * x[:, 0, 0, : self.num_branches], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask, rw = self.mask_of(x), self.router_of(x)
        self.record(masks={"mask": mask}, router_weights=rw)
        return x * mask * self.gain

    def attention_parameters(self) -> dict[str, torch.Tensor]:
        return {"temperature": self.gain.detach()}

    def trainable_attention_parameters(self) -> dict[str, nn.Parameter]:
        return {"temperature": self.gain}

    def attention_parameter_specs(self) -> dict[str, ParameterSpec]:
        # a temperature-like gain: kept within the diagnostics' temperature range
        return {"temperature": ParameterSpec("temperature_min", "temperature_max", symbol="g")}


class FakeNet(LightningModule):
    """FakeBlock -> linear head, on data whose batches the test can replay.

    ``data`` is the training set; ``transform`` maps a batch ``x`` before the block (tests use
    it to feed constant, saturated or NaN masks).
    """

    def __init__(
        self,
        data: TensorDataset | None = None,
        batch_size: int = 8,
        num_branches: int = 3,
        router_scale: float = 1.0,
        transform=None,
        keep_batches: bool = False,
        lr: float = 0.01,
    ) -> None:
        super().__init__()
        self.data = data if data is not None else make_data(32)
        self.batch_size = batch_size
        self.block = FakeBlock(num_branches, router_scale)
        self.head = nn.Linear(self.data.tensors[0][0].numel(), 3)
        self.transform = transform
        self.keep_batches = keep_batches
        self.seen: list[tuple[int, torch.Tensor]] = []
        self.gains_used: list[tuple[int, float]] = []
        self.recording_seen: list[bool] = []
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform is not None:
            x = self.transform(x)
        return self.head(self.block(x).flatten(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.recording_seen.append(self.block.recording)
        if self.keep_batches:
            xt = self.transform(x) if self.transform is not None else x
            step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
            self.seen.append((step, xt.detach().clone()))
            self.gains_used.append((step, self.block.gain.item()))  # what this forward uses
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size)


class PlainNet(LightningModule):
    """No attention block at all."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.lin(x.flatten(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(make_data(16), batch_size=8)


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call: ``records`` is a list of ``(step, metrics)``."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.records.append((step, dict(metrics)))

    def attn(
        self, tag: str | None = None, prefix: str = "attn/"
    ) -> list[tuple[int | None, dict[str, float]]]:
        """Records holding tags starting with ``prefix`` (only ``tag`` if given)."""
        out = []
        for step, metrics in self.records:
            m = {k: v for k, v in metrics.items() if k.startswith(prefix)}
            if tag is not None:
                m = {tag: m[tag]} if tag in m else {}
            if m:
                out.append((step, m))
        return out


def make_trainer(tmp_path, callbacks, max_steps: int = 4, logger=False, **kwargs) -> Trainer:
    """A quiet CPU Trainer for the tests."""
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("limit_val_batches", 0)
    kwargs.setdefault("num_sanity_val_steps", 0)
    return Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=logger,
        callbacks=callbacks,
        default_root_dir=str(tmp_path),
        **kwargs,
    )


class ValidatedNet(FakeNet):
    """FakeNet with a validation loop over ``val_data`` (default: the training data)."""

    def __init__(self, val_data: TensorDataset | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.val_data = val_data if val_data is not None else self.data

    def validation_step(self, batch, batch_idx):
        self(batch[0])

    def val_dataloader(self):
        return DataLoader(self.val_data, batch_size=self.batch_size)


class Gate(nn.Module):
    """A user's gate, joining the diagnostics through an adapter (``GATE``): ``act`` gives
    the mask ``(B, 1, H, W)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 3, padding=1)
        self.act = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.act(self.conv(x))


GATE = attention_adapter(Gate, masks={"mask": "act"})


class GatedNet(LightningModule):
    """conv -> Gate -> head, with an averaged copy of ``net`` (timm's ``ModelEmaV3`` or
    torch's ``AveragedModel``): ``copy="teacher"`` makes it when training starts (after the
    diagnostics attached) and runs it on every batch as a distillation teacher;
    ``copy="validated"`` holds it as the submodule ``ema`` from ``__init__`` and validates
    with it. ``gate_masks`` keeps (step, the mask of ``net``'s gate) of every training batch.
    """

    def __init__(self, copy: str | None = None, kind: str = "ModelEmaV3", lr: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), Gate(4))
        self.head = nn.Linear(4, 3)
        self.copy, self.kind, self.lr = copy, kind, lr
        self.ema = self._average() if copy == "validated" else None
        self.teacher: list[nn.Module] = []  # a list: not a submodule
        self.gate_masks: list[tuple[int, torch.Tensor]] = []

    def _average(self) -> nn.Module:
        from timm.utils import ModelEmaV3
        from torch.optim.swa_utils import AveragedModel

        made = ModelEmaV3(self.net, decay=0.5) if self.kind == "ModelEmaV3" else AveragedModel(
            self.net)
        with torch.no_grad():
            for p in made.module.parameters():
                p.add_(0.3)  # an average that drifted: its masks differ from the model's
        return made

    def forward(self, x):
        return self.head(self.net(x).mean(dim=(2, 3)))

    def on_train_start(self) -> None:
        if self.copy == "teacher":
            self.teacher = [self._average()]

    def training_step(self, batch, batch_idx):
        x, y = batch
        with torch.no_grad():  # sigmoid, not gate.act: that call would be recorded
            mask = torch.sigmoid(self.net[1].conv(self.net[0](x)))
            self.gate_masks.append((self.global_step, mask))
        features = self.net(x).mean(dim=(2, 3))
        loss = F.cross_entropy(self.head(features), y)
        if self.teacher:
            with torch.no_grad():
                target = self.teacher[0].module(x).mean(dim=(2, 3))
            loss = loss + F.mse_loss(features, target)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            if self.kind == "ModelEmaV3":
                self.ema.update(self.net)
            else:
                self.ema.update_parameters(self.net)

    def validation_step(self, batch, batch_idx):
        self.ema.module(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD([*self.net.parameters(), *self.head.parameters()], lr=self.lr)

    def train_dataloader(self):
        return DataLoader(make_data(16, size=6), batch_size=4)

    def val_dataloader(self):
        return DataLoader(make_data(8, size=6, seed=1), batch_size=4)
