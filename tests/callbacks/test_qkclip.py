"""QKClip in a Trainer: after each optimizer step the heads whose max logit passed the threshold
are rescaled onto it (the others, and the optimizer's state, untouched), the clip counts and
steps are saved and resumed, a compiled model runs its one graph with no break and no
recompile, and what it cannot clip is refused with the reason."""

from __future__ import annotations

import copy
import warnings
from functools import partial

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_attn.blocks.discovery import find_attention_blocks
from lightning_attn.callbacks import CLIPPED_HEADS_TAG, AttentionDiagnostics, QKClip
from lightning_attn.core import LogitGrowthWarning
from lightning_attn.data import ClutteredDigitsDataModule
from lightning_attn.modules import AttentionClassifier

from ..blocks.head_oracle import sharpen
from .cb_models import MemoryLogger, make_trainer

timm = pytest.importorskip("timm")

_G = torch.Generator().manual_seed(0)
_BATCH = (torch.randn(4, 3, 32, 32, generator=_G), torch.randint(0, 3, (4,), generator=_G))


class SharpViT(LightningModule):
    """A one-block ViT whose query and key weights are scaled up (logits in the hundreds),
    trained on one repeated batch."""

    def __init__(self, lr: float = 0.0, qk_norm: bool = False, compile_backend=None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.vit = sharpen(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
                                             depth=1, num_classes=3, qk_norm=qk_norm), 60.0)
        self.lr = lr
        self.forward_fn = self.vit if compile_backend is None else torch.compile(
            self.vit, backend=compile_backend, fullgraph=True)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.forward_fn(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(TensorDataset(*_BATCH), batch_size=4)


def max_logits(model: SharpViT) -> torch.Tensor:
    """The heads' max logits of the batch, as the model's weights are now."""
    (block,) = find_attention_blocks(model, third_party=True)[0].values()
    try:
        block.track_max_logits("test")
        with torch.no_grad():
            model.vit(_BATCH[0])
        return block.tracked_max_logits.clone()
    finally:
        block.clear_recording()


class OptimizerState(Callback):
    """The optimizer's state right after its step (before QKClip, which comes after it)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.state = copy.deepcopy(trainer.optimizers[0].state_dict())


def test_heads_over_the_threshold_are_clipped_onto_it_after_the_step(tmp_path):
    model = SharpViT()
    before = max_logits(model)
    threshold = float(before.median())
    over = before > threshold
    assert over.any() and not over.all()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    memory, state = MemoryLogger(), OptimizerState()
    clip = QKClip(threshold=threshold)
    trainer = make_trainer(tmp_path, [state, clip], max_steps=1, logger=memory,
                           log_every_n_steps=1)
    trainer.fit(model)  # lr 0: only the clip moves the weights
    after = max_logits(model)
    assert torch.allclose(after[over].double(), torch.tensor(threshold).double(), rtol=1e-5)
    assert torch.equal(after[~over], before[~over])
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, weights[n])}
    assert moved == {"vit.blocks.0.attn.qkv.weight", "vit.blocks.0.attn.qkv.bias"} - {
        n for n in ("vit.blocks.0.attn.qkv.bias",) if not weights[n].any()}
    assert clip.block_names == ["vit.blocks.0.attn"] and clip.steps == 1
    assert clip.clip_counts == {"vit.blocks.0.attn": over.long().tolist()}
    # the optimizer's state (Adam's moments) is what its step left
    torch.testing.assert_close(trainer.optimizers[0].state_dict(), state.state, rtol=0, atol=0)
    logged = [m for _, m in memory.records if CLIPPED_HEADS_TAG in m]
    assert [m[CLIPPED_HEADS_TAG] for m in logged] == [float(over.sum())]
    # released at the end: no hook, no tracking left on the model
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_clip_counts_and_steps_resume_from_a_checkpoint(tmp_path):
    model = SharpViT(lr=1e-3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = QKClip(threshold=50.0)
    make_trainer(tmp_path, [first, checkpoint], max_steps=2, enable_checkpointing=True).fit(model)
    counts = first.clip_counts["vit.blocks.0.attn"]
    assert first.steps == 2 and sum(counts) > 0
    assert first.state_dict() == {"threshold": 50.0, "steps": 2,
                                  "clips": {"vit.blocks.0.attn": counts}}
    resumed = QKClip(threshold=40.0)
    trainer = make_trainer(tmp_path, [resumed], max_steps=3)
    with pytest.warns(UserWarning, match="clipped at threshold=50.0; this run clips at 40"):
        trainer.fit(SharpViT(lr=1e-3), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    now = resumed.clip_counts["vit.blocks.0.attn"]
    assert resumed.steps == 3
    assert all(b - a in (0, 1) for a, b in zip(counts, now, strict=True)) and now != counts


def test_a_compiled_model_clips_with_one_graph_and_no_recompile(tmp_path):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    model = SharpViT(compile_backend=counter)  # lr 0: only the clip moves the weights
    clip = QKClip(threshold=50.0)
    make_trainer(tmp_path, [clip], max_steps=3).fit(model)
    assert clip.steps == 3 and sum(clip.clip_counts["vit.blocks.0.attn"]) >= 2
    assert counter.frame_count == 1  # the tracking is in the graph, the rescale outside it
    assert torch._dynamo.utils.counters["graph_break"] == {}
    assert max_logits(model).max() <= 50.0 * (1 + 1e-5)


def test_arguments_are_checked_and_what_cannot_be_clipped_is_said():
    for bad, match in ((0.0, "threshold must be a finite number > 0, got 0.0"),
                       (float("nan"), "threshold must be a finite number > 0, got nan"),
                       ("100", "threshold must be a number, got '100'")):
        with pytest.raises((TypeError, ValueError), match=match):
            QKClip(threshold=bad)
    with pytest.raises(ValueError, match="include must be a sequence of non-empty fnmatch"):
        QKClip(include=[""])
    normalised = SharpViT(qk_norm=True)
    with pytest.raises(ValueError, match=r"no attention module whose query and key weights .*"
                                         r"normalises its queries and keys \(q_norm: qk_norm"):
        QKClip().on_fit_start(None, normalised)
    assert all(not m._forward_hooks for m in normalised.modules())  # its hooks were removed
    clip = QKClip(exclude=["*.attn"])
    with pytest.raises(ValueError, match=r"found no attention module .* and exclude=\['\*.attn'\]"):
        clip.on_fit_start(None, SharpViT())
    with pytest.raises(ValueError, match="clips is 3, not module -> counts per head"):
        QKClip().load_state_dict({"threshold": 100.0, "steps": 1, "clips": 3})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        QKClip().load_state_dict({"threshold": 100.0, "steps": 1, "clips": {"a": [0, 1]}})


class PointMaxima(Callback):
    """The largest head logit of each diagnostics point (after the diagnostics in the list)."""

    def __init__(self, diagnostics: AttentionDiagnostics) -> None:
        self.diagnostics, self.max_logits = diagnostics, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        blocks = self.diagnostics.last_stats.blocks.values()
        self.max_logits.append(max(b.heads.max_logit for b in blocks if b.heads is not None))


@pytest.mark.parametrize("remedy", [None, "QKClip", "qk_norm"])
def test_a_too_high_learning_rate_grows_the_logits_warned_and_each_remedy_prevents_it(
        tmp_path, remedy):
    """The planted failure of benchmarks/accuracy.py at small scale: a one-block ViT on
    cluttered digits at lr 0.1: its logits pass the diagnostics' threshold within a few steps
    (warned); clipped at half the threshold they stay below it (a step adds less than the
    clip leaves), and with qk_norm they stay near their start."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32,
                            depth=1, num_heads=2, mlp_ratio=2.0, qk_norm=remedy == "qk_norm")
    model = AttentionClassifier(backbone=vit, optimizer=partial(torch.optim.AdamW, lr=0.1))
    data = ClutteredDigitsDataModule(canvas_size=16, digit_size=(10, 14), num_clutter=2,
                                     clutter_size=(3, 4), num_train=256, num_val=16,
                                     num_test=16, batch_size=32)
    diagnostics = AttentionDiagnostics(summary=False, num_images=0)
    points = PointMaxima(diagnostics)
    threshold = diagnostics.thresholds.max_logit_threshold
    clip = [QKClip(threshold=threshold / 2)] if remedy == "QKClip" else []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [diagnostics, points, *clip], max_steps=40,
                     log_every_n_steps=1).fit(model, data)
    warned = {type(w.message) for w in caught}
    assert len(points.max_logits) == 40
    if remedy is None:
        assert max(points.max_logits) > 1.5 * threshold
        assert LogitGrowthWarning in warned
    else:
        assert max(points.max_logits) < threshold
        assert LogitGrowthWarning not in warned
    if remedy == "QKClip":
        assert sum(clip[0].clip_counts["net.blocks.0.attn"]) > 10  # it had growth to stop
