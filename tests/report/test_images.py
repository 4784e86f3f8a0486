"""Images at the size the page shows them: a large PNG decoded a strip of rows at a time,
the same pixels as Pillow's thumbnail of the whole image."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import lightning_attn.report.images as images
from lightning_attn.report.reading import ImageRecord


def _png(mode: str, width: int, height: int, **save) -> bytes:
    rng = np.random.default_rng(0)
    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    # structure and noise, so that the encoder picks every filter type
    ramp = (np.arange(width)[None, :] * 3 + np.arange(height)[:, None]) % 256
    pixels = (ramp[..., None] // 2 + rng.integers(0, 128, (height, width, channels))) % 256
    im = Image.fromarray(pixels.astype(np.uint8).squeeze(), mode)
    out = io.BytesIO()
    im.save(out, format="PNG", **save)
    return out.getvalue()


@pytest.mark.parametrize(("mode", "width", "height"), [
    ("RGB", 3001, 2003), ("L", 2500, 1701), ("LA", 1300, 2900), ("RGBA", 2600, 999)])
def test_a_large_png_is_shrunk_strip_by_strip_to_the_pixels_of_a_whole_thumbnail(
        monkeypatch, mode, width, height):
    monkeypatch.setattr(images, "STRIP_BYTES", 400_000)  # many strips
    strips = []
    real = images._strip

    def strip(*args):
        strips.append(args[-1])
        return real(*args)

    monkeypatch.setattr(images, "_strip", strip)
    png = _png(mode, width, height)
    got, why = images.shown_image(ImageRecord(0, width, height, png))
    assert why == "" and got is not None
    expected = Image.open(io.BytesIO(png))
    expected.thumbnail((images.SHOWN_WIDTH, images.SHOWN_HEIGHT), Image.Resampling.LANCZOS,
                       reducing_gap=2.0)
    shown = Image.open(io.BytesIO(got))
    assert shown.size == expected.size and shown.mode == expected.mode
    assert np.array_equal(np.asarray(shown), np.asarray(expected))
    assert len(strips) > 5 and max(strips) < height / 5  # never the whole image at once


def test_a_small_image_is_shown_as_it_is():
    png = _png("RGB", 64, 48)
    assert images.shown_image(ImageRecord(0, 64, 48, png)) == (png, "")


def test_what_cannot_be_read_in_strips_is_decoded_whole_within_a_bound(monkeypatch):
    im = Image.open(io.BytesIO(_png("RGB", 1500, 900)))
    out = io.BytesIO()
    im.save(out, format="JPEG")  # not a PNG: Pillow decodes it whole
    jpeg = out.getvalue()
    got, why = images.shown_image(ImageRecord(0, 1500, 900, jpeg))
    assert why == "" and Image.open(io.BytesIO(got)).size == (1200, 720)
    monkeypatch.setattr(images, "IMAGE_DECODE_BYTES", 1_000_000)
    got, why = images.shown_image(ImageRecord(0, 1500, 900, jpeg))
    assert got is None and "1500x900 pixels would take" in why
    got, why = images.shown_image(ImageRecord(0, 9, 9, b"\x89PNG\r\n\x1a\n broken"))
    assert got is None and why.startswith("cannot decode it")
