"""AttentionClassifier(aux_loss=...): the router losses join the training loss, each term is
logged beside it, zero weights compute nothing, and the weights survive a checkpoint."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

import lightning_attn.modules.classifier as classifier_module
from lightning_attn.blocks import AuxLossWeights, attention_aux_terms
from lightning_attn.modules import AttentionClassifier

SMALL = {"stage_widths": (4, 8), "num_classes": 3}


def _data(n: int = 32) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(n, 1, 16, 16, generator=g), torch.arange(n) % 3)


def _trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    return pl.Trainer(**{**defaults, **kwargs})


def test_the_loss_is_cross_entropy_plus_the_weighted_terms() -> None:
    weights = {"balance": 0.01, "z_loss": 1e-3, "entropy": 0.1}
    model = AttentionClassifier(**SMALL, aux_loss=weights)
    assert model.aux_weights == {"balance": 0.01, "entropy": 0.1, "z_loss": 1e-3}
    x, y = _data(8).tensors
    torch.manual_seed(0)
    loss = model.training_step((x, y), 0)  # no Trainer: no logging, same loss
    logits = model(x)  # same weights, same input: the same forward again
    terms = attention_aux_terms(model.net, weights)
    want = F.cross_entropy(logits, y) + sum(w * terms[t] for t, w in weights.items())
    torch.testing.assert_close(loss, want)
    loss.backward()
    routers = [p for n, p in model.named_parameters() if ".router." in n]
    assert routers and all(p.grad is not None for p in routers)


def test_each_term_is_logged_beside_the_loss(tmp_path) -> None:
    pl.seed_everything(0)
    model = AttentionClassifier(**SMALL, aux_loss=AuxLossWeights(balance=0.01, z_loss=1e-3))
    trainer = _trainer(tmp_path, max_steps=6, log_every_n_steps=2,
                       logger=CSVLogger(tmp_path, name="csv", version=0))
    trainer.fit(model, DataLoader(_data(), batch_size=4))
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [1, 3, 5]  # Lightning's logging steps
    for row in rows:
        assert row["train/aux/balance"] and row["train/aux/z_loss"] and row["train/aux/loss"]
        assert "train/aux/entropy" not in row  # weight 0: neither computed nor logged
        aux = 0.01 * float(row["train/aux/balance"]) + 1e-3 * float(row["train/aux/z_loss"])
        assert float(row["train/aux/loss"]) == pytest.approx(aux, rel=1e-5)
        assert 1.0 <= float(row["train/aux/balance"]) <= 3.0  # K = 3 branches


def test_zero_weights_compute_nothing(tmp_path, monkeypatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("auxiliary terms computed with zero weights")

    monkeypatch.setattr(classifier_module, "attention_aux_terms", forbidden)
    model = AttentionClassifier(**SMALL, aux_loss={"balance": 0.0})
    assert model.aux_weights == {}
    _trainer(tmp_path, max_steps=2).fit(model, DataLoader(_data(), batch_size=8))


def test_weights_survive_a_checkpoint(tmp_path) -> None:
    model = AttentionClassifier(**SMALL, aux_loss={"importance": 0.5})
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(model, DataLoader(_data(), batch_size=8))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = AttentionClassifier.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True)
    assert loaded.aux_weights == {"importance": 0.5}
    assert loaded.hparams.aux_loss == {"importance": 0.5, "balance": 0.0, "entropy": 0.0,
                                       "z_loss": 0.0}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"attention": "coord", "aux_loss": {"balance": 0.01}}, ValueError,
         "attention='coord' has none"),
        ({"attention": "none", "aux_loss": {"z_loss": 0.01}}, ValueError, "has none"),
        ({"aux_loss": {"balance": -1}}, ValueError, "balance must be a finite number >= 0"),
        ({"aux_loss": {"gini": 1}}, TypeError, r"aux_loss has unknown keys \['gini'\]"),
        ({"aux_loss": 0.01}, TypeError, "aux_loss must be an AuxLossWeights or a dict"),
    ],
)
def test_bad_weights_name_the_problem(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        AttentionClassifier(**SMALL, **kwargs)
