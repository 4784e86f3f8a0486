"""AttentionDiagnostics on a timm model with no change to it: its CBAM modules are found,
logged, judged and drawn like our own blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from lightning_attn.callbacks import AttentionDiagnostics

from .cb_models import MemoryLogger, make_data, make_trainer

timm = pytest.importorskip("timm")


class TimmNet(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = timm.create_model("resnet18", num_classes=3, in_chans=1,
                                          block_args=dict(attn_layer="cbam"))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.backbone(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self.backbone(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_timm_cbam_is_diagnosed_without_changing_the_model(tmp_path):
    torch.manual_seed(0)
    model = TimmNet()
    state = set(model.state_dict())
    cb = AttentionDiagnostics(num_images=2, summary=False, on_problem="ignore")
    memory, tb = MemoryLogger(), TensorBoardLogger(tmp_path, name="tb")
    loader = DataLoader(make_data(16, size=32), batch_size=4)
    make_trainer(tmp_path, [cb], max_steps=2, logger=[memory, tb], log_every_n_steps=1,
                 limit_val_batches=1, val_check_interval=2).fit(model, loader, loader)
    assert len(cb.last_stats.blocks) == 8  # one CBAM per basic block
    (_, point), *_ = memory.attn()
    for tag in ("attn/backbone.layer1.0.se/channel/mean", "attn/backbone.layer1.0.se/spatial/std",
                "attn/backbone.layer4.1.se/spatial/sat_high"):
        assert tag in point
    assert set(model.state_dict()) == state
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed at the end
    acc = EventAccumulator(tb.log_dir, size_guidance={"images": 0})
    acc.Reload()
    assert acc.Images("val/attn/maps")  # CBAM's spatial masks give attention maps
