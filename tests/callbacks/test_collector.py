"""The collector holds back the eager training forwards that record masks only and reduces
them together (``AccumulatorTable``): the logged statistics are those of recording each forward."""

from __future__ import annotations

import math

import torch

from lightning_attn.callbacks import AttentionDiagnostics
from lightning_attn.core import accumulator as accumulator_module
from lightning_attn.core.accumulator import AccumulatorTable

from .cb_models import MemoryLogger, TinyAttnNet, make_trainer


def _logged(tmp_path, name: str) -> list[tuple[int, dict[str, float]]]:
    torch.manual_seed(0)
    logger = MemoryLogger()
    trainer = make_trainer(tmp_path / name, [AttentionDiagnostics(summary=False,
                                                                  histogram_every_n_steps=2)],
                           max_steps=6, logger=logger, log_every_n_steps=1,
                           accumulate_grad_batches=2)  # two forwards a point
    trainer.fit(TinyAttnNet(n=96))
    return logger.attn()


def test_held_back_forwards_log_what_each_forward_logs(tmp_path, monkeypatch):
    held = []
    settle = AccumulatorTable.settle

    def counted(self):
        held.append(len(self._forwards))
        settle(self)

    monkeypatch.setattr(AccumulatorTable, "settle", counted)
    together = _logged(tmp_path, "together")
    # the coordinate block (masks only) was held back, a forward at a time (each settled
    # before its backward); the DSA block (a router) recorded as it ran
    assert held and max(held) == 1 and sum(held) == 12
    monkeypatch.setattr(accumulator_module, "HELD_ELEMENTS", -1)  # nothing small enough
    held.clear()
    alone = _logged(tmp_path, "alone")
    assert sum(held) == 0
    assert [s for s, _ in together] == [s for s, _ in alone] == list(range(6))
    for (_, a), (_, b) in zip(together, alone, strict=True):
        assert a.keys() == b.keys() and any("coord" in k for k in a)
        for tag in a:
            assert math.isclose(a[tag], b[tag], rel_tol=1e-12, abs_tol=1e-12) or (
                math.isnan(a[tag]) and math.isnan(b[tag])), tag


def _two_collectors(monkeypatch, held: bool) -> list[dict[str, tuple[int, float, float]]]:
    """Two collectors over blocks they partly share ({a, b} and {b, c}): the second takes the
    shared block into its own table while the first's point is open."""
    from types import SimpleNamespace

    from lightning_attn.blocks import create_attention
    from lightning_attn.callbacks.collector import StatisticsCollector
    from lightning_attn.core.statistics import RecordingConfig

    if not held:
        monkeypatch.setattr(accumulator_module, "HELD_ELEMENTS", -1)
    torch.manual_seed(0)
    blocks = {name: create_attention("coord", 4) for name in "abc"}
    first, second = StatisticsCollector(RecordingConfig()), StatisticsCollector(RecordingConfig())
    first.bind({n: blocks[n] for n in "ab"}, torch.device("cpu"))
    second.bind({n: blocks[n] for n in "bc"}, torch.device("cpu"))
    first.open("train")
    second.open("train")
    for _ in range(2):
        for block in blocks.values():
            block(torch.rand(2, 4, 6, 6))
    trainer = SimpleNamespace(world_size=1)
    read = [first.finish(trainer, 0), second.finish(trainer, 0)]
    assert not any(t.holding for c in (first, second) for t in c._tables)
    return [{name: (b.forwards, b.masks["mask_h"].mean, b.masks["mask_w"].std)
             for name, b in stats.blocks.items()} for stats in read]


def test_collectors_sharing_blocks_read_every_held_forward(monkeypatch):
    together = _two_collectors(monkeypatch, held=True)
    alone = _two_collectors(monkeypatch, held=False)
    assert [sorted(s) for s in together] == [["a", "b"], ["b", "c"]]
    for t, a in zip(together, alone, strict=True):
        for name in t:
            assert t[name][0] == a[name][0] == 2
            for x, y in zip(t[name][1:], a[name][1:], strict=True):
                assert math.isclose(x, y, rel_tol=1e-12)
