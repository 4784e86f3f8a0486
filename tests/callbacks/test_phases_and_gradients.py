"""Statistics exact in every Lightning set-up: phases never mix, a non-finite gradient is a
finding, and each gradient norm is read at the step of the optimizer that owns it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from torch.utils.data import DataLoader

from lightning_attn.callbacks import AttentionDiagnostics
from lightning_attn.core import NonFiniteWarning

from .cb_models import FakeNet, MemoryLogger, make_data, make_trainer


class ValNet(FakeNet):
    """FakeNet with a validation loop that counts its own forwards."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.val_data = make_data(16, seed=1)
        self.val_runs = 0

    def on_validation_epoch_start(self) -> None:
        self.val_runs += 1

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x), y))

    def val_dataloader(self):
        return DataLoader(self.val_data, batch_size=8)


class Points(Callback):
    """Keeps every training point the diagnostics finished (after them in the callback list)."""

    def __init__(self, diagnostics: AttentionDiagnostics) -> None:
        self.diagnostics = diagnostics
        self.points = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stats = self.diagnostics.last_stats
        if stats is not None and (not self.points or self.points[-1] is not stats):
            self.points.append(stats)


def test_validation_inside_an_accumulation_window_stays_out_of_training_points(tmp_path):
    cb = AttentionDiagnostics(log_every_n_steps=1, on_problem="ignore", num_images=0,
                              summary=False, histogram_every_n_steps=0)
    spy = Points(cb)
    logger = MemoryLogger()
    model = ValNet()
    trainer = make_trainer(
        tmp_path, [cb, spy], max_steps=2, logger=logger, accumulate_grad_batches=4,
        val_check_interval=2, limit_val_batches=2, num_sanity_val_steps=2,
    )
    trainer.fit(model)
    per_forward = 8 * 1 * 8 * 8  # batch 8 of (1, 8, 8) masks
    assert len(spy.points) == 2
    for stats in spy.points:  # each optimizer step: its 4 micro-batches, nothing else
        block = stats.blocks["block"]
        assert block.forwards == 4 and block.masks["mask"].count == 4 * per_forward
    # every validation run (not the sanity check) logged its own point
    val_points = logger.attn("val/attn/block/mask/mean", prefix="val/attn/")
    assert model.val_runs - 1 == 4 == len(val_points)


def test_trainer_validate_between_fits_and_sanity_checks_do_not_reach_training(tmp_path):
    cb = AttentionDiagnostics(log_every_n_steps=1, on_problem="ignore", num_images=0,
                              summary=False, histogram_every_n_steps=0)
    spy = Points(cb)
    model = ValNet()
    trainer = make_trainer(tmp_path, [cb, spy], max_steps=1, limit_val_batches=2,
                           num_sanity_val_steps=2)
    trainer.fit(model)
    trainer.validate(model, verbose=False)
    trainer.fit_loop.epoch_loop.max_steps = 2
    trainer.fit(model)
    assert [p.blocks["block"].forwards for p in spy.points] == [1, 1]


class SkippingSGD(torch.optim.SGD):
    """Skips a step whose gradients are not all finite, as a GradScaler does."""

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if all(torch.isfinite(g).all() for g in grads):
            super().step()
        return loss


class NaNGradient(FakeNet):
    """The gain's gradient turns NaN at one step; the optimizer skips that step."""

    def __init__(self, bad_step: int) -> None:
        super().__init__()
        self.bad_step = bad_step

    def on_after_backward(self) -> None:
        if self.trainer.global_step == self.bad_step:
            self.block.gain.grad.fill_(math.nan)

    def configure_optimizers(self):
        return SkippingSGD(self.parameters(), lr=0.01)


def test_a_nonfinite_gradient_is_logged_and_warned_with_block_parameter_and_step(tmp_path):
    cb = AttentionDiagnostics(log_every_n_steps=1, num_images=0, summary=False)
    logger = MemoryLogger()
    with pytest.warns(NonFiniteWarning) as record:
        make_trainer(tmp_path, [cb], max_steps=4, logger=logger).fit(NaNGradient(bad_step=2))
    norms = dict(logger.attn("attn/block/param/temperature_grad_norm"))
    assert sorted(norms) == [0, 1, 2, 3]  # a point at every step: no gap
    assert math.isnan(norms[2]["attn/block/param/temperature_grad_norm"])
    assert all(math.isfinite(norms[s]["attn/block/param/temperature_grad_norm"])
               for s in (0, 1, 3))
    (warning,) = [w for w in record if issubclass(w.category, NonFiniteWarning)]
    text = str(warning.message)
    assert "'block'" in text and "'temperature'" in text and "at step 2" in text


class TwoOptimizers(FakeNet):
    """Manual optimization: one optimizer owns the block's gain, the other the head. The
    head's backward runs after the gain's step and adds to the gain's gradient too."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.applied = []

    def configure_optimizers(self):
        return (torch.optim.SGD(self.block.parameters(), lr=0.01),
                torch.optim.SGD(self.head.parameters(), lr=0.01))

    def training_step(self, batch, batch_idx):
        opt_block, opt_head = self.optimizers()
        x, y = batch
        opt_block.zero_grad()
        opt_head.zero_grad()
        self.manual_backward(F.cross_entropy(self(x), y))
        self.applied.append(self.block.gain.grad.norm().item())  # what opt_block applies
        opt_block.step()
        self.manual_backward(F.cross_entropy(self(x), y))  # adds to the gain's gradient
        opt_head.step()


def test_gradient_norm_is_read_at_the_step_of_the_optimizer_that_owns_it(tmp_path):
    cb = AttentionDiagnostics(log_every_n_steps=1, num_images=0, summary=False,
                              on_problem="ignore")
    logger = MemoryLogger()
    model = TwoOptimizers()
    make_trainer(tmp_path, [cb], max_steps=6, logger=logger).fit(model)
    logged = [m["attn/block/param/temperature_grad_norm"]
              for _, m in logger.attn("attn/block/param/temperature_grad_norm")]
    assert len(logged) == len(model.applied) == 3
    assert logged == pytest.approx(model.applied, rel=1e-6)


def test_gradient_norm_with_accumulation_is_the_accumulated_gradient(tmp_path):
    class Keeps(FakeNet):
        applied = []

        def on_before_optimizer_step(self, optimizer) -> None:
            self.applied.append(self.block.gain.grad.norm().item())

    cb = AttentionDiagnostics(log_every_n_steps=1, num_images=0, summary=False,
                              on_problem="ignore")
    logger = MemoryLogger()
    model = Keeps()
    make_trainer(tmp_path, [cb], max_steps=2, logger=logger,
                 accumulate_grad_batches=2).fit(model)
    logged = [m["attn/block/param/temperature_grad_norm"]
              for _, m in logger.attn("attn/block/param/temperature_grad_norm")]
    assert logged == pytest.approx(model.applied, rel=1e-6) and len(logged) == 2
