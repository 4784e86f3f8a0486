"""Training points read in batches (``StatisticsCollector.finish_later`` / ``read_later``):
every output, warning and checkpointed state is what reading each point at once gives, and
the batches are read when they should be."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from lightning_attn.callbacks import AttentionDiagnostics, DiagnosticsWriter
from lightning_attn.callbacks import diagnostics as diagnostics_module
from lightning_attn.callbacks.collector import StatisticsCollector
from lightning_attn.core.tags import CONFIG_TAG

from .cb_models import (
    FakeNet,
    MemoryLogger,
    TinyAttnNet,
    ValidatedNet,
    make_data,
    make_trainer,
)

#: Steps whose batches are constant: the mask collapses there and clears after, so the
#: collapse is warned about at 5, 14 and 33 (each inside a batch of points, none at its
#: start).
FLAT = {5, 6, 7, 14, 33, 34}


class EverythingWriter(DiagnosticsWriter):
    """Keeps every call, in order, on its logger (``logger.calls``)."""

    logger_type = MemoryLogger

    def __init__(self, logger: MemoryLogger) -> None:
        super().__init__(logger)
        logger.calls = []

    def scalars(self, metrics, step):
        self.logger.calls.append(("scalars", step, dict(metrics)))

    def histogram(self, tag, counts, step):
        self.logger.calls.append(("histogram", step, tag, list(counts)))

    def image(self, tag, image, step):
        self.logger.calls.append(("image", step, tag, image.clone()))

    def text(self, tag, text, step):
        self.logger.calls.append(("text", step, tag, text))


def _data(batches: int, batch_size: int = 4):
    data = make_data(batches * batch_size)
    for step in FLAT:
        data.tensors[0][step * batch_size:(step + 1) * batch_size] = 0.5
    return data


def _batches(monkeypatch) -> list[int]:
    """The number of points of every batch read from now on."""
    sizes: list[int] = []
    read_later = StatisticsCollector.read_later

    def counted(self):
        batches = read_later(self)
        sizes.extend(len(b.points) for b in batches)
        return batches

    monkeypatch.setattr(StatisticsCollector, "read_later", counted)
    return sizes


def _run(tmp_path, name, max_steps=40, val_every=None, checkpoints=None, **options):
    """A fit logging at every step (histograms every 5), validated every ``val_every``
    steps; what it wrote, warned and checkpointed."""
    torch.manual_seed(0)
    logger = MemoryLogger()
    cb = AttentionDiagnostics(histogram_every_n_steps=5, writers=[EverythingWriter],
                              summary=False, **options)
    model = ValidatedNet(data=_data(max_steps), batch_size=4, val_data=make_data(8))
    callbacks = [cb]
    if checkpoints:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=checkpoints,
                                         save_top_k=-1))
    trainer = make_trainer(tmp_path, callbacks, max_steps=max_steps, logger=logger,
                           log_every_n_steps=1, enable_checkpointing=bool(checkpoints),
                           limit_val_batches=2 if val_every else 0,
                           val_check_interval=val_every)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model)
    said = [str(w.message) for w in caught if "attention block" in str(w.message)]
    states = [torch.load(path, weights_only=False)["callbacks"][cb.state_key]
              for path in sorted((tmp_path / name).glob("*.ckpt"),
                                 key=lambda p: p.stat().st_mtime_ns)] if checkpoints else []
    return cb, logger.calls, said, states


def _same(first, second) -> None:
    # the configuration record (written when training starts) holds each run's own id
    first, second = ([c for c in calls if c[2] != CONFIG_TAG] for calls in (first, second))
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a[:-1] == b[:-1]
        if isinstance(a[-1], torch.Tensor):
            assert torch.equal(a[-1], b[-1])
        else:
            assert a[-1] == b[-1]


def test_points_read_in_batches_give_what_points_read_at_once_give(tmp_path, monkeypatch):
    sizes = _batches(monkeypatch)
    batched, calls, said, states = _run(tmp_path, "batched", val_every=24, checkpoints=9)
    # 32 steps' points a batch, cut by the validation at 24, the checkpoints (state saved
    # at 9, 18, 27, 36) and the end of the epoch
    assert sizes == [9, 9, 6, 3, 9, 4]
    sizes.clear()
    monkeypatch.setattr(diagnostics_module, "READ_EVERY_N_STEPS", 1)
    alone, calls_alone, said_alone, states_alone = _run(
        tmp_path, "alone", val_every=24, checkpoints=9)
    assert sizes == [1] * 40

    _same(calls, calls_alone)  # scalars, histograms, head texts, problems: same order too
    assert [c[1] for c in calls if c[0] == "scalars" and "attn/block/mask/std" in c[2]] == list(
        range(40))
    assert sum(c[0] == "scalars" and "val/attn/block/mask/std" in c[2] for c in calls) == 1
    assert sum(c[0] == "histogram" for c in calls) == 8 * 2  # mask and router, every 5
    assert said == said_alone
    collapse_steps = sorted(int(s.split(" at step ")[1].split(":")[0]) for s in said
                            if "MaskCollapse" in s or "nearly constant" in s)
    assert collapse_steps == [5, 14, 33]
    for state in (*states, *states_alone):
        assert state.pop("run_id")  # each run its own
    assert states == states_alone and len(states) == 4
    assert [s["num_points"] for s in states] == [9, 18, 27, 36]
    assert batched.num_points == alone.num_points == 40
    assert batched.last_stats.step == alone.last_stats.step == 39
    assert batched.last_stats.blocks["block"] == alone.last_stats.blocks["block"]
    assert batched.last_problems == alone.last_problems


def test_the_latest_point_is_read_when_asked_for(tmp_path, monkeypatch):
    sizes = _batches(monkeypatch)
    seen = []

    class Reader(Callback):  # a callback of the user's reading the diagnostics
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((trainer.global_step, diagnostics.last_stats.step))

    diagnostics = AttentionDiagnostics(summary=False)
    trainer = make_trainer(tmp_path, [diagnostics, Reader()], max_steps=6,
                           log_every_n_steps=1)
    trainer.fit(FakeNet(data=_data(6), batch_size=4))
    assert seen == [(s + 1, s) for s in range(6)]  # each point as soon as it is asked for
    assert sizes == [1] * 6


@pytest.mark.parametrize(("options", "interval", "expected"), [
    ({}, 10, [3, 1]),  # the points of 32 steps: 3 points 10 steps apart, then the epoch's end
    ({}, 32, [1]),  # points 32 steps apart: each read at once
    ({"on_problem": "stop"}, 1, [1] * 40),  # a stop acts at the point's step
    ({"on_problem": "raise"}, 1, [1] * 40),
    ({"monitor": True}, 1, [1] * 40),  # a monitored statistic is there at its step
    ({"peer": True}, 1, [1] * 80),  # two callbacks: their batches would leave step order
])
def test_when_points_are_read(tmp_path, monkeypatch, options, interval, expected):
    sizes = _batches(monkeypatch)
    callbacks = []
    if options.pop("monitor", False):
        callbacks.append(EarlyStopping(monitor="attn/block/mask/std", mode="max",
                                       patience=1000, check_on_train_epoch_end=True))
    if options.pop("peer", False):
        callbacks.append(AttentionDiagnostics(summary=False, sections=["mask"]))
    cb = AttentionDiagnostics(summary=False, **options)
    trainer = make_trainer(tmp_path, [cb, *callbacks], max_steps=40,
                           log_every_n_steps=interval)
    trainer.fit(FakeNet(data=make_data(160), batch_size=4))  # healthy: nothing stops it
    assert sizes == expected


def test_a_failure_to_write_never_hides_the_error_nor_skips_the_cleanup(tmp_path, monkeypatch):
    def fail(self):
        if self._collector.num_later:
            raise OSError("disk full")

    monkeypatch.setattr(AttentionDiagnostics, "read_points", fail)
    cb = AttentionDiagnostics(summary=False)
    trainer = make_trainer(tmp_path, [cb], max_steps=8, log_every_n_steps=1)
    model = TinyAttnNet(n=96, fail_at_step=5)  # fails before the epoch ends
    with pytest.warns(UserWarning, match="could not be written .OSError: disk full"):
        with pytest.raises(RuntimeError, match="planned failure"):
            trainer.fit(model)
    assert not cb._collector.blocks and not model.dsa.recording  # released all the same
