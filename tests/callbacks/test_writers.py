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


def test_records_checksummed_in_c_are_tensorboards_bytes(tmp_path):
    import io

    import pytest
    from tensorboard.summary.writer.record_writer import RecordWriter

    from lightning_attn.callbacks.writers import checksum_records_in_c

    logger = TensorBoardLogger(tmp_path)
    file_writer = logger.experiment._get_file_writer()
    records = file_writer.event_writer._async_writer._writer
    assert checksum_records_in_c(file_writer) and records.write.checksums_in_c
    assert checksum_records_in_c(file_writer)  # once is enough: applying again changes nothing
    python, ours = io.BytesIO(), io.BytesIO()
    records._writer, kept = ours, records._writer
    try:
        for data in (b"", b"x", bytes(range(256)) * 13, b"\xff" * 4099):
            RecordWriter(python).write(data)
            records.write(data)
    finally:
        records._writer = kept
    assert ours.getvalue() == python.getvalue()
    # what TensorBoard reads back (it checks every record's checksums), through the writer
    writer = TensorBoardWriter(logger)
    writer.scalars({"attn/b/mask/mean": 0.25}, 3)
    logger.experiment.flush()
    assert _read(logger.log_dir) == {"attn/b/mask/mean": [(3, pytest.approx(0.25))]}
    assert checksum_records_in_c(object()) is False  # a writer laid out otherwise: untouched


def test_scalar_events_are_protobufs_bytes():
    import math

    import numpy as np
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    from lightning_attn.callbacks.writers import ScalarEvents

    tags = ["attn/b/mask/mean", "attn/blöck 注/router/usage_0", "x" * 200, "epoch"]
    events = ScalarEvents(tags, "fold1/")
    values = [0.0, -0.0, 1 / 3, math.nan, -math.nan, math.inf, -math.inf, 1e300, -1e-300,
              np.float64(0.0) / np.float64(0.0), 2.5, 123456789.0]
    for step in (0, 1, 127, 128, 300, 2**40, -1):
        for start in range(0, len(values), len(tags)):
            chunk = np.asarray((values * 2)[start:start + len(tags)])
            want = Event(wall_time=1733377000.123456, step=step, summary=Summary(value=[
                Summary.Value(tag="fold1/" + t, simple_value=v)
                for t, v in zip(tags, chunk.tolist(), strict=True)]))
            assert events.event(chunk, step, 1733377000.123456) == want.SerializeToString()
