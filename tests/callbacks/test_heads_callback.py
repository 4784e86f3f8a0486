"""AttentionDiagnostics on a timm ViT: the heads' summaries are logged as scalars, the per-head
values as one JSON record per point, logit growth and entropy collapse are warned about with
their remedy, and attention it cannot measure is named at the start."""

from __future__ import annotations

import io
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from lightning_attn.callbacks import AttentionDiagnostics
from lightning_attn.core import HeadStats, LogitGrowthWarning, UnsupportedAttentionWarning
from lightning_attn.core.statistics import quantities

from ..blocks.head_oracle import sharpen
from .cb_models import MemoryLogger, make_trainer

timm = pytest.importorskip("timm")


class SharpViT(LightningModule):
    """A one-block ViT with query and key weights scaled up (logits past 100), and CaiT's
    talking-heads attention beside it (which the diagnostics cannot measure)."""

    def __init__(self) -> None:
        super().__init__()
        from timm.models.cait import TalkingHeadAttn

        torch.manual_seed(0)
        self.vit = sharpen(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
                                             depth=1, num_classes=3), 60.0)
        self.talking = TalkingHeadAttn(8, num_heads=2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.talking(torch.zeros(1, 4, 8))
        return F.cross_entropy(self.vit(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(8, 3, 32, 32, generator=g),
                             torch.randint(0, 3, (8,), generator=g))
        return DataLoader(data, batch_size=4)


def test_heads_are_logged_warned_about_and_unsupported_attention_is_named(tmp_path):
    memory, tb = MemoryLogger(), TensorBoardLogger(tmp_path, name="tb")
    diagnostics = AttentionDiagnostics(num_images=0, summary=False)
    trainer = make_trainer(tmp_path, [diagnostics], max_steps=2, logger=[memory, tb],
                           log_every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(SharpViT())
    block = "vit.blocks.0.attn"
    assert diagnostics.block_names == [] and block in diagnostics.last_stats.blocks
    heads: HeadStats = diagnostics.last_stats.blocks[block].heads
    assert heads.num_heads == 3 and heads.max_logit > 100
    # the scalars: the declared summaries, five per module whatever the number of heads
    (step, logged), *_ = memory.attn()[-1:]
    tagged = {q.tag for q in quantities(HeadStats) if q.tag is not None}
    assert {t.rsplit("/", 1)[1] for t in logged if f"/{block}/heads/" in t} == tagged
    assert logged[f"attn/{block}/heads/max_logit"] == pytest.approx(heads.max_logit)
    assert logged[f"attn/{block}/heads/entropy_min"] == pytest.approx(min(heads.head_entropy))
    # the per-head values: one JSON record per point
    events = EventAccumulator(tb.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    record = json.loads(events.Tensors("attn/heads/text_summary")[-1].tensor_proto
                        .string_val[0].decode())
    assert record[block]["head_max_logit"] == pytest.approx(list(heads.head_max_logit))
    messages = [(w.category, str(w.message)) for w in caught]
    growth = [m for c, m in messages if c is LogitGrowthWarning]
    assert len(growth) == 1 and block in growth[0] and "QKClip" in growth[0]
    unsupported = [m for c, m in messages if c is UnsupportedAttentionWarning]
    assert len(unsupported) == 1 and "TalkingHeadAttn ('talking')" in unsupported[0]
    assert "talking heads" in unsupported[0]
    # the offline report reads the heads' scalars back and judges them as the callback did
    from lightning_attn.report import write_report

    files = write_report({"vit": tb.log_dir}, tmp_path / "report")
    (run,) = files.report.runs
    verdict = run.health.verdicts[block]
    assert verdict.status == "problem" and "logit_growth" in verdict.kinds


class ValidatedViT(LightningModule):
    """A two-block ViT (4x4 patches of 16x16 images and a class token), trained at lr 0 (the
    weights stay: the logged images can be made again offline) and validated."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.vit = sharpen(timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4,
                                             depth=2, num_classes=3), 8.0)
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.rand(8, 3, 16, 16, generator=g),
                                  torch.randint(0, 3, (8,), generator=g))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.vit(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.vit(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=4)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=4)


def _logged_image(events: EventAccumulator, tag: str) -> list[tuple[int, torch.Tensor]]:
    from PIL import Image

    out = []
    for event in events.Images(tag):
        with Image.open(io.BytesIO(event.encoded_image_string)) as image:
            pixels = torch.tensor(list(image.convert("RGB").getdata()), dtype=torch.float32)
        out.append((event.step, pixels.T.reshape(3, image.height, image.width) / 255.0))
    return out


def test_heads_heatmaps_at_the_histogram_points_and_class_token_maps_over_the_images(tmp_path):
    """The layer x head heatmaps are images at the points that write histograms (drawn from
    that point's per-head record); validation's attention-map grid lays each block's class
    token attention over the images, as the CNN blocks' masks are; the report shows both."""
    from lightning_attn.callbacks.maps import head_heatmaps, render_maps, token_map
    from lightning_attn.report import write_report

    from ..blocks.head_oracle import captured_sdpa

    tb = TensorBoardLogger(tmp_path, name="tb")
    model = ValidatedViT()
    diagnostics = AttentionDiagnostics(summary=False, num_images=3, histogram_every_n_steps=2,
                                       on_problem="ignore")
    make_trainer(tmp_path, [diagnostics], max_steps=4, logger=tb, log_every_n_steps=1,
                 limit_val_batches=1).fit(model)
    events = EventAccumulator(tb.log_dir, size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    records = {e.step: json.loads(e.tensor_proto.string_val[0].decode())
               for e in events.Tensors("attn/heads/text_summary")}
    heatmaps = _logged_image(events, "attn/heads_map")
    assert [step for step, _ in heatmaps] == [1, 3] and sorted(records) == [0, 1, 2, 3]
    for step, image in heatmaps:
        blocks = records[step]
        want = head_heatmaps(list(blocks), [b["head_entropy"] for b in blocks.values()],
                             [b["head_max_logit"] for b in blocks.values()])
        assert image.shape == want.shape and (image - want).abs().max() <= 1 / 255 + 1e-6
    # validation's grid: the input, then each block's class token over its 4 x 4 patches
    images = model.data.tensors[0][:3]
    with torch.no_grad(), captured_sdpa() as calls:
        model.vit(images)
    maps = {}
    for name, call in zip(("vit.blocks.0.attn", "vit.blocks.1.attn"), calls, strict=True):
        q, k = call["q"][:, :, :1], call["k"]
        first = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1).mean(dim=(1, 2))
        maps[name] = token_map(first, (16, 16))
    assert maps["vit.blocks.0.attn"].shape == (3, 1, 4, 4)
    (step, grid), *_ = _logged_image(events, "val/attn/maps")[-1:]
    want = render_maps(images, maps, diagnostics.overlay_alpha)
    assert grid.shape == want.shape and (grid - want).abs().max() <= 1 / 255 + 1e-4
    files = write_report({"vit": tb.log_dir}, tmp_path / "report")
    (run,) = files.report.runs
    assert run.heads_map is not None and run.attention_map is not None
    assert "Attention heads" in files.html.read_text() and "at step 3" in run.heads_map.caption
