"""A logged image at the size the page shows it, decoded in bounded memory.

An attention-map grid is small, and is shown as it is, byte for byte. A large image (a
200 MB PNG of a wide grid) is never held whole: its encoded bytes are read from the event
file as they are needed (:class:`~.records.FileSlice`), and a non-interlaced PNG is decoded
in strips of rows. Each strip's filtered rows are inflated with :mod:`zlib`, wrapped in a
small PNG of their own (after the last decoded row of the strip before, stored with filter
type 0, which the first row's filter refers to) for Pillow to unfilter, and shrunk by an
integer factor with a box filter before the next strip is read: the same pixels as shrinking
the whole image, in the memory of a strip. The shrunk image is then resized to fit the
box the page shows it in, as Pillow's ``thumbnail`` does. Other images (an interlaced PNG, a
JPEG) are decoded by Pillow whole when their pixels take at most
:data:`IMAGE_DECODE_BYTES`, and left out (said on the page) beyond.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Iterator
from typing import BinaryIO

from .reading import ImageRecord

__all__ = ["IMAGE_DECODE_BYTES", "SHOWN_HEIGHT", "SHOWN_WIDTH", "shown_image"]

#: The largest box an image is shown in on the page (see ``page._map_width``).
SHOWN_WIDTH, SHOWN_HEIGHT = 1200, 820
#: Pixels decoded whole by Pillow (an image it cannot decode in strips) at most.
IMAGE_DECODE_BYTES = 256 << 20
#: Decoded bytes of one strip of rows.
STRIP_BYTES = 8 << 20
_PNG = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel


def shown_image(image: ImageRecord) -> tuple[bytes | None, str]:
    """``(PNG, "")`` of ``image`` within :data:`SHOWN_WIDTH` x :data:`SHOWN_HEIGHT` pixels (a
    smaller one as it is, byte for byte), or ``(None, why)`` when it cannot be shown."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # the decoded size is bounded here (strips, or IMAGE_DECODE_BYTES)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with image.open() as f:
                head = _png_header(f)
                f.seek(0)
                if head is not None:
                    width, height = head[0], head[1]
                    if width <= SHOWN_WIDTH and height <= SHOWN_HEIGHT:
                        return image.encoded, ""
                    if head[2] == 8 and head[4] == 0:  # 8-bit, not interlaced
                        return _encoded(_png_shrunk(f, head)), ""
                return _whole(f)
    except (OSError, UnidentifiedImageError, ValueError, zlib.error, struct.error,
            Image.DecompressionBombError) as err:
        return None, f"cannot decode it ({type(err).__name__}: {err})"


def _encoded(im) -> bytes:
    out = io.BytesIO()
    im.save(out, format="PNG")
    return out.getvalue()


def _whole(f: BinaryIO) -> tuple[bytes | None, str]:
    from PIL import Image

    with Image.open(f) as im:
        width, height = im.size
        if width <= SHOWN_WIDTH and height <= SHOWN_HEIGHT:
            f.seek(0)
            return f.read(), ""
        size = width * height * len(im.getbands())
        if size > IMAGE_DECODE_BYTES:
            return None, (f"{width}x{height} pixels would take {size / 2**20:.0f} MB to decode "
                          f"(more than {IMAGE_DECODE_BYTES >> 20} MB), and it is not a PNG "
                          "that can be read in strips")
        im.thumbnail((SHOWN_WIDTH, SHOWN_HEIGHT), Image.Resampling.LANCZOS, reducing_gap=2.0)
        return _encoded(im), ""


# -- PNG in strips ---------------------------------------------------------------------------
def _chunks(f: BinaryIO) -> Iterator[tuple[bytes, int]]:
    """``(type, length)`` of each chunk, the file at its data (the caller reads it or not)."""
    while True:
        head = f.read(8)
        if len(head) < 8:
            return
        length, kind = struct.unpack(">I4s", head)
        start = f.tell()
        yield kind, length
        f.seek(start + length + 4)  # data, CRC
        if kind == b"IEND":
            return


def _png_header(f: BinaryIO) -> tuple[int, int, int, int, int] | None:
    """``(width, height, bit depth, colour type, interlace)`` of a PNG, else ``None``."""
    if f.read(8) != _PNG:
        return None
    for kind, length in _chunks(f):
        if kind == b"IHDR" and length >= 13:
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", f.read(13))
            if colour not in _CHANNELS:
                return None
            return width, height, depth, colour, interlace
        return None
    return None


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_shrunk(f: BinaryIO, head: tuple[int, int, int, int, int]):
    """The 8-bit, non-interlaced PNG at ``f`` shrunk to fit the shown box (as Pillow's
    ``thumbnail`` with ``reducing_gap=2`` shrinks it), decoded a strip of rows at a time."""
    from PIL import Image

    width, height, depth, colour, _ = head
    row_bytes = 1 + width * _CHANNELS[colour]
    # shrink by an integer factor first, to no less than twice the box, then resize to fit
    scale = min(SHOWN_WIDTH / width, SHOWN_HEIGHT / height)
    factor = max(1, int(1 / (2 * scale)))
    rows = max(factor, STRIP_BYTES // (row_bytes * 4) // factor * factor)
    f.read(8)
    extra = []  # PLTE and tRNS: every strip needs the palette
    inflate = zlib.decompressobj()

    def inflated() -> Iterator[bytes]:
        for kind, length in _chunks(f):
            if kind in (b"PLTE", b"tRNS"):
                extra.append(_chunk(kind, f.read(length)))
            elif kind == b"IDAT":
                left = length
                while left:
                    piece = f.read(min(left, 1 << 20))
                    if not piece:
                        raise ValueError("the PNG ends inside an IDAT chunk")
                    left -= len(piece)
                    yield inflate.decompress(piece, rows * row_bytes)
                    while inflate.unconsumed_tail:
                        yield inflate.decompress(inflate.unconsumed_tail, rows * row_bytes)
        yield inflate.flush()

    pending, previous, shrunk, done = b"", bytes(row_bytes), [], 0
    for data in inflated():
        pending += data
        while done < height and (len(pending) >= rows * row_bytes or (
                len(pending) >= (height - done) * row_bytes)):
            n = min(rows, height - done)
            block, pending = pending[:n * row_bytes], pending[n * row_bytes:]
            strip, last = _strip(width, colour, b"".join(extra), previous, block, n)
            previous = b"\x00" + last
            shrunk.append(strip.reduce(factor) if factor > 1 else strip)
            done += n
    if done < height:
        raise ValueError(f"the PNG holds {done} of its {height} rows")
    out = Image.new(shrunk[0].mode, (shrunk[0].width, sum(s.height for s in shrunk)))
    y = 0
    for s in shrunk:
        out.paste(s, (0, y))
        y += s.height
    out.thumbnail((SHOWN_WIDTH, SHOWN_HEIGHT), Image.Resampling.LANCZOS, reducing_gap=2.0)
    return out


def _strip(width: int, colour: int, extra: bytes, previous: bytes, block: bytes, n: int):
    """``n`` filtered rows (``block``) below ``previous`` (the raw row above them, filter
    type 0), unfiltered by Pillow from a PNG of these ``n + 1`` rows: ``(image of the n rows
    in a mode that shrinks, the raw bytes of the last row)``."""
    from PIL import Image

    png = (_PNG + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, n + 1, 8, colour, 0, 0, 0))
           + extra + _chunk(b"IDAT", zlib.compress(previous + block, 0)) + _chunk(b"IEND", b""))
    with Image.open(io.BytesIO(png)) as im:
        im.load()
        raw = im.tobytes()  # 8-bit samples: the PNG's raw rows
        last = raw[-(len(previous) - 1):]
        rows = im.crop((0, 1, width, n + 1))
        if rows.mode == "P":
            rows = rows.convert("RGBA" if "transparency" in im.info else "RGB")
        return rows, last
