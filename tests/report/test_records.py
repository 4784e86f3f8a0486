"""Event-file records: every CRC checked (as tensorboard's reader does, by chunks with numpy),
the first damaged record named, and records too big to hold read in the file."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference

import lightning_attn.report.records as records
from lightning_attn.report import load_runs
from lightning_attn.report.records import FileSlice, encode_records, masked_crc32c

from .long_runs import BLOCKS, config, write_long_run


def test_crc_is_tensorboards():
    rng = np.random.default_rng(0)
    for n in (0, 1, 3, 4, 5, 8, 63, 64, 65, 4095, 70_001, 300_000):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert masked_crc32c(data) == reference(data), n
    payloads = [os.urandom(int(n)) for n in rng.integers(0, 3000, 300)]
    encoded = encode_records(payloads)
    pos = 0
    for p in payloads:  # tensorboard's framing: length, its CRC, data, its CRC
        head = encoded[pos:pos + 8]
        assert int.from_bytes(encoded[pos + 8:pos + 12], "little") == reference(head)
        data = encoded[pos + 12:pos + 12 + len(p)]
        assert data == p
        assert int.from_bytes(encoded[pos + 12 + len(p):pos + 16 + len(p)], "little") == (
            reference(p))
        pos += 16 + len(p)


def test_a_flipped_bit_stops_the_reading_at_its_record(tmp_path):
    write_long_run(tmp_path / "run", conf=config())
    (path,) = (tmp_path / "run").glob("events.*")
    data = bytearray(path.read_bytes())
    at = len(data) // 2
    data[at] ^= 0x10  # inside a record's data (a value, or a tag)
    path.write_bytes(bytes(data))
    (log,) = load_runs(tmp_path / "run", progress=False)
    (note,) = log.notes
    assert note.startswith(f"event file '{path}' is damaged at byte ")
    assert "fails its CRC check" in note or "fails its length's CRC check" in note
    assert "kept the" in note
    damaged_at = int(note.split("damaged at byte ")[1].split(" ")[0])
    assert damaged_at <= at
    series = log.scalars[f"attn/{BLOCKS[0]}/mask/std"]
    assert 0 < len(series) < 300  # the points before the damage


def _png(width: int, height: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_a_record_too_big_to_hold_is_walked_in_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "BIG_RECORD_BYTES", 20_000)
    png = _png(120, 90)  # about 32 kB: over the limit set above
    write_long_run(tmp_path / "run", conf=config(), image=png)
    (log,) = load_runs(tmp_path / "run", progress=False)
    assert not log.notes
    (image,) = log.images["attn/maps"]
    assert isinstance(image.data, FileSlice) and image.encoded == png
    assert len(log.scalars[f"attn/{BLOCKS[0]}/mask/std"]) == 300
    # its CRC is checked too, by segments of the file
    (path,) = (tmp_path / "run").glob("events.*")
    data = bytearray(path.read_bytes())
    at = data.find(png[1000:1100]) + 50
    data[at] ^= 1
    path.write_bytes(bytes(data))
    (log,) = load_runs(tmp_path / "run", progress=False)
    (note,) = log.notes
    assert "fails its CRC check" in note and not log.images
    # and a file cut inside it ends with a note, what came before kept
    path.write_bytes(bytes(data[:at]))
    (log,) = load_runs(tmp_path / "run", progress=False)
    (note,) = log.notes
    assert "cut short" in note and len(log.scalars[f"attn/{BLOCKS[0]}/mask/std"]) == 300


@pytest.mark.parametrize("cut", [5, 13, 40])
def test_a_file_cut_anywhere_keeps_the_whole_records_before(tmp_path, cut):
    write_long_run(tmp_path / "run", conf=config())
    (path,) = (tmp_path / "run").glob("events.*")
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - cut])
    (log,) = load_runs(tmp_path / "run", progress=False)
    (note,) = log.notes
    assert "cut short" in note and "kept the" in note
