"""Hostile image files for `aot run/validate --image`: decompression bombs, absurd declared sizes,
truncated and animated files, odd pixel modes, and random bytes behind real magic numbers. Each is
one ImageError (exit 14) naming the file, decided from the header before pixels are decoded, inside
a bounded amount of memory; a readable still image in any mode preprocesses."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from aot.errors import ImageError
from aot.families.vision.image import ImageSpec
from aot.runner.mllama import load_image

SPEC = ImageSpec(tile_size=16, max_tiles=4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), rescale_factor=1 / 255,
                 resample="bilinear")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_claiming(width: int, height: int, body: bytes = b"") -> bytes:
    """A PNG whose header (with a valid CRC) claims width x height; `body` as its compressed data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def _zlib_bomb(width: int, rows: int) -> bytes:
    """Rows of zeros, compressed: ~1000x smaller than they decode to."""
    c = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * width)
    return b"".join(c.compress(row) for _ in range(rows)) + c.flush()


def _jpeg_claiming(width: int, height: int) -> bytes:
    good = io.BytesIO()
    Image.new("RGB", (8, 8)).save(good, "JPEG")
    raw = bytearray(good.getvalue())
    sof = raw.find(b"\xff\xc0")
    raw[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(raw)


def _animated(fmt: str) -> bytes:
    out = io.BytesIO()
    frames = [Image.new("RGB", (32, 32), (i * 40, 0, 0)) for i in range(5)]
    frames[0].save(out, fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return out.getvalue()


def _still(mode: str, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (40, 24)).save(out, fmt)
    return out.getvalue()


def _tiff_claiming(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (8, 8)).save(out, "TIFF")
    raw = bytearray(out.getvalue())
    # patch ImageWidth (256) and ImageLength (257) entries of the first IFD (little-endian)
    (ifd,) = struct.unpack("<I", raw[4:8])
    (count,) = struct.unpack("<H", raw[ifd:ifd + 2])
    for i in range(count):
        at = ifd + 2 + 12 * i
        tag, kind = struct.unpack("<HH", raw[at:at + 4])
        if tag in (256, 257):
            raw[at + 2:at + 4] = struct.pack("<H", 4)  # LONG
            raw[at + 8:at + 12] = struct.pack("<I", width if tag == 256 else height)
    return bytes(raw)


HOSTILE = {
    "PNG claiming 2^31 x 2^31": (_png_claiming(2**31 - 1, 2**31 - 1), "pixels"),
    "PNG claiming 100000 x 100000": (_png_claiming(100_000, 100_000, _zlib_bomb(100_000, 50)), "pixels"),
    "PNG zlib bomb just past the cap": (_png_claiming(9000, 9000, _zlib_bomb(9000, 9000)), "pixels"),
    "PNG claiming 0 x 0": (_png_claiming(0, 0), "test.img"),
    "PNG truncated after its header": (_png_claiming(64, 64)[:40], "test.img"),
    "PNG with a bad CRC": (_png_claiming(64, 64).replace(b"IHDR", b"IHDr"), "test.img"),
    "JPEG claiming 65535 x 65535": (_jpeg_claiming(65535, 65535), "pixels"),
    "JPEG truncated": (_still("RGB", "JPEG")[:200], "test.img"),
    "TIFF claiming 2^32-1 x 2^32-1": (_tiff_claiming(2**32 - 1, 2**32 - 1), "test.img"),
    "animated GIF": (_animated("GIF"), "animated"),
    "animated PNG": (_animated("PNG"), "animated"),
    "animated WebP": (_animated("WEBP"), "animated"),
    "a GIF header only": (b"GIF89a" + b"\xff\xff\xff\xff" + b"\0" * 10, "test.img"),
    "an SVG (text)": (b"<svg xmlns='http://www.w3.org/2000/svg' width='1e9' height='1e9'/>", "not an image"),
    "empty": (b"", "empty"),
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_images_are_one_line_and_exit_14(tmp_path, case):
    raw, needle = HOSTILE[case]
    tracemalloc.start()
    with pytest.raises(ImageError) as e:
        load_image(_write(tmp_path, raw), SPEC)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    message = str(e.value)
    assert e.value.exit_code == 14
    assert needle in message and "test.img" in message and "\n" not in message and len(message) < 600, message
    assert peak < 64 << 20, (case, peak >> 20)  # refused from the header, before the pixels are decoded


def _write(tmp_path, raw: bytes):
    path = tmp_path / "test.img"
    path.write_bytes(raw)
    return path


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I", "I;16", "F", "YCbCr",
                                  "LAB", "HSV", "La", "RGBa"])
def test_still_images_in_any_mode_preprocess_or_are_refused_in_one_line(tmp_path, mode):
    image = Image.new(mode, (40, 24))
    for fmt in ("PNG", "TIFF", "WEBP", "JPEG", "BMP", "GIF"):
        out = io.BytesIO()
        try:
            image.save(out, fmt)
        except (OSError, ValueError, KeyError):
            continue  # pillow cannot write this mode in this format
        try:
            got = load_image(_write(tmp_path, out.getvalue()), SPEC)
        except ImageError as e:
            assert "\n" not in str(e), (mode, fmt)
            continue
        assert got["pixel_values"].shape[-1] == 16 and got["num_tiles"] >= 1, (mode, fmt)


MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"RIFF\0\0\0\0WEBP", b"II*\0", b"MM\0*", b"BM", b"\0\0\1\0",
         b"P6\n", b"8BPS", b"\x00\x00\x00\x0cjP  "]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(magic=st.sampled_from(MAGIC), body=st.binary(max_size=600), cut=st.integers(0, 2000))
def test_random_bytes_behind_a_real_magic_number(tmp_path, magic, body, cut):
    """Fuzzed: any bytes after a format's magic number decode (a valid still image) or are one
    ImageError; never another exception."""
    raw = (magic + body)[: max(cut, 1)]
    try:
        load_image(_write(tmp_path, raw), SPEC)
    except ImageError as e:
        assert "\n" not in str(e)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
       fmt=st.sampled_from(["PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP"]))
def test_real_images_with_flipped_bytes(tmp_path, flips, fmt):
    raw = bytearray(_still("RGB", fmt))
    for at, value in flips:
        raw[at % len(raw)] = value
    try:
        load_image(_write(tmp_path, bytes(raw)), SPEC)
    except ImageError as e:
        assert "\n" not in str(e)
