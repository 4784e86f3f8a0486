"""TemperatureSchedule: the values at given steps and epochs, fixed and learnable
temperatures, the hand-off, the diagnostics' trajectories, resume, torch.compile without
recompiles, DDP (2 gloo processes) and the errors."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from lightning_attn.blocks import CoordinateAttention, DynamicSpatialAttention
from lightning_attn.callbacks import AttentionDiagnostics, TemperatureSchedule

from .cb_models import make_data

SCRIPT = Path(__file__).with_name("temperature_ddp_script.py")


class TwoDSA(LightningModule):
    """stem -> DSA ``a`` -> DSA ``b`` -> head; records the temperature each forward used."""

    def __init__(self, learnable: bool = True, compiled: bool = False, lr: float = 0.5,
                 eps: float = 1e-6, n: int = 32, batch_size: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        kw = {"learnable_temperature": learnable, "eps": eps, "return_mask": False}
        self.a = DynamicSpatialAttention(kernels=(3,), **kw)
        self.b = DynamicSpatialAttention(kernels=(3, 5), use_dilated=False, **kw)
        self.head = nn.Linear(4, 3)
        self.lr, self.n, self.batch_size = lr, n, batch_size
        self.compiled = compiled
        if compiled:
            self.a_run = torch.compile(self.a, backend="aot_eager", fullgraph=True)
            self.b_run = torch.compile(self.b, backend="aot_eager", fullgraph=True)
        self.seen: list[tuple[int, float, float]] = []  # (global_step, T of a, T of b)
        self.graphs: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a_run if self.compiled else self.a
        b = self.b_run if self.compiled else self.b
        h = b(a(F.relu(self.stem(x))))
        return self.head(h.mean(dim=(2, 3)))

    def training_step(self, batch, batch_idx):
        self.seen.append((self.global_step, self.a.temperature.item(), self.b.temperature.item()))
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.compiled:
            self.graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        return loss

    def validation_step(self, batch, batch_idx):
        self.seen.append((-1, self.a.temperature.item(), self.b.temperature.item()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(make_data(self.n), batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(make_data(8, seed=1), batch_size=8)


class GradProbe(Callback):
    """Whether the temperature reached the optimizer with a gradient, per step."""

    def __init__(self) -> None:
        self.has_grad: list[bool] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.has_grad.append(pl_module.a.trainable_attention_parameters()
                             .get("temperature", torch.zeros(())).grad is not None)


def _trainer(tmp_path, callbacks, **kwargs) -> Trainer:
    options = {
        "max_steps": 6, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False,
        "num_sanity_val_steps": 0, "limit_val_batches": 0, "default_root_dir": str(tmp_path),
    }
    return Trainer(callbacks=callbacks, **{**options, **kwargs})


def _train_values(model: TwoDSA) -> list[tuple[int, float, float]]:
    return [s for s in model.seen if s[0] >= 0]


# --------------------------------------------------------------------------------------
# The schedule itself
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "want"),
    [
        ("linear", [4.0, 3.25, 2.5, 1.75, 1.0, 1.0]),
        ("cosine", [4.0, 1 + 3 * (1 + math.cos(math.pi / 4)) / 2, 2.5,
                    1 + 3 * (1 + math.cos(3 * math.pi / 4)) / 2, 1.0, 1.0]),
        ("exponential", [4.0, 4 * 0.25**0.25, 2.0, 4 * 0.25**0.75, 1.0, 1.0]),
    ],
)
def test_values_at_given_counts(mode, want) -> None:
    schedule = TemperatureSchedule(start=4.0, end=1.0, duration=4, mode=mode)
    assert [schedule.value_at(n) for n in range(6)] == pytest.approx(want)
    rising = TemperatureSchedule(start=0.5, end=2.0, duration=2, mode=mode)
    assert rising.value_at(0) == pytest.approx(0.5) and rising.value_at(9) == pytest.approx(2.0)


@pytest.mark.parametrize("learnable", [False, True], ids=["fixed", "learnable"])
def test_each_forward_sees_the_value_of_its_step(tmp_path, learnable) -> None:
    model = TwoDSA(learnable=learnable)
    schedule = TemperatureSchedule(start=4.0, end=1.0, duration=4, interval="step",
                                   mode="linear")
    probe = GradProbe()
    _trainer(tmp_path, [schedule, probe]).fit(model)
    seen = _train_values(model)
    assert [s[0] for s in seen] == list(range(6))
    want = [4.0, 3.25, 2.5, 1.75, 1.0, 1.0]  # held at `end` after the duration ("fixed")
    assert [s[1] for s in seen] == pytest.approx(want, rel=1e-6)
    assert [s[2] for s in seen] == pytest.approx(want, rel=1e-6)
    assert schedule.block_names == [] and schedule.last_count == 5  # released after fit
    assert model.a.temperature.item() == pytest.approx(1.0, rel=1e-6)
    if learnable:  # held: its gradient never reaches the optimizer
        assert probe.has_grad == [False] * 6


def test_learnable_handoff_gives_the_temperature_to_the_optimizer(tmp_path) -> None:
    model = TwoDSA(learnable=True, lr=2.0)
    schedule = TemperatureSchedule(start=3.0, end=1.0, duration=2, interval="step",
                                   mode="linear", handoff="learnable")
    probe = GradProbe()
    _trainer(tmp_path, [schedule, probe]).fit(model)
    seen = _train_values(model)
    # Held through step `duration` (at `end`); step 3 starts from `end` and its optimizer
    # step is the first to move it.
    assert [s[1] for s in seen[:4]] == pytest.approx([3.0, 2.0, 1.0, 1.0], rel=1e-6)
    assert probe.has_grad == [False, False, False, True, True, True]
    assert seen[4][1] != pytest.approx(1.0, abs=1e-6)
    assert schedule.last_count == 2


def test_epoch_interval(tmp_path) -> None:
    model = TwoDSA(learnable=False, n=16)  # 2 batches per epoch
    schedule = TemperatureSchedule(start=2.0, end=0.5, duration=2, interval="epoch",
                                   mode="exponential")
    _trainer(tmp_path, [schedule], max_steps=-1, max_epochs=3).fit(model)
    values = [s[1] for s in _train_values(model)]
    assert values == pytest.approx([2.0, 2.0, 1.0, 1.0, 0.5, 0.5], rel=1e-6)


def test_values_are_the_diagnostics_parameter_trajectory(tmp_path) -> None:
    model = TwoDSA(learnable=False)
    schedule = TemperatureSchedule(start=5.0, end=1.0, duration=5, interval="step",
                                   mode="cosine")
    diagnostics = AttentionDiagnostics(num_images=0, summary=False)
    trainer = _trainer(tmp_path, [schedule, diagnostics], max_steps=8, log_every_n_steps=2,
                       logger=CSVLogger(tmp_path, name="csv", version=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("attn/a/param/temperature")]
    logged = {int(r["step"]): float(r["attn/a/param/temperature"]) for r in rows}
    assert sorted(logged) == [1, 3, 5, 7]
    for step, value in logged.items():
        assert value == pytest.approx(schedule.value_at(step), rel=1e-6), step
        assert float(next(r for r in rows if int(r["step"]) == step)["attn/b/param/temperature"]
                     ) == pytest.approx(schedule.value_at(step), rel=1e-6)


# --------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("learnable", [False, True], ids=["fixed", "learnable"])
def test_resume_continues_the_curve(tmp_path, learnable) -> None:
    def schedule() -> TemperatureSchedule:
        return TemperatureSchedule(start=4.0, end=1.0, duration=5, interval="step",
                                   mode="linear")

    full = TwoDSA(learnable=learnable)
    _trainer(tmp_path / "full", [schedule()]).fit(full)

    first = TwoDSA(learnable=learnable)
    trainer = _trainer(tmp_path / "a", [schedule()], max_steps=3)
    trainer.fit(first)
    path = tmp_path / "three.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("TemperatureSchedule")]
    assert state["last_count"] == 2 and state["last_value"] == pytest.approx(2.8)

    resumed_schedule = schedule()
    resumed = TwoDSA(learnable=learnable)
    _trainer(tmp_path / "b", [resumed_schedule]).fit(resumed, ckpt_path=path)
    seen = _train_values(resumed)
    # The checkpoint holds the value of step 2; the first resumed forward gets step 3's.
    assert [s[0] for s in seen] == [3, 4, 5]
    assert [s[1] for s in seen] == pytest.approx([s[1] for s in full.seen[3:]], rel=1e-6)
    assert [s[1] for s in seen] == pytest.approx([2.2, 1.6, 1.0], rel=1e-6)


def test_resume_after_a_learnable_handoff_keeps_the_learned_value(tmp_path) -> None:
    model = TwoDSA(learnable=True, lr=2.0)
    first = TemperatureSchedule(start=3.0, end=1.0, duration=1, interval="step",
                                handoff="learnable")
    trainer = _trainer(tmp_path, [first], max_steps=4)
    trainer.fit(model)
    learned = model.a.temperature.item()
    assert learned != pytest.approx(1.0, abs=1e-6)
    trainer.save_checkpoint(tmp_path / "four.ckpt")
    resumed = TwoDSA(learnable=True, lr=2.0)
    second = TemperatureSchedule(start=3.0, end=1.0, duration=1, interval="step",
                                 handoff="learnable")
    _trainer(tmp_path, [second], max_steps=5).fit(resumed, ckpt_path=tmp_path / "four.ckpt")
    assert _train_values(resumed)[0][1] == pytest.approx(learned, rel=1e-6)  # not rewritten


def test_a_changed_schedule_on_resume_is_named(tmp_path) -> None:
    schedule = TemperatureSchedule(start=4.0, end=1.0, duration=5, interval="step")
    state = schedule.state_dict()
    changed = TemperatureSchedule(start=2.0, end=1.0, duration=5, interval="step")
    with pytest.warns(UserWarning, match="start: 4.0 -> 2.0"):
        changed.load_state_dict(state)


# --------------------------------------------------------------------------------------
# torch.compile: the value is a tensor the graph reads, never a constant
# --------------------------------------------------------------------------------------


@pytest.mark.slow  # compiles two blocks (aot_eager) and trains a few steps
@pytest.mark.parametrize("learnable", [False, True], ids=["fixed", "learnable"])
def test_no_recompile_while_the_temperature_changes(tmp_path, learnable) -> None:
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    try:
        model = TwoDSA(learnable=learnable, compiled=True)
        schedule = TemperatureSchedule(start=4.0, end=1.0, duration=4, interval="step",
                                       mode="linear")
        _trainer(tmp_path, [schedule]).fit(model)
        assert model.graphs == [2] * 6  # one graph per block, made at the first step
        assert not counters["recompiles"], dict(counters["recompiles"])
        values = [s[1] for s in _train_values(model)]
        assert values == pytest.approx([4.0, 3.25, 2.5, 1.75, 1.0, 1.0], rel=1e-6)
        # The compiled graph reads the current value: same output as the eager block.
        x = torch.randn(2, 4, 6, 6)
        for t in (3.0, 0.7):
            model.a.set_temperature(t)
            torch.testing.assert_close(model.a_run(x), model.a(x), rtol=1e-5, atol=1e-6)
        assert not counters["recompiles"]
    finally:
        torch._dynamo.reset()


# --------------------------------------------------------------------------------------
# DDP: 2 gloo processes get the same value at every step
# --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_ddp_every_rank_gets_the_scheduled_value_and_the_router_losses_train(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("MASTER_PORT", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)],
        cwd=Path(__file__).parents[2], env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    schedule = TemperatureSchedule(start=4.0, end=1.0, duration=2, interval="step",
                                   mode="linear", handoff="learnable")
    for rank in ranks:
        assert [s[0] for s in rank["seen"]] == [0, 1, 2, 3, 4, 5]
        assert [s[1] for s in rank["seen"][:4]] == pytest.approx(
            [schedule.value_at(n) for n in range(4)], rel=1e-6
        )
    # The same temperatures on both ranks at every step, learned ones included (DDP keeps the
    # handed-off parameter in step); the ranks saw different data.
    assert [s[1] for s in ranks[0]["seen"]] == [s[1] for s in ranks[1]["seen"]]
    # Held through step 2 (at `end`); the optimizer moves it from the update of step 3 on.
    assert ranks[0]["seen"][3][1] not in (ranks[0]["seen"][4][1], ranks[0]["seen"][5][1])
    assert not torch.equal(ranks[0]["first_batch"], ranks[1]["first_batch"])
    # The router losses ran in the graph on each rank's shard (different values) and DDP kept
    # the router, trained by them, identical on both ranks.
    assert [s[2] for s in ranks[0]["seen"]] != [s[2] for s in ranks[1]["seen"]]
    for name, value in ranks[0]["router"].items():
        torch.testing.assert_close(ranks[1]["router"][name], value, rtol=0, atol=0)
        assert not torch.equal(value, ranks[0]["initial_router"][name]), name


# --------------------------------------------------------------------------------------
# Setting the temperature of a block, and errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("learnable", [False, True], ids=["fixed", "learnable"])
def test_set_temperature_writes_in_place(learnable) -> None:
    block = DynamicSpatialAttention(learnable_temperature=learnable)
    tensor = block.t_raw if learnable else block.T
    ptr = tensor.data_ptr()
    for value in (30.0, 0.25, 1.0):
        block.set_temperature(value)
        assert block.temperature.item() == pytest.approx(value, rel=1e-6)
        assert block.attention_parameters()["temperature"].item() == pytest.approx(value,
                                                                                   rel=1e-6)
    assert tensor.data_ptr() == ptr and tensor.requires_grad == learnable
    x = torch.randn(2, 3, 6, 6)
    y, mask = block(x)
    fresh = DynamicSpatialAttention(learnable_temperature=learnable)
    fresh.load_state_dict(block.state_dict())
    torch.testing.assert_close(fresh(x)[1], mask)


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (0.0, ValueError, "temperature must be a finite number > 0, got 0.0"),
        (-1, ValueError, "temperature must be a finite number > 0, got -1"),
        (True, TypeError, "temperature must be a number, got True"),
        (1e-46, ValueError, "becomes 0.0 in float32"),
        (0.4, ValueError, r"must exceed eps=0.5"),
    ],
)
def test_set_temperature_rejects_bad_values(value, error, match) -> None:
    block = DynamicSpatialAttention(learnable_temperature=True, eps=0.5)
    with pytest.raises(error, match=match):
        block.set_temperature(value)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"start": -1}, ValueError, "start must be a finite number > 0, got -1"),
        ({"end": 0}, ValueError, "end must be a finite number > 0, got 0"),
        ({"start": float("inf")}, ValueError, "start must be a finite number > 0, got inf"),
        ({"end": 1e-46}, ValueError, "end=1e-46 becomes 0.0 in float32"),
        ({"start": "4"}, TypeError, "start must be a number, got '4'"),
        ({"duration": 0}, ValueError, "duration must be >= 1, got 0"),
        ({"duration": 2.5}, TypeError, "duration must be an int, got 2.5"),
        ({"duration": True}, TypeError, "duration must be an int, got True"),
        ({"interval": "batch"}, ValueError, r"interval must be one of \['step', 'epoch'\]"),
        ({"mode": "step"}, ValueError, r"mode must be one of \['linear', 'cosine'"),
        ({"handoff": "frozen"}, ValueError, r"handoff must be one of \['fixed', 'learnable'\]"),
        ({"include": [""]}, ValueError, "include must be a sequence of non-empty fnmatch"),
        ({"exclude": 3}, ValueError, "exclude must be a sequence"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        TemperatureSchedule(**kwargs)


class CoordOnly(TwoDSA):
    def __init__(self) -> None:
        super().__init__()
        self.a = CoordinateAttention(4, min_mid_channels=2)
        self.b = nn.Identity()


@pytest.mark.parametrize(
    ("model", "schedules", "match"),
    [
        (CoordOnly, [{}], "found no attention block with a temperature"),
        (lambda: TwoDSA(learnable=False), [{"handoff": "learnable"}],
         r"handoff='learnable'.*fixed one: \['a', 'b'\]"),
        (lambda: TwoDSA(eps=0.5), [{"start": 4.0, "end": 0.4}], "must exceed eps=0.5"),
        (TwoDSA, [{}, {"include": ["b"]}], "block 'b' is already scheduled by another"),
        (TwoDSA, [{"include": ["nothing*"]}], r"matching include=\['nothing\*'\]"),
    ],
)
def test_misconfiguration_is_a_clear_error_at_fit_start(tmp_path, model, schedules,
                                                        match) -> None:
    callbacks = [TemperatureSchedule(**kw) for kw in schedules]
    with pytest.raises(ValueError, match=match), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(tmp_path, callbacks).fit(model())


def test_patterns_choose_the_blocks(tmp_path) -> None:
    model = TwoDSA(learnable=False)
    first = TemperatureSchedule(start=3.0, end=3.0, duration=1, include=["a"])
    second = TemperatureSchedule(start=0.5, end=0.5, duration=1, exclude=["a"])
    assert first.state_key != second.state_key  # both keep their state in a checkpoint
    bound = []

    class Peek(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            bound.append((first.block_names, second.block_names))

    _trainer(tmp_path, [first, second, Peek()], max_steps=1).fit(model)
    assert bound == [(["a"], ["b"])]
    assert _train_values(model)[0][1:] == pytest.approx((3.0, 0.5))

