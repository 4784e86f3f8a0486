"""The callbacks inside real (tiny) training runs: schedule, values, warnings, cleanup, resume."""

import warnings

import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_attn.callbacks import (
    AttentionDiagnostics,
    MaskHealthMonitor,
    ParameterTrajectoryMonitor,
    RouterEntropyMonitor,
)
from lightning_attn.core import (
    AttentionProblemError,
    AttentionWarning,
    DeadBranchWarning,
    HealthThresholds,
    MaskCollapseWarning,
    MaskSaturationWarning,
    NonFiniteWarning,
    ParameterDriftWarning,
    RouterCollapseWarning,
    RouterIndifferenceWarning,
)
from lightning_attn.core.accumulator import Accumulator

from .cb_models import (
    FakeBlock,
    FakeNet,
    MemoryLogger,
    PlainNet,
    TinyAttnNet,
    make_data,
    make_trainer,
    offline_stats,
)


def _attn_warnings(record):
    return [w for w in record if issubclass(w.category, AttentionWarning)]


def _diag(**kwargs):
    kwargs.setdefault("num_images", 0)
    kwargs.setdefault("summary", False)
    return AttentionDiagnostics(**kwargs)


# -- schedule ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("trainer_every", "own_every", "expected"), [(3, None, [2, 5, 8]), (3, 4, [3, 7])]
)
def test_points_follow_log_every_n_steps(tmp_path, trainer_every, own_every, expected):
    logger = MemoryLogger()
    cb = _diag(log_every_n_steps=own_every, on_problem="ignore", histogram_every_n_steps=0)
    trainer = make_trainer(
        tmp_path, [cb], max_steps=10, logger=logger, log_every_n_steps=trainer_every
    )
    trainer.fit(FakeNet())
    steps = [step for step, _ in logger.attn()]
    assert steps == expected  # Lightning's step numbers: optimizer steps taken before
    assert len(steps) == trainer.global_step // (own_every or trainer_every) == cb.num_points


def test_nothing_is_computed_when_interval_exceeds_run(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(Accumulator, "add", lambda *a, **k: calls.append(1))
    logger = MemoryLogger()
    cb = _diag(histogram_every_n_steps=100)
    model = FakeNet()
    make_trainer(tmp_path, [cb], max_steps=6, logger=logger, log_every_n_steps=50).fit(model)
    assert calls == []
    assert logger.attn() == [] and cb.last_stats is None
    assert set(model.recording_seen) == {False}


def test_validation_and_sanity_forwards_are_not_training_statistics(tmp_path):
    cb = _diag(log_every_n_steps=1, on_problem="ignore", num_images=2)
    trainer = make_trainer(
        tmp_path, [cb], max_steps=4, limit_val_batches=2, val_check_interval=2,
        num_sanity_val_steps=2,
    )
    trainer.fit(TinyAttnNet())
    stats = cb.last_stats.blocks["dsa"]
    assert stats.forwards == 1 and stats.masks["mask"].count == 8 * 8 * 8  # one batch, B*H*W


# -- values --------------------------------------------------------------------------------
def _check_against_offline(logger, seen, k, accumulate=1, blocks=None):
    """Every logged statistic equals the offline computation to 1e-12; ``blocks``: block
    name -> (branches, router scale), one FakeBlock ``block`` with ``k`` branches if None."""
    assert logger.attn()
    blocks = blocks or {"block": (k, 1.0)}
    for step, metrics in logger.attn():
        xs = torch.cat([x for s, x in seen if s == step])
        assert xs.shape[0] == 8 * accumulate
        for block, (branches, scale) in blocks.items():
            for name, value in offline_stats(xs, branches, scale).items():
                assert metrics[f"attn/{block}/{name}"] == pytest.approx(value, rel=1e-12,
                                                                       abs=1e-12), (block, name)


def test_logged_values_equal_offline_computation(tmp_path):
    logger = MemoryLogger()
    model = FakeNet(keep_batches=True, num_branches=4)
    trainer = make_trainer(tmp_path, [_diag()], max_steps=6, logger=logger, log_every_n_steps=2)
    trainer.fit(model)
    assert [s for s, _ in logger.attn()] == [1, 3, 5]
    _check_against_offline(logger, model.seen, k=4)
    last = logger.attn()[-1][1]
    # the value its forward used (before the step's update)
    assert last["attn/block/param/temperature"] == pytest.approx(dict(model.gains_used)[5])
    assert last["attn/block/param/temperature_grad_norm"] > 0


class _ManyBlocks(FakeNet):
    """Several FakeBlocks side by side on the same input, their branches and scales differing
    (the point's statistics come from one computation over all of them)."""

    SHAPES = {"blocks.0": (2, 1.0), "blocks.1": (3, 0.5), "blocks.2": (4, 2.0),
              "blocks.3": (3, 3.0), "blocks.4": (5, 1.5)}

    def __init__(self) -> None:
        super().__init__(keep_batches=True)
        self.blocks = torch.nn.ModuleList(FakeBlock(k, s) for k, s in self.SHAPES.values())
        del self.block
        self.block = self.blocks[0]  # what FakeNet's training step inspects

    def forward(self, x):
        return self.head(sum(block(x) for block in self.blocks).flatten(1))


def test_many_blocks_equal_offline_computation_to_1e_12(tmp_path):
    logger = MemoryLogger()
    model = _ManyBlocks()
    make_trainer(tmp_path, [_diag(on_problem="ignore")], max_steps=4, logger=logger,
                 log_every_n_steps=1, accumulate_grad_batches=2).fit(model)
    _check_against_offline(logger, model.seen, k=0, accumulate=2, blocks=model.SHAPES)


def test_gradient_accumulation_gives_one_point_per_optimizer_step(tmp_path):
    logger = MemoryLogger()
    model = FakeNet(keep_batches=True)
    trainer = make_trainer(
        tmp_path, [_diag()], max_steps=3, logger=logger, log_every_n_steps=1,
        accumulate_grad_batches=2,
    )
    trainer.fit(model)
    assert [s for s, _ in logger.attn()] == [0, 1, 2]
    _check_against_offline(logger, model.seen, k=3, accumulate=2)


def test_parameter_monitor_logs_every_parameter(tmp_path):
    logger = MemoryLogger()
    cb = ParameterTrajectoryMonitor(log_every_n_steps=1)
    make_trainer(tmp_path, [cb], max_steps=2, logger=logger).fit(TinyAttnNet(per_axis_alpha=True))
    tags = set(logger.attn()[-1][1])
    assert tags == {
        "attn/dsa/param/temperature", "attn/dsa/param/temperature_grad_norm",
        "attn/coord/param/alpha_h", "attn/coord/param/alpha_h_grad_norm",
        "attn/coord/param/alpha_w", "attn/coord/param/alpha_w_grad_norm",
        "attn/coord/param/beta",  # fixed: value only
    }


# -- warnings ------------------------------------------------------------------------------
def _constant(x):
    return torch.full_like(x, 0.5)


def _binary(x):
    return (x > 0.5).float()


def _dead_first_branch(x):
    x = x.clone()
    x[:, 0, 0, 0] = -30.0
    return x


def _one_hot_router(x):
    # sample i puts all its router logit on branch i % 3: every branch used, none mixed
    x = x.clone()
    x[:, 0, 0, :3] = 0.0
    x[torch.arange(len(x)), 0, 0, torch.arange(len(x)) % 3] = 1.0
    return x


def _nan_pixel(x):
    x = x.clone()
    x[:, 0, 3, 3] = float("nan")
    return x


@pytest.mark.parametrize(
    ("callback", "model_kwargs", "category"),
    [
        (MaskHealthMonitor, {"transform": _constant}, MaskCollapseWarning),
        (MaskHealthMonitor, {"transform": _binary}, MaskSaturationWarning),
        (MaskHealthMonitor, {"transform": _nan_pixel}, NonFiniteWarning),
        (
            RouterEntropyMonitor,
            {"router_scale": 200.0, "transform": _one_hot_router},
            RouterCollapseWarning,
        ),
        (RouterEntropyMonitor, {"transform": _dead_first_branch}, DeadBranchWarning),
        (
            lambda **kw: RouterEntropyMonitor(indifference_warmup_steps=2, **kw),
            {"router_scale": 0.0},
            RouterIndifferenceWarning,
        ),
        (ParameterTrajectoryMonitor, {"lr": 30.0}, ParameterDriftWarning),
    ],
)
def test_each_warning_fires_exactly_once(tmp_path, callback, model_kwargs, category):
    cb = callback(log_every_n_steps=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [cb], max_steps=4).fit(FakeNet(**model_kwargs))
    found = _attn_warnings(record)
    assert [w.category for w in found] == [category]
    assert "'block'" in str(found[0].message) and "Try:" in str(found[0].message)
    if category is RouterIndifferenceWarning:
        assert "at step 2" in str(found[0].message)  # not before the warm-up


def test_healthy_run_gives_no_warning(tmp_path):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [_diag(log_every_n_steps=1)], max_steps=4).fit(FakeNet())
    assert _attn_warnings(record) == []


def test_raise_stops_training_and_leaves_nothing_recording(tmp_path):
    model = FakeNet(transform=_constant)
    cb = MaskHealthMonitor(log_every_n_steps=2, on_problem="raise")
    with pytest.raises(AttentionProblemError, match="std_threshold"):
        make_trainer(tmp_path, [cb], max_steps=6).fit(model)
    assert not model.block.recording and model.block.accumulator is None


# -- cleanup -----------------------------------------------------------------------------
def test_nothing_recording_after_exception(tmp_path):
    model = TinyAttnNet(fail_at_step=2)
    cb = _diag(log_every_n_steps=1, on_problem="ignore")
    with pytest.raises(RuntimeError, match="planned failure"):
        make_trainer(tmp_path, [cb], max_steps=5).fit(model)
    for block in (model.dsa, model.coord):
        assert not block.recording and not block.capture
        assert block.accumulator is None
    assert not cb._collector.is_open


def test_one_callback_two_fits_and_two_callbacks_one_model(tmp_path):
    model = FakeNet(keep_batches=True)
    every_step = _diag(log_every_n_steps=1, on_problem="ignore")
    every_other = MaskHealthMonitor(log_every_n_steps=2)
    trainer = make_trainer(tmp_path, [every_step, every_other], max_steps=4)
    trainer.fit(model)
    assert model.recording_seen == [True] * 4 and not model.block.recording
    # Both read the same recording of their shared steps (the second does not see an
    # accumulator the first one emptied).
    last = torch.cat([x for s, x in model.seen if s == 3])
    want = offline_stats(last, 3)["mask/std"]
    assert every_step.last_stats.blocks["block"].masks["mask"].std == pytest.approx(want, 1e-5)
    assert every_other.last_stats.blocks["block"].masks["mask"].std == pytest.approx(want, 1e-5)
    model.recording_seen.clear()
    make_trainer(tmp_path, [MaskHealthMonitor(log_every_n_steps=3)], max_steps=6).fit(model)
    assert model.recording_seen == [False, False, True] * 2


def test_skipped_batch_leaves_nothing_recording(tmp_path):
    class Skips(FakeNet):
        def on_train_batch_start(self, batch, batch_idx):
            return -1 if batch_idx == 1 else None

    model = Skips()
    cb = _diag(log_every_n_steps=1)
    make_trainer(tmp_path, [cb], max_steps=3, max_epochs=1).fit(model)
    assert not model.block.recording and not cb._collector.is_open


# -- resume -----------------------------------------------------------------------------
def test_resume_continues_curves_without_duplicate_warning(tmp_path):
    ckpt = tmp_path / "run1.ckpt"
    first = MemoryLogger()
    cb1 = _diag()
    with pytest.warns(MaskCollapseWarning):
        trainer = make_trainer(tmp_path, [cb1], max_steps=4, logger=first, log_every_n_steps=2)
        trainer.fit(FakeNet(transform=_constant))
    trainer.save_checkpoint(ckpt)
    second = MemoryLogger()
    # a threshold changed: the state must still load
    cb2 = _diag(thresholds=HealthThresholds(std_threshold=0.05))
    assert cb2.state_key == cb1.state_key
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [cb2], max_steps=8, logger=second, log_every_n_steps=2).fit(
            FakeNet(transform=_constant), ckpt_path=ckpt
        )
    assert [s for s, _ in first.attn()] == [1, 3]
    assert [s for s, _ in second.attn()] == [5, 7]
    assert _attn_warnings(record) == []
    assert cb2.num_points == 4
    assert cb2._reporter.reported == {"block|mask_collapse": 1}


# -- no blocks, no loggers ----------------------------------------------------------------
def test_module_without_attention_block_warns_once(tmp_path):
    with pytest.warns(UserWarning, match="no attention block") as record:
        make_trainer(tmp_path, [_diag()], max_steps=2).fit(PlainNet())
    assert len([w for w in record if "no attention block" in str(w.message)]) == 1


def test_no_logger_still_warns_and_prints_summary(tmp_path, capsys):
    cb = AttentionDiagnostics(log_every_n_steps=1, num_images=0)
    data = TensorDataset(*make_data(16).tensors)
    with pytest.warns(MaskCollapseWarning):
        make_trainer(tmp_path, [cb], max_steps=2, logger=False).fit(
            FakeNet(data=data, transform=_constant)
        )
    out = capsys.readouterr().out
    assert "Attention summary" in out and "block" in out and "collapse!" in out
