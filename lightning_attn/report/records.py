"""TensorBoard event files as records: framing, CRC32C checks and big records, read by chunks.

An event file is a sequence of TFRecords: ``length`` (8 bytes, little-endian), the masked
CRC32C of those 8 bytes, ``length`` bytes of a serialized ``Event`` and their masked CRC32C.
:class:`RecordReader` reads a file by chunks of :data:`CHUNK_BYTES`, checks every CRC as
TensorBoard's own reader does, but a chunk at a time with numpy (TensorBoard's pure-Python
CRC32C runs at about 3 MB/s), and stops at the first damaged record, saying where and why.

A record longer than :data:`BIG_RECORD_BYTES` (an image of hundreds of MB) is never held in
memory: its CRC is computed by segments of the file, and :func:`big_event_summary` walks
its protocol buffer in the file, so an image is kept as a reference to its bytes
(:class:`FileSlice`) and read only when it is drawn.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = [
    "BIG_RECORD_BYTES",
    "CHUNK_BYTES",
    "RECORD_HEADER",
    "FileSlice",
    "Record",
    "RecordReader",
    "big_event_summary",
    "crc32c",
    "encode_records",
    "masked_crc32c",
]

#: Bytes read at a time (a chunk's records are checked together).
CHUNK_BYTES = 8 << 20
#: A record longer than this is not read into memory (its image is referenced in the file).
BIG_RECORD_BYTES = 16 << 20
_HEADER = 12  # length (8) + its CRC (4)
#: Bytes before a record's data (its length and the length's CRC): a record starts at
#: ``Record.offset - RECORD_HEADER``.
RECORD_HEADER = _HEADER
_FRAMING = 16  # header + the data's CRC (4)
_POLY = 0x82F63B78  # CRC-32C (Castagnoli), reflected
_MASK_DELTA = 0xA282EAD8


def _tables() -> np.ndarray:
    """Slicing-by-4 tables: ``T[0]`` is the byte-wise table, ``T[k]`` advances ``k`` bytes
    more."""
    t = np.zeros((4, 256), dtype=np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (_POLY if c & 1 else 0)
        t[0, i] = c
    for k in range(1, 4):
        t[k] = (t[k - 1] >> np.uint32(8)) ^ t[0][t[k - 1] & 0xFF]
    return t


_T = _tables()
_T0, _T1, _T2, _T3 = (_T[k] for k in range(4))
_BYTE_TABLE = [int(v) for v in _T0]


def _raw_rows(rows: np.ndarray) -> np.ndarray:
    """The CRC register after feeding each row of ``rows`` (uint8, ``(n, 4m)``) to a register
    that starts at zero. Leading zero bytes leave a zero register at zero, so rows may be
    left-padded with zeros to a common length."""
    columns = np.ascontiguousarray(np.ascontiguousarray(rows).view("<u4").T)
    reg = np.zeros(rows.shape[0], dtype=np.uint32)
    for word in columns:
        reg ^= word
        reg = (_T3[reg & 0xFF] ^ _T2[(reg >> 8) & 0xFF] ^ _T1[(reg >> 16) & 0xFF]
               ^ _T0[reg >> 24])
    return reg


# -- GF(2) operators: what feeding n zero bytes does to a register (zlib's crc32_combine) --
def _gf2_times(matrix: Sequence[int], vector: int) -> int:
    out, i = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector >>= 1
        i += 1
    return out


def _gf2_square(matrix: Sequence[int]) -> list[int]:
    return [_gf2_times(matrix, matrix[n]) for n in range(32)]


def _powers_of_two_operators() -> list[list[int]]:
    """``[k]``: the 32x32 GF(2) matrix (columns as ints) of feeding ``2**k`` zero bytes."""
    bit = [_POLY] + [1 << (n - 1) for n in range(1, 32)]  # one zero bit
    ops = [_gf2_square(_gf2_square(_gf2_square(bit)))]  # one byte
    for _ in range(63):
        ops.append(_gf2_square(ops[-1]))
    return ops


_ZERO_BYTES = _powers_of_two_operators()


def _advance_zeros(register: int, nbytes: int) -> int:
    k = 0
    while nbytes:
        if nbytes & 1:
            register = _gf2_times(_ZERO_BYTES[k], register)
        nbytes >>= 1
        k += 1
    return register


@lru_cache(maxsize=8192)
def _initial_after(nbytes: int) -> int:
    """What ``nbytes`` zero bytes make of CRC-32C's initial register (record lengths repeat)."""
    return _advance_zeros(0xFFFFFFFF, nbytes)


def _finish(raw_from_zero: int, nbytes: int) -> int:
    """CRC-32C of ``nbytes`` bytes from the register their bytes leave when it starts at 0."""
    return (_initial_after(nbytes) ^ raw_from_zero) ^ 0xFFFFFFFF


def _mask(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def _raw_small(data: bytes, register: int = 0) -> int:
    for b in data:
        register = _BYTE_TABLE[(register ^ b) & 0xFF] ^ (register >> 8)
    return register


_SEGMENTS = 4096


def _raw_long(data: bytes | memoryview, register: int = 0) -> int:
    """The register after ``data``, from ``register``: equal segments at once, then combined."""
    n = len(data)
    seg = (n // _SEGMENTS) & ~3
    if seg < 64:
        return _raw_small(bytes(data), register)
    body = np.frombuffer(data, dtype=np.uint8, count=seg * _SEGMENTS).reshape(_SEGMENTS, seg)
    for part in _raw_rows(body).tolist():
        register = _advance_zeros(register, seg) ^ part
    return _raw_small(bytes(data[seg * _SEGMENTS:]), register)


def crc32c(data: bytes | memoryview) -> int:
    """CRC-32C of ``data`` (numpy by segments for long data, a table for short)."""
    return _raw_long(data, 0xFFFFFFFF) ^ 0xFFFFFFFF


def masked_crc32c(data: bytes | memoryview) -> int:
    """TFRecord's masked CRC-32C of ``data``."""
    return _mask(crc32c(data))


#: Bytes of one batch of rows in :func:`_masked_many` (its padded matrix).
_BATCH_BYTES = 4 << 20
#: A row longer than this is checked alone, by segments (a batch of one is a Python loop).
_LONG_ROW = 64 << 10


def _masked_many(buf: bytes, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Masked CRC-32C of ``buf[s:s+n]`` for each start and length: rows of similar length
    together, left-padded with zeros to a multiple of 4 bytes."""
    out = np.zeros(len(starts), dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    sizes = lengths[order].tolist()
    begins = starts[order].tolist()
    i = 0
    while i < len(order):
        if sizes[i] > _LONG_ROW:  # the rest are long: each by segments
            for r in range(i, len(order)):
                view = memoryview(buf)[begins[r]:begins[r] + sizes[r]]
                out[order[r]] = _mask(crc32c(view))
            break
        # a batch: rows whose lengths are within 25 % (or 64 bytes) of its shortest
        limit = max(sizes[i] * 5 // 4, sizes[i] + 64)
        j = i + 1
        while j < len(order) and sizes[j] <= limit:
            j += 1
        width = -(-sizes[j - 1] // 4) * 4
        j = min(j, i + max(1, _BATCH_BYTES // max(width, 1)))
        matrix = np.zeros((j - i, width), dtype=np.uint8)
        for r in range(j - i):
            n = sizes[i + r]
            if n:
                matrix[r, width - n:] = np.frombuffer(buf, np.uint8, n, begins[i + r])
        raw = _raw_rows(matrix).tolist() if width else [0] * (j - i)
        for r in range(j - i):
            out[order[i + r]] = _mask(_finish(raw[r], sizes[i + r]))
        i = j
    return out


def encode_records(payloads: Sequence[bytes]) -> bytes:
    """TFRecords of ``payloads``, CRCs computed together (for writing synthetic event files:
    TensorBoard's writer computes them in pure Python)."""
    lengths = [struct.pack("<Q", len(p)) for p in payloads]
    heads = b"".join(lengths)
    head_crc = _masked_many(heads, np.arange(len(payloads), dtype=np.int64) * 8,
                            np.full(len(payloads), 8, dtype=np.int64))
    small = [len(p) <= BIG_RECORD_BYTES for p in payloads]
    data = b"".join(p for p, s in zip(payloads, small, strict=True) if s)
    sizes = np.array([len(p) for p, s in zip(payloads, small, strict=True) if s], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if len(sizes) else sizes
    small_crc = iter(_masked_many(data, starts, sizes).tolist())
    out = io.BytesIO()
    for p, head, hcrc, s in zip(payloads, lengths, head_crc.tolist(), small, strict=True):
        dcrc = next(small_crc) if s else masked_crc32c(p)
        out.write(head + struct.pack("<I", hcrc) + p + struct.pack("<I", dcrc))
    return out.getvalue()


@dataclass(frozen=True)
class FileSlice:
    """``length`` bytes at ``offset`` of the file at ``path`` (read only when needed)."""

    path: str
    offset: int
    length: int

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.length)

    def open(self) -> io.BufferedReader:
        """A file object over just these bytes (for a decoder that reads as it goes)."""
        return io.BufferedReader(_SliceIO(self), buffer_size=1 << 20)


class _SliceIO(io.RawIOBase):
    def __init__(self, part: FileSlice) -> None:
        self.part = part
        self.file = open(part.path, "rb")  # noqa: SIM115 - closed with this object
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.part.length}[whence]
        self.pos = max(0, min(base + offset, self.part.length))
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.part.length - self.pos)
        if n <= 0:
            return 0
        self.file.seek(self.part.offset + self.pos)
        got = self.file.readinto(memoryview(buffer)[:n])
        self.pos += got or 0
        return got or 0

    def close(self) -> None:
        self.file.close()
        super().close()


@dataclass(frozen=True)
class Record:
    """One record: its data's offset and length in the file, and the data (``None`` for a
    record longer than :data:`BIG_RECORD_BYTES`: read it with :func:`big_event_summary`)."""

    offset: int
    length: int
    data: bytes | None


class RecordReader:
    """The records of one event file, every CRC checked, up to ``end`` bytes (default: the
    file's size when opened).

    While and after iterating :meth:`records`: ``done`` is the number of bytes of whole, good
    records the caller took (a record is counted once the caller asks for the next one);
    ``damage`` says why reading stopped before ``size`` (``None``: it did not).
    ``advance(n)`` is called as bytes are consumed (a progress bar), for every byte of the
    file, damaged or not.
    """

    def __init__(self, path: str | os.PathLike, advance: Callable[[int], None] | None = None,
                 end: int | None = None, verify: bool = True, start: int = 0) -> None:
        self.path = os.fspath(path)
        self.advance = advance or (lambda n: None)
        self.size = os.stat(self.path).st_size if end is None else end
        self.verify = verify
        self.done = start  # a record boundary: where a range of records the caller kept begins
        self.counted = start
        self.damage: str | None = None

    def _progress(self, n: int) -> None:
        self.counted += n
        self.advance(n)

    def _fail(self, why: str) -> None:
        self.damage = why
        self._progress(self.size - self.counted)

    def records(self) -> Iterator[Record]:
        with open(self.path, "rb") as f:
            f.seek(self.done)
            buf, base = b"", self.done  # base: the file offset of buf[0]
            while self.done < self.size:
                want = min(CHUNK_BYTES, self.size - base - len(buf))
                chunk = f.read(want) if want > 0 else b""
                buf = buf[self.done - base:] + chunk
                base = self.done
                starts, lengths, i, big = [], [], 0, None
                while i + _HEADER <= len(buf):
                    (n,) = struct.unpack_from("<Q", buf, i)
                    if n > BIG_RECORD_BYTES:
                        big = (i, n)
                        break
                    if i + _FRAMING + n > len(buf):
                        break
                    starts.append(i)
                    lengths.append(n)
                    i += _FRAMING + n
                yield from self._checked(buf, base, starts, lengths)
                if self.damage is not None:
                    return
                if big is not None:
                    if not (yield from self._big(f, buf[big[0]:big[0] + _HEADER], base + big[0],
                                                 big[1])):
                        return
                    buf, base = b"", self.done
                    f.seek(base)
                elif not chunk and self.done < self.size:
                    # the bytes left cannot make a whole record
                    rest = buf[self.done - base:]
                    if len(rest) >= _HEADER and not self._header_ok(rest):
                        self._fail(f"the record at byte {self.done} fails its length's CRC "
                                   "check")
                    else:
                        self._fail(f"the record at byte {self.done} is cut short (truncated "
                                   "file)")
                    return

    def _header_ok(self, header: bytes) -> bool:
        return not self.verify or _mask(crc32c(header[:8])) == struct.unpack_from(
            "<I", header, 8)[0]

    def _checked(self, buf: bytes, base: int, starts: list[int],
                 lengths: list[int]) -> Iterator[Record]:
        if not starts:
            return
        good, why = len(starts), ""
        if self.verify:
            s = np.array(starts, dtype=np.int64)
            n = np.array(lengths, dtype=np.int64)
            whole = np.frombuffer(buf, dtype=np.uint8)
            four = np.arange(4)

            def stored(at: np.ndarray) -> np.ndarray:
                return np.ascontiguousarray(whole[at[:, None] + four]).view("<u4")[:, 0]

            head_ok = _masked_many(buf, s, np.full(len(s), 8, dtype=np.int64)) == stored(s + 8)
            data_ok = _masked_many(buf, s + _HEADER, n) == stored(s + _HEADER + n)
            failed = np.flatnonzero(~(head_ok & data_ok))
            if len(failed):
                good = int(failed[0])
                why = "fails its length's CRC check" if not head_ok[good] else (
                    "fails its CRC check")
        for k in range(good):
            i, length = starts[k], lengths[k]
            self._progress(_FRAMING + length)
            yield Record(base + i + _HEADER, length, buf[i + _HEADER:i + _HEADER + length])
            self.done = base + i + _FRAMING + length  # once its reader is done with it
        if good < len(starts):
            self._fail(f"the record at byte {self.done} {why}")

    def _big(self, f, header: bytes, at: int, length: int) -> Iterator[Record]:
        """A record too long to hold: checked by segments of the file, yielded without its
        data. Returns whether reading may go on."""
        if not self._header_ok(header):
            self._fail(f"the record at byte {at} fails its length's CRC check")
            return False
        if at + _FRAMING + length > self.size:
            self._fail(f"the record at byte {at} is cut short (truncated file)")
            return False
        if self.verify:
            register, left = 0xFFFFFFFF, length
            f.seek(at + _HEADER)
            while left:
                piece = f.read(min(left, 16 << 20))
                if not piece:
                    break
                register = _raw_long(piece, register)
                left -= len(piece)
                self._progress(len(piece))
            stored = f.read(4)
            if left or len(stored) < 4 or _mask(register ^ 0xFFFFFFFF) != struct.unpack(
                    "<I", stored)[0]:
                self._fail(f"the record at byte {at} fails its CRC check")
                return False
            self._progress(_FRAMING)
        else:
            self._progress(_FRAMING + length)
        yield Record(at + _HEADER, length, None)
        self.done = at + _FRAMING + length
        return True


# -- a protocol buffer walked in the file, for records too big to hold ------------------------
def _varint(f) -> int:
    shift = result = 0
    while True:
        b = f.read(1)
        if not b:
            raise EOFError("record ends inside a varint")
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7


def _fields(f, end: int) -> Iterator[tuple[int, int, int]]:
    """``(field number, wire type, value)`` up to file offset ``end``; for a length-delimited
    field the value is its length and the file stands at its first byte (the caller reads or
    skips it)."""
    while f.tell() < end:
        key = _varint(f)
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, wire, _varint(f)
        elif wire == 1:
            yield number, wire, struct.unpack("<Q", f.read(8))[0]
        elif wire == 5:
            yield number, wire, struct.unpack("<I", f.read(4))[0]
        elif wire == 2:
            length = _varint(f)
            start = f.tell()
            yield number, wire, length
            f.seek(start + length)
        else:
            raise ValueError(f"unsupported wire type {wire}")


#: A field of a value held in memory only up to this size (a tag, metadata, a text).
_SMALL_FIELD = 1 << 20


@dataclass
class BigValue:
    """One ``Summary.Value`` of a big record, as far as the report reads it."""

    tag: str = ""
    simple_value: float | None = None
    image: tuple[int, int, FileSlice] | None = None  # width, height, encoded bytes
    metadata: bytes | None = None
    tensor: bytes | None = None
    skipped: str = ""  # what was too big to read


def big_event_summary(path: str, offset: int, length: int) -> tuple[int, list[BigValue]]:
    """``(step, values)`` of the ``Event`` record at ``offset`` (``length`` bytes), walked in
    the file: an image's bytes stay there (a :class:`FileSlice`)."""
    step, values = 0, []
    with open(path, "rb") as raw:
        f = io.BufferedReader(raw, buffer_size=1 << 16)
        f.seek(offset)
        for number, wire, value in _fields(f, offset + length):
            if number == 2 and wire == 0:
                step = value - (1 << 64) if value >= 1 << 63 else value
            elif number == 5 and wire == 2:
                summary_end = f.tell() + value
                for n2, w2, v2 in _fields(f, summary_end):
                    if n2 == 1 and w2 == 2:
                        values.append(_big_value(f, path, f.tell() + v2))
    return step, values


def _big_value(f, path: str, end: int) -> BigValue:
    out = BigValue()
    for number, wire, value in _fields(f, end):
        if number == 1 and wire == 2:
            out.tag = f.read(min(value, _SMALL_FIELD)).decode("utf-8", "replace")
        elif number == 2 and wire == 5:
            out.simple_value = struct.unpack("<f", struct.pack("<I", value))[0]
        elif number == 4 and wire == 2:
            width = height = 0
            encoded = None
            for n2, w2, v2 in _fields(f, f.tell() + value):
                if n2 == 1 and w2 == 0:
                    height = v2
                elif n2 == 2 and w2 == 0:
                    width = v2
                elif n2 == 4 and w2 == 2:
                    encoded = FileSlice(path, f.tell(), v2)
            if encoded is not None:
                out.image = (width, height, encoded)
        elif number in (8, 9) and wire == 2:
            if value > _SMALL_FIELD:
                out.skipped = f"a {'text' if number == 8 else 'metadata'} of {value} bytes"
                continue
            data = f.read(value)
            if number == 8:
                out.tensor = data
            else:
                out.metadata = data
    return out
