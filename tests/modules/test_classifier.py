"""AttentionClassifier: training, checkpoints, validation localisation, argument checks."""

from __future__ import annotations

import logging
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_attn.blocks import find_attention_blocks
from lightning_attn.modules import AttentionClassifier, AttentionCNN, OutputOnly

from .surgery_models import Gate

S = 16  # image side
SMALL = {"stage_widths": (4, 8), "num_classes": 3}
COORD_KW = {"reduction": 2, "min_mid_channels": 2}


def _data(n: int = 32, seed: int = 0) -> TensorDataset:
    """Images with a bright square whose position encodes the label; boxes around it."""
    g = torch.Generator().manual_seed(seed)
    x = 0.1 * torch.rand(n, 1, S, S, generator=g)
    y = torch.arange(n) % 3
    boxes = torch.zeros(n, 4)
    for i in range(n):
        c = 2 + 5 * int(y[i])
        x[i, 0, c : c + 4, c : c + 4] += 1.0
        boxes[i] = torch.tensor([c, c, c + 4, c + 4])
    return TensorDataset(x, y, boxes)


def _trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def _model(attention: str = "dsa", **kwargs) -> AttentionClassifier:
    kw = COORD_KW if attention == "coord" else None
    return AttentionClassifier(attention=attention, attention_kwargs=kw, **{**SMALL, **kwargs})


class _LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("attention", ["dsa", "coord", "none"])
def test_loss_falls(attention: str) -> None:
    pl.seed_everything(0)
    model = _model(attention, optimizer=partial(torch.optim.Adam, lr=0.02))
    rec = _LossRecorder()
    loader = DataLoader(_data(), batch_size=32)
    _trainer(max_steps=16, callbacks=[rec]).fit(model, loader)
    assert len(rec.losses) == 16
    assert sum(rec.losses[-3:]) / 3 < 0.8 * sum(rec.losses[:3]) / 3, rec.losses


@pytest.mark.parametrize(
    ("attention", "kwargs"),
    [
        ("dsa", {"kernels": (3, 5), "learnable_temperature": True}),
        ("coord", {**COORD_KW, "learnable_alpha": True, "beta": 0.5, "pool": "mean_max"}),
    ],
)
def test_checkpoint_reloads_identical_model(tmp_path, attention: str, kwargs: dict) -> None:
    pl.seed_everything(0)
    model = AttentionClassifier(attention=attention, attention_kwargs=kwargs, depth=2, **SMALL)
    trainer = _trainer(max_steps=3, default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(_data(), batch_size=16))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    loaded = AttentionClassifier.load_from_checkpoint(path)  # torch.load(weights_only=True)
    assert dict(loaded.hparams) == dict(model.hparams)
    x = _data(8, seed=1).tensors[0]
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_validation_logs_localisation_per_block_and_detaches() -> None:
    pl.seed_everything(0)
    for attention, expect_loc in [("dsa", True), ("coord", True), ("none", False)]:
        model = _model(attention)
        trainer = _trainer()
        trainer.validate(model, DataLoader(_data(), batch_size=16), verbose=False)
        loc = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/loc/")}
        assert "val/acc" in trainer.callback_metrics
        if expect_loc:
            assert sorted(loc) == [f"val/loc/net.features.attn{i}.block" for i in (1, 2)]
            assert all(torch.isfinite(v) and v >= 0 for v in loc.values())
        else:
            assert loc == {}
        for block in find_attention_blocks(model)[0].values():
            assert not block.capture  # released after each step


def test_no_mask_collection_during_training() -> None:
    model = _model("dsa")
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            seen.append(any(b.capture for b in find_attention_blocks(pl_module)[0].values()))

    loader = DataLoader(_data(), batch_size=16)
    _trainer(max_steps=2, callbacks=[Spy()], limit_val_batches=1).fit(model, loader, loader)
    assert seen == [False, False]


def test_capture_released_when_validation_raises() -> None:
    model = _model("dsa")

    class Boom(pl.Callback):
        def on_validation_batch_end(self, *args, **kwargs) -> None:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _trainer(callbacks=[Boom()]).validate(model, DataLoader(_data(8), batch_size=4))
    assert not any(b.capture for b in find_attention_blocks(model)[0].values())


def test_test_step_logs_accuracy_and_localisation(caplog, capsys) -> None:
    model = _model("dsa")
    trainer = _trainer(max_steps=1)
    with caplog.at_level(logging.INFO):
        trainer.fit(model, DataLoader(_data(), batch_size=16))
        (res,) = trainer.test(model, DataLoader(_data(), batch_size=16), verbose=False)
    assert {"test/acc", "test/loss", "test/loc/net.features.attn1.block"} <= set(res)
    # The module brings no callback of its own, so testing after fitting with the same
    # Trainer prints no "callbacks returned in configure_callbacks will override" message.
    captured = capsys.readouterr()  # Lightning's own handler may print to stderr instead
    printed = captured.out + captured.err + " ".join(r.getMessage() for r in caplog.records)
    assert "configure_callbacks" not in printed


def test_predict_returns_probabilities() -> None:
    model = _model("coord")
    out = _trainer().predict(model, DataLoader(_data(8), batch_size=4))
    probs = torch.cat(out)
    assert probs.shape == (8, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(8))


def test_optimizer_and_scheduler_injection() -> None:
    model = _model(
        optimizer=partial(torch.optim.SGD, lr=0.5, momentum=0.9),
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=3),
    )
    conf = model.configure_optimizers()
    assert isinstance(conf["optimizer"], torch.optim.SGD)
    assert conf["optimizer"].param_groups[0]["lr"] == 0.5
    assert isinstance(conf["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)

    plateau = _model(lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert plateau.configure_optimizers()["lr_scheduler"]["monitor"] == "val/loss"
    assert isinstance(_model().configure_optimizers(), torch.optim.AdamW)


@pytest.mark.parametrize(
    ("batch", "error", "match"),
    [
        ((torch.rand(4, 3, S, S), torch.zeros(4, dtype=torch.long)), ValueError,
         r"shape \(B, 1, H, W\).*\(4, 3, 16, 16\)"),
        ((torch.rand(4, S, S), torch.zeros(4, dtype=torch.long)), ValueError, r"\(4, 16, 16\)"),
        ((torch.zeros(4, 1, S, S, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)),
         TypeError, "torch.uint8"),
        ((torch.rand(4, 1, S, S), torch.zeros(4)), ValueError, "int64.*torch.float32"),
        ((torch.rand(4, 1, S, S), torch.zeros(4, 1, dtype=torch.long)), ValueError,
         r"\(4,\).*\(4, 1\)"),
        ((torch.rand(4, 1, S, S), torch.zeros(4, dtype=torch.long), torch.zeros(4, 2)),
         ValueError, r"boxes.*\(4, 4\).*\(4, 2\)"),
        ((torch.rand(4, 1, S, S),), TypeError, "length 1"),
        ((torch.rand(4, 1, 1, 1), torch.zeros(4, dtype=torch.long)), ValueError, "at least 2x2"),
    ],
)
def test_bad_batch_raises(batch, error, match) -> None:
    with pytest.raises(error, match=match):
        _model().training_step(batch, 0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"stage_widths": (8, -4)}, ValueError, r"stage_widths\[1\].*-4"),
        ({"stage_widths": ()}, ValueError, "at least one stage"),
        ({"depth": 0}, ValueError, "depth.*0"),
        ({"num_classes": 1}, ValueError, "num_classes.*1"),
        ({"in_channels": -1}, ValueError, "in_channels.*-1"),
        ({"dropout": 1.5}, ValueError, "dropout.*1.5"),
        ({"activation": "tanh"}, ValueError, "activation.*tanh"),
        ({"downsample": "fft"}, ValueError, "downsample.*fft"),
        ({"attention": "se"}, ValueError, r"'se'.*\['coord', 'dsa', 'none'\]"),
        ({"attention_kwargs": {"kernelz": 3}}, TypeError, "kernelz"),
        ({"attention": "coord", "attention_kwargs": {"head_groups": 3}}, ValueError, "head_groups"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        AttentionClassifier(**kwargs)


def test_output_only_in_sequential_and_network_layout() -> None:
    from lightning_attn.blocks import DynamicSpatialAttention

    seq = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), OutputOnly(DynamicSpatialAttention()))
    assert seq(torch.rand(2, 1, 8, 8)).shape == (2, 4, 8, 8)

    net = AttentionCNN(stage_widths=(4, 8, 8), depth=2, downsample="stride", attention="coord",
                       attention_kwargs=COORD_KW)
    assert net(torch.rand(2, 1, 16, 16)).shape == (2, 10)
    assert list(find_attention_blocks(net)[0]) == [f"features.attn{i}.block" for i in (1, 2, 3)]



def test_blocks_of_ones_own_for_one_model(tmp_path) -> None:
    model = AttentionClassifier(attention="gate", attention_factories={"gate": Gate}, **SMALL)
    gates = [m.block for m in model.net.features if isinstance(m, OutputOnly)]
    assert [type(g) for g in gates] == [Gate, Gate] and [g.channels for g in gates] == [4, 8]
    assert "attention_factories" not in model.hparams  # code, not a hyperparameter
    path = tmp_path / "gate.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": pl.__version__}, path)
    loaded = AttentionClassifier.load_from_checkpoint(path, attention_factories={"gate": Gate})
    assert isinstance(loaded.net.features.attn1.block, Gate)
    with pytest.raises(ValueError, match=r"unknown attention 'gate'; known names: \['coord'"):
        AttentionClassifier(attention="gate", **SMALL)  # nothing was registered
    with pytest.raises(ValueError, match="attention_factories name blocks for the built-in"):
        AttentionClassifier(backbone=nn.Linear(4, 3), num_classes=3,
                            attention_factories={"gate": Gate})
