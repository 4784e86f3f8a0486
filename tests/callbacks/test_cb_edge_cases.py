"""Regressions found in review: state keys, sync-free statistics, skipped batches."""

import pytest
import torch
from cb_models import FakeBlock, FakeNet, MemoryLogger, make_trainer
from lightning.pytorch import Callback
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_attn.callbacks import AttentionDiagnostics, MaskHealthMonitor, RouterEntropyMonitor
from lightning_attn.callbacks.collector import StatisticsCollector

# aten ops that copy a value to the host (a host-device sync on an accelerator)
_SYNCING = {"_local_scalar_dense", "bincount", "nonzero", "unique", "masked_select", "item"}


class _OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_callbacks_differing_only_in_thresholds_or_on_problem_can_share_a_trainer(tmp_path):
    warn = MaskHealthMonitor(std_threshold=0.1)
    strict = MaskHealthMonitor(std_threshold=0.01, on_problem="raise")
    other = RouterEntropyMonitor(dead_branch_factor=0.2)
    assert len({warn.state_key, strict.state_key, other.state_key,
                RouterEntropyMonitor().state_key}) == 4
    make_trainer(tmp_path, [warn, strict], max_steps=1).fit(FakeNet())  # no duplicate-key error


@pytest.mark.parametrize("histograms", [False, True])
def test_observing_a_forward_uses_no_syncing_op(histograms):
    block = FakeBlock(num_branches=3)
    collector = StatisticsCollector(frozenset({"mask", "router", "param"}))
    collector.bind({"block": block})
    collector.attach(torch.device("cpu"), histograms=histograms)
    x = torch.rand(4, 1, 8, 8)
    with _OpRecorder() as rec:
        block(x)
    collector.detach()
    assert rec.ops, "the recorder saw nothing"
    assert not _SYNCING & set(rec.ops), sorted(_SYNCING & set(rec.ops))
    stats = collector.finish(trainer=type("T", (), {"world_size": 1})(), step=1)
    if histograms:
        assert sum(stats.blocks["block"].histograms["mask"]) == x.numel()
        assert sum(stats.blocks["block"].histograms["router"]) == 4 * 3


class _SkipBatch(FakeNet):
    """Asks Lightning to skip the rest of epoch 0 at its second batch (a logging step)."""

    def on_train_batch_start(self, batch, batch_idx):
        if self.current_epoch == 0 and batch_idx == 1:
            return -1
        return None


class _ObserverProbe(Callback):
    def __init__(self, model) -> None:
        self.model, self.counts = model, []

    def on_train_epoch_end(self, trainer, pl_module):
        self.counts.append(len(self.model.block._observers))


def test_batch_skipped_by_on_train_batch_start_leaves_no_observer(tmp_path):
    model = _SkipBatch()
    cb = AttentionDiagnostics(log_every_n_steps=2, num_images=0, summary=False)
    probe = _ObserverProbe(model)
    logger = MemoryLogger()
    make_trainer(tmp_path, [cb, probe], max_steps=4, max_epochs=3, logger=logger).fit(model)
    assert probe.counts and set(probe.counts) == {0}
    assert [s for s, _ in logger.attn()] == [2, 4]


def test_diagnostics_warns_like_the_monitors_when_interval_is_zero(tmp_path):
    for cb in (MaskHealthMonitor(log_every_n_steps=0),
               AttentionDiagnostics(log_every_n_steps=0, num_images=0, summary=False)):
        with pytest.warns(UserWarning, match="log_every_n_steps is 0"):
            make_trainer(tmp_path, [cb], max_steps=1).fit(FakeNet())
