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
