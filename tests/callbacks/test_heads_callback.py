"""AttentionDiagnostics on a timm ViT: the heads' summaries are logged as scalars, the per-head
values as one JSON record per point, logit growth and entropy collapse are warned about with
their remedy, and attention it cannot measure is named at the start."""

from __future__ import annotations

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
