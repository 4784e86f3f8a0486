"""Cost and silence guarantees: sync-free recording, free non-logging steps, missing blocks."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_attn.blocks import RecordingMixin
from lightning_attn.callbacks import AttentionDiagnostics, MaskHealthMonitor
from lightning_attn.core import HealthThresholds, MissingStatisticsWarning, RecordingConfig

from .cb_models import FakeBlock, FakeNet, MemoryLogger, make_data, make_trainer

# aten ops that copy a value to the host (a host-device sync on an accelerator)
_SYNCING = {"_local_scalar_dense", "bincount", "nonzero", "unique", "masked_select", "item"}


class _OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _ops(block, x) -> list[str]:
    with _OpRecorder() as rec:
        block(x)
    return rec.ops


@pytest.mark.parametrize("bins", [0, 20])
def test_recording_a_forward_uses_no_syncing_op(bins):
    block = FakeBlock(num_branches=3)
    x = torch.rand(4, 1, 8, 8)
    bare = _ops(block, x)
    block.configure_recording(RecordingConfig(histogram_bins=bins), "cpu")
    assert _ops(block, x) == bare  # configured but not recording: nothing added
    block.start_recording()
    recorded = _ops(block, x)
    assert len(recorded) > len(bare)
    assert not _SYNCING & set(recorded), sorted(_SYNCING & set(recorded))


def test_non_logging_steps_do_nothing_but_compare_integers(tmp_path):
    model = FakeNet()
    make_trainer(tmp_path, [AttentionDiagnostics(log_every_n_steps=3)], max_steps=6).fit(model)
    assert model.recording_seen == [False, False, True] * 2


def test_callbacks_differing_only_in_what_they_watch_share_a_trainer(tmp_path):
    warn = MaskHealthMonitor(thresholds=HealthThresholds(std_threshold=0.1), include=["block"])
    strict = MaskHealthMonitor(thresholds=HealthThresholds(std_threshold=0.01), on_problem="raise")
    assert warn.state_key != strict.state_key
    make_trainer(tmp_path, [warn, strict], max_steps=1).fit(FakeNet())  # no duplicate-key error


class Forgetful(RecordingMixin, nn.Module):
    """A user's block that forgot to call ``self.record`` in its forward."""

    def forward(self, x):
        return x * torch.sigmoid(x)


class WithForgetful(FakeNet):
    def __init__(self) -> None:
        super().__init__()
        self.forgetful = Forgetful()

    def forward(self, x):
        return super().forward(self.forgetful(x))


def test_a_block_that_records_nothing_is_named_once(tmp_path):
    logger = MemoryLogger()
    with pytest.warns(MissingStatisticsWarning, match="'forgetful' recorded no statistics") as w:
        make_trainer(tmp_path, [AttentionDiagnostics(log_every_n_steps=1)], max_steps=3,
                     logger=logger).fit(WithForgetful())
    assert len([x for x in w if x.category is MissingStatisticsWarning]) == 1
    assert all("attn/forgetful/mask/std" not in m for _, m in logger.attn())
    assert all("attn/block/mask/std" in m for _, m in logger.attn())


def test_diagnostics_warns_when_interval_is_zero(tmp_path):
    for cb in (MaskHealthMonitor(log_every_n_steps=0),
               AttentionDiagnostics(log_every_n_steps=0, num_images=0, summary=False)):
        with pytest.warns(UserWarning, match="log_every_n_steps is 0"):
            make_trainer(tmp_path, [cb], max_steps=1).fit(FakeNet())


def test_callbacks_with_and_without_histograms_share_the_blocks(tmp_path):
    plain = MaskHealthMonitor(histogram_every_n_steps=0, log_every_n_steps=1)
    full = AttentionDiagnostics(num_images=0, summary=False, log_every_n_steps=1,
                                histogram_every_n_steps=1)
    model = FakeNet()
    make_trainer(tmp_path, [plain, full], max_steps=2).fit(model)
    assert plain.last_stats.blocks["block"].masks["mask"].count == 8 * 64
    assert sum(full.last_stats.blocks["block"].histograms["mask"]) == 8 * 64


def test_callbacks_with_different_saturation_thresholds_are_a_clear_error(tmp_path):
    callbacks = [MaskHealthMonitor(saturation_low=0.1), MaskHealthMonitor(include=["block"])]
    with pytest.raises(ValueError, match="same saturation thresholds"):
        make_trainer(tmp_path, callbacks, max_steps=1).fit(FakeNet())


class ParameterFreeGate(RecordingMixin, nn.Module):
    """A user's gate with no scalar parameter at all (the README's ``MyGate``)."""

    mask_names = ("mask",)

    def forward(self, x):
        mask = torch.sigmoid(x[:, :1])
        self.record(masks={"mask": mask})
        return x * mask


class OnlyParameterFreeGate(FakeNet):
    def __init__(self) -> None:
        super().__init__()
        self.gate = ParameterFreeGate()

    def forward(self, x):
        return self.head(self.gate(x).flatten(1))


@pytest.mark.parametrize("sections", [("router", "mask", "param"), ("mask",)])
def test_blocks_without_scalar_parameters_alone_are_logged(tmp_path, sections):
    # No watched block has a parameter: the read vector has no parameter part.
    logger = MemoryLogger()
    trainer = make_trainer(
        tmp_path, [AttentionDiagnostics(log_every_n_steps=2, sections=sections, summary=False,
                                         exclude=["block"])],
        max_steps=4, logger=logger,
    )
    trainer.fit(OnlyParameterFreeGate())
    points = logger.attn()
    assert [step for step, _ in points] == [1, 3]
    x = make_data(32).tensors[0][8:16]  # the batch of step 1
    expected = torch.sigmoid(x[:, :1]).double()
    assert points[0][1]["attn/gate/mask/mean"] == pytest.approx(expected.mean().item(), rel=1e-6)
    assert points[0][1]["attn/gate/mask/std"] == pytest.approx(expected.std().item(), rel=1e-6)
