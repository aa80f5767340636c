"""The parts of an encoded image Pillow reads in Python are bounded before it reads them
(``service/inference/image_headers.py``): at the limits an image decodes as before, over them it
is refused naming the field, and files as encoders write them (an ICC profile, EXIF, progressive
scans, XMP) are untouched."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from service.errors import InvalidInput, PayloadTooLarge
from service.inference import image_headers as headers
from service.inference import vision
from service.inference.vision import decode_image
from tests.service.inference.test_vision import LIMIT, encoded, grey, rgb, spec, with_scans


def refused(data: bytes, mode: str, message: str) -> None:
    """``data`` refused on every path: the loop's, the thread's (``decode_resized``); and never
    walked on the loop past a few kB (``decode_cost`` reads it as 0, decoded where it is refused
    at once, or it is over ``INLINE_BYTES``, for a thread)."""
    with pytest.raises(PayloadTooLarge, match=message):
        decode_image(data, LIMIT, mode, "file")
    with pytest.raises(PayloadTooLarge, match=message):
        vision.decode_resized(data, LIMIT, spec(1 if mode == "L" else 3), "file")
    assert len(data) > vision.INLINE_BYTES or vision.decode_cost(data) == 0


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_jpegs_of_a_few_scans_decode_and_many_scans_are_refused_before_decoding(mode: str) -> None:
    image = grey((64, 64)) if mode == "L" else rgb((64, 64))
    progressive = encoded(image, "JPEG", progressive=True)
    assert progressive.count(b"\xff\xda") == (6 if mode == "L" else 10)  # libjpeg's scripts
    pillows = np.asarray(Image.open(io.BytesIO(progressive)).convert(mode))
    assert np.array_equal(decode_image(progressive, LIMIT, mode), pillows)
    scans = progressive.count(b"\xff\xda")
    at_limit = with_scans(progressive, headers.MAX_JPEG_SCANS - scans)
    decode_image(at_limit, LIMIT, mode)  # libjpeg warns of the repeated scans, and decodes
    over = with_scans(progressive, 5_000 - scans)
    with pytest.raises(PayloadTooLarge, match=r"^file: a JPEG of 5000 scans, over the limit of 100$"):
        decode_image(over, LIMIT, mode, "file")


def segment(marker: int, payload: bytes) -> bytes:
    """A JPEG segment: FF, the marker, its length (two bytes, itself included), ``payload``."""
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def with_header(jpeg: bytes, extra: bytes) -> bytes:
    """``jpeg`` with ``extra`` right after its start-of-image marker."""
    return jpeg[:2] + extra + jpeg[2:]


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_jpegs_of_many_segments_or_stray_bytes_before_the_scan_are_refused_before_pillow_reads_them(
    mode: str,
) -> None:
    """Pillow reads a JPEG's header in Python, a segment, a stray byte or a table at a time: 8 MB
    of empty APP1 segments took 5.4 s, of fill bytes 5 s, of quantisation tables 1.1 s. At the
    limits a JPEG decodes; over them it is refused, and a JPEG with an ICC profile of 4 segments
    and EXIF decodes as before."""
    plain = encoded(grey((16, 16)) if mode == "L" else rgb((16, 16)), "JPEG")
    want = np.asarray(Image.open(io.BytesIO(plain)).convert(mode))
    empty_com, limit = segment(0xFE, b""), headers.MAX_JPEG_SEGMENTS
    segments = plain.count(b"\xff\xdb") + plain.count(b"\xff\xc4") + 2  # DQT, DHT, APP0, SOF0
    at_limit = with_header(plain, empty_com * (limit - segments))
    assert np.array_equal(decode_image(at_limit, LIMIT, mode), want)
    assert np.array_equal(decode_image(with_header(plain, b"\xff" * 4096), LIMIT, mode), want)
    refusals = {
        "segments": [
            with_header(plain, empty_com * (limit - segments + 1)),
            with_header(plain, segment(0xE1, b"") * 2_000_000),
            with_header(plain, b"\xff\xd8" * 100_000),  # markers without a length count too
        ],
        "bytes of tables and Photoshop resources": [
            with_header(plain, segment(0xDB, (b"\x00" + bytes(range(1, 65))) * 1000) * 5),
            with_header(plain, segment(0xED, b"Photoshop 3.0\x00" + b"8BIM\x04\x04" + bytes(12) * 5000) * 5),
        ],
        "bytes outside its segments": [
            with_header(plain, b"\xff" * 4097), with_header(plain, b"\xff" * 8_000_000),
            plain[:20] + b"\x00" * 5000 + plain[20:],  # junk after APP0
        ],
    }  # fmt: skip
    for what, files in refusals.items():
        for data in files:
            refused(
                data, mode, rf"^file: a JPEG of more than \d+ {what} before its first scan \(the limit\)$"
            )
    exif = Image.Exif()
    exif[0x010E] = "a description " * 100
    rich = encoded(rgb((16, 16)), "JPEG", icc_profile=bytes(range(256)) * 800, exif=exif)
    assert rich.count(b"\xff\xe2") >= 4  # 204,800 bytes of ICC: APP2 segments of 64 kB
    decode_image(rich, LIMIT, mode)


def chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_of(pixels: np.ndarray, before: bytes = b"", idat_size: int = 1 << 20) -> bytes:
    """An 8-bit grey PNG of ``pixels``, ``before`` its image data, in IDAT chunks of ``idat_size``."""
    height, width = pixels.shape
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    data = zlib.compress(b"".join(b"\x00" + row.tobytes() for row in pixels))
    idats = b"".join(chunk(b"IDAT", data[i : i + idat_size]) for i in range(0, len(data), idat_size))
    return headers.PNG_SIGNATURE + ihdr + before + idats + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [64, 300])  # libspng's path, Pillow's
def test_pngs_of_many_chunks_are_refused_before_pillow_reads_them(side: int) -> None:
    """Pillow reads each chunk's header in Python: 600,000 unknown chunks (7 MB) took 5.2 s."""
    pixels = np.random.default_rng(1).integers(0, 256, (side, side), dtype=np.uint8)
    text = chunk(b"tEXt", b"k\x00v")
    at_limit = png_of(pixels, text * (headers.MAX_PNG_CHUNKS - 2))  # with IHDR and IEND
    assert np.array_equal(decode_image(at_limit, LIMIT, "L"), pixels)
    refused(png_of(pixels, text * (headers.MAX_PNG_CHUNKS - 1)), "L",
            r"^file: a PNG of more than 1000 chunks besides IDAT \(the limit\)$")  # fmt: skip
    refused(png_of(pixels, chunk(b"zzZz", b"") * 600_000), "L", r"chunks besides IDAT")


def test_pngs_of_many_image_data_chunks_are_refused() -> None:
    """160 × 160 noise compresses to ≈ 25.7 kB: IDAT chunks of 2 bytes (12,900) decode, of 1 byte
    (25,700) are over the limit."""
    pixels = np.random.default_rng(3).integers(0, 256, (160, 160), dtype=np.uint8)
    assert np.array_equal(decode_image(png_of(pixels, idat_size=2), LIMIT, "L"), pixels)
    refused(png_of(pixels, idat_size=1), "L", r"^file: a PNG of more than 20000 IDAT chunks \(the limit\)$")


def gif_with(before_image: bytes) -> bytes:
    """A 4×4 GIF with ``before_image`` between its global colour table and its image."""
    gif = encoded(Image.new("L", (4, 4), 9), "GIF")
    at = gif.index(b",", 13 + (3 << ((gif[10] & 7) + 1)))
    return gif[:at] + before_image + gif[at:]


def test_gifs_of_many_blocks_before_the_image_are_refused_before_pillow_reads_them() -> None:
    """Pillow reads a GIF's extensions a sub-block, and stray bytes a byte, at a time in Python:
    8 MB of comment sub-blocks took 1.5 s."""
    want = np.full((4, 4), 9, np.uint8)
    comment = b"!\xfe" + b"\x01x" * (headers.MAX_GIF_BLOCKS - 1) + b"\x00"  # sub-blocks and the end
    assert np.array_equal(decode_image(gif_with(comment), LIMIT, "L"), want)
    xmp = b"!\xff\x0bXMP DataXMP" + b"<x:xmpmeta/>" * 100 + bytes([1, *range(255, -1, -1), 0])
    assert np.array_equal(decode_image(gif_with(xmp), LIMIT, "L"), want)  # Adobe's trailer
    message = r"^file: a GIF of more than 4096 blocks before its first image \(the limit\)$"
    refused(gif_with(b"!\xfe" + b"\x01x" * headers.MAX_GIF_BLOCKS + b"\x00"), "L", message)
    refused(gif_with(b"!\xfe" + b"\x01x" * 4_000_000 + b"\x00"), "L", message)
    refused(gif_with(b"\x00" * 5000), "L", message)  # stray bytes, skipped one by one


def test_netpbm_headers_are_bounded_and_plain_netpbm_refused() -> None:
    """Pillow reads a Netpbm header a byte at a time, comments without a bound (8 MB: 4.6 s), and
    decodes plain (ASCII) Netpbm in Python (≈ 3 s for 8 MB)."""
    pixels = np.random.default_rng(2).integers(0, 256, (64, 64), dtype=np.uint8)
    binary = encoded(Image.fromarray(pixels), "PPM")
    assert binary.startswith(b"P5") and np.array_equal(decode_image(binary, LIMIT, "L"), pixels)
    commented = b"P5\n# " + b"x" * 4000 + b"\n64 64\n255\n" + pixels.tobytes()
    assert np.array_equal(decode_image(commented, LIMIT, "L"), pixels)
    long = b"P5\n# " + b"x" * 8_000_000 + b"\n64 64\n255\n" + pixels.tobytes()
    refused(long, "L", r"^file: a Netpbm header not within its first 4096 bytes \(the limit\)$")
    for plain in (b"P2\n64 64\n255\n" + b"7 " * 4096, b"P1\n64 64\n" + b"0" * 4096):
        with pytest.raises(InvalidInput, match=r"^file: plain \(ASCII\) Netpbm is not accepted"):
            decode_image(plain, LIMIT, "L", "file")
