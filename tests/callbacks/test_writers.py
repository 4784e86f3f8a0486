"""The writer seam's one private shortcut writes exactly what the public API would."""

from __future__ import annotations

from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_attn.callbacks.writers import TensorBoardWriter


def _read(log_dir):
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_one_event_holds_what_log_metrics_writes(tmp_path):
    metrics = {"attn/b/mask/mean": 0.25, "attn/b/router/usage_0": 0.5, "epoch": 1.0}
    for prefix in ("", "fold1"):
        public = TensorBoardLogger(tmp_path / "public", name=prefix or "plain", prefix=prefix)
        public.log_metrics(metrics, step=7)
        public.experiment.flush()
        public.log_metrics({k: v + 1 for k, v in metrics.items()}, step=8)
        public.experiment.flush()
        shortcut = TensorBoardLogger(tmp_path / "shortcut", name=prefix or "plain",
                                     prefix=prefix)
        writer = TensorBoardWriter(shortcut)
        writer.scalars(metrics, 7)
        writer.scalars({k: v + 1 for k, v in metrics.items()}, 8)  # the event refilled
        shortcut.experiment.flush()
        assert _read(shortcut.log_dir) == _read(public.log_dir)
        assert len(_read(shortcut.log_dir)) == 3
