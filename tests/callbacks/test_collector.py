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


def _fit_counting(tmp_path, name: str, monkeypatch, every: int, linger: bool = True,
                  histograms: int = 3, diagnostics_kwargs: dict | None = None,
                  **kwargs) -> tuple[list[tuple[int, dict[str, float]]], dict[str, list]]:
    """A fit logging every ``every`` steps: what it logs, the steps whose forwards recorded,
    and how often the blocks were switched off."""
    from lightning_attn.callbacks import collector as collector_module
    from lightning_attn.core.accumulator import Accumulator

    seen: dict[str, list] = {"recorded": [], "stops": [], "kept": []}
    trainer_ref = {}
    add = Accumulator.add

    def counted_add(self, *args, **kw):
        seen["recorded"].append((trainer_ref["t"].global_step, self._phase_name))
        return add(self, *args, **kw)

    stop = collector_module.stop_recording_of

    def counted_stop(blocks, holder, phase):
        seen["stops"].append(phase)
        return stop(blocks, holder, phase)

    release = collector_module.StatisticsCollector.release

    def counted_release(self):
        if self._lingering is not None:  # a hold kept past its point is let go
            seen["kept"].append(trainer_ref["t"].global_step)
        return release(self)

    monkeypatch.setattr(collector_module.StatisticsCollector, "release", counted_release)
    monkeypatch.setattr(Accumulator, "add", counted_add)
    monkeypatch.setattr(collector_module, "stop_recording_of", counted_stop)
    if not linger:
        close = collector_module.StatisticsCollector.close
        monkeypatch.setattr(collector_module.StatisticsCollector, "close",
                            lambda self, phase="train", linger=False: close(self, phase))
    torch.manual_seed(0)
    logger = MemoryLogger()
    diagnostics = AttentionDiagnostics(summary=False, histogram_every_n_steps=histograms,
                                       **(diagnostics_kwargs or {}))
    trainer = make_trainer(tmp_path / name, [diagnostics], logger=logger,
                           log_every_n_steps=every, **kwargs)
    trainer_ref["t"] = trainer
    trainer.fit(TinyAttnNet(n=96))
    monkeypatch.undo()
    return logger.attn(), seen


def test_every_step_points_keep_the_blocks_held_and_log_the_same(tmp_path, monkeypatch):
    _, seen = _fit_counting(tmp_path, "plain", monkeypatch, every=1, histograms=0, max_steps=8)
    # two blocks recording at each of 8 steps; switched off once, when the fit ends
    assert [s for s, _ in seen["recorded"]] == [s for s in range(8) for _ in range(2)]
    assert seen["stops"] == ["train"]
    # histograms at steps 0, 3 and 6: switched off and on where the flag changes
    held, seen = _fit_counting(tmp_path, "held", monkeypatch, every=1, max_steps=8)
    assert 1 < len(seen["stops"]) < 8
    alone, seen = _fit_counting(tmp_path, "alone", monkeypatch, every=1, linger=False,
                                max_steps=8)
    assert len(seen["stops"]) >= 8  # switched off after every point
    assert [s for s, _ in held] == [s for s, _ in alone] == list(range(8))
    for (_, a), (_, b) in zip(held, alone, strict=True):
        assert a == b


def test_a_step_that_logs_nothing_records_nothing(tmp_path, monkeypatch):
    # validation right after each point (steps 3 and 7), without statistics of its own
    logged, seen = _fit_counting(tmp_path, "every4", monkeypatch, every=4, histograms=0,
                                 max_steps=8,
                                 limit_val_batches=2, val_check_interval=4,
                                 check_val_every_n_epoch=None,
                                 diagnostics_kwargs={"eval_statistics": False})
    assert sorted({s for s, _ in seen["recorded"]}) == [s for s, _ in logged] == [3, 7]
    assert {phase for _, phase in seen["recorded"]} == {"train"}
    assert seen["kept"] == []  # the next step logs nothing: each point let go at its own step


def test_spare_vectors_keep_each_point_its_own(monkeypatch):
    """Points read in batches, their vectors filled again by later points: each point reads
    what its own forwards recorded."""
    from types import SimpleNamespace

    from lightning_attn.blocks import create_attention
    from lightning_attn.callbacks.collector import StatisticsCollector
    from lightning_attn.core.statistics import RecordingConfig

    torch.manual_seed(0)
    blocks = {"coord": create_attention("coord", 4)}
    collector = StatisticsCollector(RecordingConfig())
    collector.bind(blocks, torch.device("cpu"))
    trainer = SimpleNamespace(world_size=1)
    forwards = []
    for batch in range(3):
        for point in range(3):
            n = 3 * batch + point + 1
            collector.open("train")
            for _ in range(n):
                blocks["coord"](torch.rand(2, 4, 6, 6))
            collector.finish_later(trainer, n)
        for read in collector.read_later():
            forwards += [p.stats(s, "train").blocks["coord"].forwards
                         for p, s in zip(read.points, read.steps, strict=True)]
    assert forwards == list(range(1, 10))
    assert len(collector._spare) == 3  # the first batch's vectors served the later ones


def _collectors_over(blocks, *names):
    from lightning_attn.callbacks.collector import StatisticsCollector
    from lightning_attn.core.statistics import RecordingConfig

    collectors = []
    for chosen in names:
        c = StatisticsCollector(RecordingConfig())
        c.bind({n: blocks[n] for n in chosen}, torch.device("cpu"))
        collectors.append(c)
    return collectors


def test_spare_vectors_stay_bounded_when_points_are_combined_over_processes(monkeypatch):
    from types import SimpleNamespace

    from lightning_attn.blocks import create_attention
    from lightning_attn.callbacks import collector as collector_module

    # several processes: the combined vector is a new tensor, as all_gather makes it
    monkeypatch.setattr(collector_module, "combine_processes",
                        lambda trainer, vector, kinds: vector.clone())
    blocks = {"coord": create_attention("coord", 4)}
    (collector,) = _collectors_over(blocks, ["coord"])
    trainer = SimpleNamespace(world_size=2)
    for step in range(12):
        collector.open("train")
        blocks["coord"](torch.rand(2, 4, 6, 6))
        collector.finish_later(trainer, step)
        if step % 3 == 2:
            collector.read_later()
    assert len(collector._spare) <= 3


def test_peers_sharing_blocks_let_go_in_any_order():
    from lightning_attn.blocks import create_attention

    blocks = {name: create_attention("coord", 4) for name in "abc"}
    first, second = _collectors_over(blocks, "ab", "bc")
    first.open("train")
    second.open("train")
    blocks["b"](torch.rand(2, 4, 6, 6))
    first.unbind()  # drops the blocks' accumulators, the peer's too
    second.unbind()  # an exception in one callback: the other must let go cleanly
    assert not any(b.recording for b in blocks.values())


def test_a_table_made_during_an_evaluation_serves_training():
    from lightning_attn.core.accumulator import Accumulator
    from lightning_attn.core.statistics import RecordingConfig, StatisticsLayout

    acc = Accumulator(StatisticsLayout(("mask",), None, 0), RecordingConfig(), "cpu")
    with torch.inference_mode():  # a validation point's open rebuilt the tables
        table = AccumulatorTable([acc])
    acc.add({"mask": torch.rand(64, 128)}, None, False)  # in place, outside inference mode
    table.settle()
    assert acc.row("train")[0] == 1


def test_a_holder_that_joins_a_kept_hold_keeps_its_window():
    """Another holder joins while the collector keeps its hold between two points: the next
    point does not empty the window they share (as if the collector had let go)."""
    from types import SimpleNamespace

    from lightning_attn.blocks import create_attention

    blocks = {"coord": create_attention("coord", 4)}
    (collector,) = _collectors_over(blocks, ["coord"])
    trainer, block = SimpleNamespace(world_size=1), blocks["coord"]
    collector.open("train")
    block(torch.rand(2, 4, 6, 6))
    collector.finish_later(trainer, 0)
    assert block.recording  # kept for a point at the next step
    block.start_recording("mine")  # shares the kept window
    block(torch.rand(2, 4, 6, 6))
    collector.open("train")
    assert block.recorded_statistics("train")[0] == 2  # its forwards are still there
    block.stop_recording("mine")
