"""Validation and test: one point of statistics per epoch, and maps, for any LightningModule."""

import io

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader

from lightning_attn.blocks import CoordinateAttention, DynamicSpatialAttention
from lightning_attn.callbacks import AttentionDiagnostics
from lightning_attn.modules import OutputOnly

from .cb_models import MemoryLogger, TinyAttnNet, make_data, make_trainer


class NoForward(LightningModule):
    """Steps call ``self.net`` directly: the module has no ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), OutputOnly(DynamicSpatialAttention()),
            CoordinateAttention(4, min_mid_channels=4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4, 3),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self.net(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader(n=16):
    return DataLoader(make_data(n, size=8), batch_size=4)


def test_validate_and_test_log_their_statistics_and_maps_without_forward(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb")
    logger = MemoryLogger()
    cb = AttentionDiagnostics(num_images=3, summary=False)
    model = NoForward()
    trainer = make_trainer(tmp_path, [cb], logger=[tb, logger], limit_val_batches=None)
    trainer.validate(model, _loader())
    trainer.test(model, _loader())
    (val,) = logger.attn(prefix="val/attn/")
    (test,) = logger.attn(prefix="test/attn/")
    for _, metrics in (val, test):
        names = {k.split("/", 2)[2] for k in metrics}
        assert {"net.1.block/mask/std", "net.2/mask_h/mean", "net.1.block/router/usage_2",
                "net.1.block/param/temperature"} <= names
    assert cb.block_names == []  # torn down after test
    acc = EventAccumulator(tb.log_dir, size_guidance={"images": 0})
    acc.Reload()
    assert len(acc.Images("val/attn/maps")) == 1 and len(acc.Images("test/attn/maps")) == 1
    assert val[1]["val/attn/net.1.block/mask/std"] > 0
    assert test[1]["test/attn/net.1.block/mask/std"] > 0
    assert not model.net[1].block.capture and not model.net[1].block.recording


def test_eval_statistics_cover_every_batch(tmp_path):
    cb = AttentionDiagnostics(num_images=0, summary=False)
    model = TinyAttnNet()
    seen = []
    model.dsa.register_forward_hook(lambda m, i, o: seen.append(o[1].detach()))
    logger = MemoryLogger()
    trainer = make_trainer(tmp_path, [cb], limit_val_batches=None, logger=logger)
    trainer.validate(model, DataLoader(make_data(20, size=8), batch_size=8))
    masks = torch.cat(seen).double()
    ((_, got),) = logger.attn(prefix="val/attn/")
    assert got["val/attn/dsa/mask/std"] == pytest.approx(masks.std().item(), rel=1e-5)
    assert got["val/attn/dsa/mask/max"] == pytest.approx(masks.max().item(), rel=1e-6)


def test_maps_show_labelled_columns(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb")
    trainer = make_trainer(tmp_path, [AttentionDiagnostics(num_images=2, summary=False)],
                           logger=tb, limit_val_batches=None)
    trainer.validate(TinyAttnNet(), DataLoader(make_data(4, size=8), batch_size=4))
    acc = EventAccumulator(tb.log_dir, size_guidance={"images": 0})
    acc.Reload()
    (event,) = acc.Images("val/attn/maps")
    image = Image.open(io.BytesIO(event.encoded_image_string)).convert("L")
    header = torch.tensor(list(image.crop((0, 0, image.width, 16)).getdata()))
    assert (header < 128).sum() > 30  # dark label text in the white header row
    # the colour scale under the grid: the colormap from dark (0) to light (1), with ticks
    rgb = Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB")
    bar = [rgb.getpixel((x, image.height - 25)) for x in range(6, 60)]
    assert sum(bar[0]) < sum(bar[-1]) and len(set(bar)) > 20  # a ramp, not a flat band
    scale = torch.tensor(list(image.crop((0, image.height - 14, 80, image.height)).getdata()))
    assert (scale < 128).sum() > 10  # tick labels
