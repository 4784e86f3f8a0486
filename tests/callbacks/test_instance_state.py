"""Adapters, writers and layouts belong to the callback or the run that uses them: two
callbacks (or two Trainers) in one process never see each other's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader

from lightning_attn.blocks import attention_adapter, register_attention_adapter
from lightning_attn.blocks.adapters import adapters_in_force
from lightning_attn.callbacks import (
    AttentionDiagnostics,
    DiagnosticsWriter,
    TensorBoardWriter,
    register_writer,
)
from lightning_attn.callbacks.writers import writer_for

from .cb_models import MemoryLogger, make_data, make_trainer


class Gate(nn.Module):
    """A user's gate that does not record by itself."""

    def __init__(self, channels: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 3, padding=1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigmoid(self.conv(x))


class GateNet(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()
        self.head = nn.Linear(1, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.gate(x).mean(dim=(2, 3))), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(make_data(16), batch_size=8)


def test_an_adapter_passed_to_one_callback_is_that_callbacks_alone(tmp_path):
    gate = attention_adapter(Gate, masks={"mask": "sigmoid"})
    with_gate = AttentionDiagnostics(adapters=[gate], summary=False, num_images=0,
                                     log_every_n_steps=1)
    without = AttentionDiagnostics(include=["*"], summary=False, num_images=0,
                                   log_every_n_steps=1)
    logger = MemoryLogger()
    before = adapters_in_force()
    seen = []

    class Peek(Callback):
        def on_train_start(self, trainer, pl_module):
            seen.append((with_gate.block_names, without.block_names))

    make_trainer(tmp_path, [with_gate, without, Peek()], max_steps=2, logger=logger).fit(
        GateNet())
    assert seen == [(["gate"], [])]
    assert logger.attn("attn/gate/mask/mean")
    assert adapters_in_force() == before  # nothing registered for the process


def test_a_registration_is_undone_by_its_handle():
    before = adapters_in_force()
    registration = register_attention_adapter(Gate, masks={"mask": "sigmoid"})
    assert adapters_in_force()[0] is registration.adapter
    registration.remove()
    registration.remove()  # a second call does nothing
    assert adapters_in_force() == before
    with register_attention_adapter(Gate, masks={"mask": "sigmoid"}) as handle:
        assert handle.adapter in adapters_in_force()
    assert adapters_in_force() == before


def test_bad_adapters_and_writers_name_the_argument():
    with pytest.raises(TypeError, match="adapters must be AttentionAdapter"):
        AttentionDiagnostics(adapters=[Gate])
    with pytest.raises(TypeError, match="writers must be DiagnosticsWriter subclasses"):
        AttentionDiagnostics(writers=[MemoryLogger])


class RecordingWriter(DiagnosticsWriter):
    logger_type = MemoryLogger

    def __init__(self, logger) -> None:
        super().__init__(logger)
        self.texts: list[str] = []

    def text(self, tag, text, step):
        self.texts.append(tag)


def test_a_writer_passed_to_one_callback_is_that_callbacks_alone():
    logger = MemoryLogger()
    assert type(writer_for(logger, (RecordingWriter,))) is RecordingWriter
    assert type(writer_for(logger)) is DiagnosticsWriter
    with register_writer(RecordingWriter):
        assert type(writer_for(logger)) is RecordingWriter
    assert type(writer_for(logger)) is DiagnosticsWriter


def test_the_merged_layout_lives_with_its_run(tmp_path):
    first = TensorBoardLogger(tmp_path, name="a")
    second = TensorBoardLogger(tmp_path, name="b")
    TensorBoardWriter(first).layout({"attn/x": {"chart": ["Multiline", ["x"]]}})
    TensorBoardWriter(first).layout({"attn/y": {"chart": ["Multiline", ["y"]]}})
    TensorBoardWriter(second).layout({"attn/z": {"chart": ["Multiline", ["z"]]}})
    attribute = TensorBoardWriter.LAYOUT_ATTRIBUTE
    assert set(getattr(first.experiment, attribute)) == {"attn/x", "attn/y"}
    assert set(getattr(second.experiment, attribute)) == {"attn/z"}
