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
        "bytes of tables, EXIF and Photoshop resources": [
            with_header(plain, segment(0xE1, b"Exif\0\0" + bytes(8100)) * 990),  # joined quadratically
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
    at_limit = png_of(pixels, text * (headers.MAX_PNG_CHUNKS - 1))  # with IHDR
    assert np.array_equal(decode_image(at_limit, LIMIT, "L"), pixels)
    refused(png_of(pixels, text * headers.MAX_PNG_CHUNKS), "L",
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


def test_netpbm_headers_are_bounded() -> None:
    """Pillow reads a Netpbm header a byte at a time, comments without a bound (8 MB: 4.6 s)."""
    pixels = np.random.default_rng(2).integers(0, 256, (64, 64), dtype=np.uint8)
    binary = encoded(Image.fromarray(pixels), "PPM")
    assert binary.startswith(b"P5") and np.array_equal(decode_image(binary, LIMIT, "L"), pixels)
    commented = b"P5\n# " + b"x" * 4000 + b"\n64 64\n255\n" + pixels.tobytes()
    assert np.array_equal(decode_image(commented, LIMIT, "L"), pixels)
    long = b"P5\n# " + b"x" * 8_000_000 + b"\n64 64\n255\n" + pixels.tobytes()
    refused(long, "L", r"^file: a Netpbm header not within its first 4096 bytes \(the limit\)$")


def rle4_bmp(side: int) -> bytes:
    """A 4-bit run-length BMP of ``side`` × ``side`` whose every row is one pixel and an end of
    line: Pillow pads the rest of the row a byte at a time, in Python."""
    palette = bytes(64)
    pixels = b"\x01\x00\x00\x00" * side + b"\x00\x01"
    header = struct.pack("<IiiHHIIiiII", 40, side, side, 1, 4, 2, len(pixels), 2835, 2835, 16, 0)
    offset = 14 + len(header) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + header + palette + pixels


@pytest.mark.parametrize(
    ("data", "codec"),
    [
        (b"P2\n64 64\n255\n" + b"7 " * 4096, "ppm_plain"),  # plain (ASCII) Netpbm
        (b"P1\n64 64\n" + b"0" * 4096, "ppm_plain"),
        (b"P5\n1024 1024\n254\n" + bytes(1024 * 1024), "ppm"),  # a maximum other than 255
        (rle4_bmp(4096), "bmp_rle"),  # 16.5 kB: 2.9 s in Pillow
    ],
)
def test_images_pillow_decodes_in_python_are_refused(data: bytes, codec: str) -> None:
    """A decoder Pillow writes in Python holds the interpreter lock for every pixel: a thread does
    not free the event loop from it."""
    with Image.open(io.BytesIO(data)) as image:
        assert image.tile[0][0] == codec
    for call in (
        lambda: decode_image(data, LIMIT, "L", "file"),
        lambda: vision.decode_resized(data, LIMIT, spec(1), "file"),
    ):
        with pytest.raises(
            InvalidInput, match=rf"^file: this .* image would be decoded in Python by Pillow \({codec}\)"
        ):
            call()


def test_only_the_formats_read_are_opened() -> None:
    """Pillow's other plugins never parse what a client sends (an 8 MB FITS header: 0.4 s)."""
    fits = b"SIMPLE  =                    T" + b" " * 50 + b"END" + b" " * 77
    with pytest.raises(
        InvalidInput, match=r"^file: not a decodable image \(UnidentifiedImageError; formats read: PNG, JPEG"
    ):
        decode_image(fits + bytes(2880 - len(fits)), LIMIT, "L", "file")


def test_animated_pngs_are_walked_as_far_as_pillow_reads_them() -> None:
    """Pillow reads an animated PNG's first frame, up to the next frame's fcTL: 600 frames (1,199
    more chunks) decode as its first."""
    rng = np.random.default_rng(4)
    frames = [Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)) for _ in range(600)]
    data = encoded(frames[0], "PNG", save_all=True, append_images=frames[1:])
    assert data.count(b"fcTL") == 600 and len(data) > 12 * headers.MAX_PNG_CHUNKS
    assert np.array_equal(decode_image(data, LIMIT, "L"), np.asarray(frames[0]))


def test_pngs_of_many_compressed_metadata_chunks_are_refused() -> None:
    """Pillow inflates each iCCP, zTXt and iTXt chunk, up to 1 MB each (990 iCCP chunks of 1 MB
    in a 1 MB file: 5 s)."""
    pixels = np.random.default_rng(5).integers(0, 256, (120, 120), dtype=np.uint8)
    profile = chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(bytes(1 << 20)))
    one = png_of(pixels, profile)
    assert np.array_equal(decode_image(one, LIMIT, "L"), pixels)
    many = png_of(pixels, profile * (headers.MAX_PNG_COMPRESSED_CHUNKS + 1))
    refused(many, "L", r"^file: a PNG of more than 16 compressed metadata chunks \(the limit\)$")


def tiff_of(entries: list[tuple[int, int, int, int]], tail: bytes = b"") -> bytes:
    """A little-endian TIFF whose one directory holds ``entries`` (tag, type, count, value),
    followed by ``tail`` (at offset 10 + 12 × len(entries) + 4)."""
    table = b"".join(struct.pack("<HHII", *e) for e in sorted(entries))
    return b"II*\x00" + struct.pack("<IH", 8, len(entries)) + table + b"\x00" * 4 + tail


def strips_tiff(strips: int) -> bytes:
    """A 1-pixel-wide grey TIFF of ``strips`` one-row strips (offsets and counts as SHORTs)."""
    tail_at = 10 + 12 * 9 + 4
    offsets_at, counts_at = tail_at + 16, tail_at + 16 + 2 * strips
    entries = [(256, 3, 1, 1), (257, 4, 1, strips), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 3, strips, offsets_at), (277, 3, 1, 1), (278, 3, 1, 1), (279, 3, strips, counts_at)]  # fmt: skip
    return tiff_of(entries, bytes(16) + struct.pack("<H", tail_at) * strips + struct.pack("<H", 1) * strips)


def test_tiffs_of_many_strips_or_directory_entries_are_refused_before_pillow_reads_them() -> None:
    """Pillow makes a tile of each strip at open and decodes each (200,000 strips in 800 kB: 6.2 s),
    and reads every entry of a directory in Python, again for each pointer to it."""
    assert decode_image(strips_tiff(headers.MAX_TIFF_STRIPS), LIMIT, "L").shape == (8192, 1)
    refused(strips_tiff(headers.MAX_TIFF_STRIPS + 1), "L", r"^file: a TIFF of more than 8192 strips or tiles")
    refused(strips_tiff(200_000), "L", r"strips or tiles")
    filler = [(40_000 + i, 3, 1, 0) for i in range(headers.MAX_TIFF_ENTRIES)]
    tiny = [(256, 3, 1, 1), (257, 3, 1, 1), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (273, 4, 1, 8),
            (277, 3, 1, 1), (278, 3, 1, 1), (279, 3, 1, 1)]  # fmt: skip
    refused(tiff_of(tiny + filler), "L", r"^file: a TIFF directory of more than 1024 entries")
    exif_at = 10 + 12 * (len(tiny) + 1) + 4
    pointing = tiff_of([*tiny, (34665, 4, 1, exif_at)], struct.pack("<H", 1025) + bytes(12 * 1025 + 4))
    refused(pointing + bytes(13_000), "L", r"directory of more than 1024 entries")  # its EXIF directory's
    rgb_image = rgb((64, 48))
    for options in ({}, {"compression": "tiff_lzw"}, {"compression": "jpeg"}, {"compression": "tiff_adobe_deflate"},
                    {"exif": Image.Exif()}):  # fmt: skip
        data = encoded(rgb_image, "TIFF", **options)
        assert decode_image(data, LIMIT, "RGB").shape == (48, 64, 3)
