"""The statistics behave like Lightning metrics: monitorable, on the module's steps, no repeats."""

import csv

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_attn.callbacks import AttentionDiagnostics
from lightning_attn.core import MaskCollapseWarning

from .cb_models import FakeNet, MemoryLogger, make_trainer

TAG = "attn/block/mask/std"


def _diag(**kwargs):
    kwargs.setdefault("num_images", 0)
    kwargs.setdefault("summary", False)
    return AttentionDiagnostics(**kwargs)


def test_values_reach_callback_metrics_for_early_stopping_and_checkpoints(tmp_path):
    stop = EarlyStopping(monitor=TAG, mode="max", stopping_threshold=0.01,
                         check_on_train_epoch_end=True)
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor=TAG, mode="max",
                           filename="{step}-{attn/block/mask/std:.3f}")
    trainer = make_trainer(tmp_path, [_diag(), stop, best], max_steps=40, max_epochs=10,
                           log_every_n_steps=2, enable_checkpointing=True)
    trainer.fit(FakeNet())
    assert TAG in trainer.callback_metrics
    assert isinstance(trainer.callback_metrics[TAG], torch.Tensor)
    assert trainer.current_epoch == 1 and trainer.global_step == 4  # stopped after epoch 0
    assert best.best_model_score == pytest.approx(float(trainer.callback_metrics[TAG]), rel=0.2)
    assert best.best_model_path.endswith(".ckpt")


class _PlateauNet(FakeNet):
    """A ReduceLROnPlateau that monitors a diagnostics tag."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {
            "scheduler": plateau, "monitor": "attn/block/router/entropy", "interval": "step"}}


def test_callback_metrics_hold_the_monitored_statistics(tmp_path):
    stop = EarlyStopping(monitor=TAG, mode="max", check_on_train_epoch_end=True)
    logger = MemoryLogger()
    trainer = make_trainer(tmp_path, [_diag(), stop], max_steps=4, log_every_n_steps=1,
                           logger=logger)
    trainer.fit(_PlateauNet())
    published = {k for k in trainer.callback_metrics if k.startswith("attn/")}
    assert published == {TAG, "attn/block/router/entropy"}  # the callback's, the scheduler's
    (step, last), = logger.attn()[-1:]
    assert {k: float(trainer.callback_metrics[k]) for k in published} == {
        k: last[k] for k in published}
    assert len(last) > 10  # every statistic went to the logger


def test_statistics_land_on_the_modules_steps(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(tmp_path, [_diag()], max_steps=6, logger=logger, log_every_n_steps=3)
    trainer.fit(FakeNet())
    with open(logger.log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    module = [int(r["step"]) for r in rows if r["train/loss"]]
    ours = [int(r["step"]) for r in rows if r[TAG]]
    assert module == ours == [2, 5]  # the same step numbers, each once
    assert all(r["epoch"] in ("0", "1") for r in rows)  # no empty epoch


class ManualAccumulation(FakeNet):
    """Manual optimization, stepping the optimizer every second batch."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.manual_backward(loss)
        if batch_idx % 2 == 1:
            self.optimizers().step()
            self.optimizers().zero_grad()
        self.log("train/loss", loss)


def test_manual_optimization_never_repeats_a_step(tmp_path):
    logger = MemoryLogger()
    cb = _diag()
    make_trainer(tmp_path, [cb], max_steps=4, max_epochs=1, logger=logger,
                 log_every_n_steps=1).fit(ManualAccumulation())
    steps = [s for s, _ in logger.attn()]
    assert steps == [0, 1, 2, 3] and cb.num_points == 4
    assert [s for s, m in logger.records if "train/loss" in m] == steps  # the module's too


def test_own_interval_writes_at_lightnings_step_numbers_and_stays_monitorable(tmp_path):
    logger = MemoryLogger()
    stop = EarlyStopping(monitor=TAG, mode="max", check_on_train_epoch_end=True)
    trainer = make_trainer(tmp_path, [_diag(log_every_n_steps=4), stop], max_steps=8,
                           logger=logger, log_every_n_steps=3)
    trainer.fit(FakeNet())
    assert [s for s, _ in logger.attn()] == [3, 7]
    module_steps = [s for s, m in logger.records if "train/loss" in m]
    assert module_steps == [2, 5]  # the module keeps its own cadence, no stale attn values
    assert not any(TAG in m for s, m in logger.records if s in module_steps)
    assert TAG in trainer.callback_metrics


def test_stop_ends_training_at_the_first_problem(tmp_path):
    cb = _diag(on_problem="stop")
    trainer = make_trainer(tmp_path, [cb], max_steps=20, log_every_n_steps=2)
    with pytest.warns(MaskCollapseWarning):
        trainer.fit(FakeNet(transform=lambda x: torch.full_like(x, 0.5)))
    assert trainer.should_stop and trainer.global_step == 2  # the first logging step
