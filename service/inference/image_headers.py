"""Bounds on the parts of an encoded image that Pillow reads in Python, checked before it reads them.

Pillow decodes pixels in C (libjpeg-turbo, zlib, its own LZW decoder), but reads what comes before
and between them in Python: a JPEG's segments, a PNG's chunks, a GIF's extension blocks, a Netpbm
header, a segment, chunk, block or byte at a time. Within the 8 MiB image limit, such structure
kept it busy for seconds (Pillow 13, this machine): 8 MB of empty JPEG APP1 segments 5.4 s, of JPEG
fill bytes 5 s, of quantisation tables 1.1 s; 7 MB of unknown PNG chunks 5.2 s; 8 MB of GIF comment
sub-blocks 1.5 s; an 8 MB Netpbm comment 4.6 s. Plain (ASCII) Netpbm is decoded in Python too,
≈ 3 s for 8 MB, and is refused. Each check below walks those units at C speed where it can and stops at its
limit, so it costs a millisecond or so; the limits stand far above what encoders write. A check
that fails is :class:`PayloadTooLarge` naming the field; bytes it cannot follow are left to Pillow,
which refuses them. Other formats are bounded by theirs (a TIFF reads one directory of at most
65,535 entries at open: 0.45 s at most).
"""

from __future__ import annotations

import io
import re
import struct

from PIL import Image, JpegImagePlugin, PpmImagePlugin

from service.errors import InvalidInput, PayloadTooLarge

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"  # what Pillow takes for a JPEG
GIF_SIGNATURES = (b"GIF87a", b"GIF89a")

#: libjpeg's own progressive scripts write 10 scans (colour) or 6 (grey), a baseline JPEG one
#: per component at most: ten times that
MAX_JPEG_SCANS = 100
#: a JPEG's part before its first scan: segments (APPn, COM, DQT, DHT, SOF …), bytes outside any
#: segment (fill bytes, junk), and bytes of the segments whose content Pillow parses (quantisation
#: tables, frame headers, Photoshop's APP13). An ICC profile takes 255 segments at most, extended
#: XMP one per 64 kB; four tables take 516 bytes
MAX_JPEG_SEGMENTS = 1000
MAX_JPEG_STRAY_BYTES = 4096
MAX_JPEG_PARSED_BYTES = 256 * 1024
#: a PNG's chunks other than IDAT (encoders write a few dozen), and its IDAT chunks (an 8 MB image
#: in libpng's 8 KiB chunks has a thousand)
MAX_PNG_CHUNKS = 1000
MAX_PNG_DATA_CHUNKS = 20_000
#: a GIF's sub-blocks and stray bytes before its first image (a comment takes one sub-block per
#: 255 bytes, XMP's trailer a few hundred)
MAX_GIF_BLOCKS = 4096
#: a Netpbm header (magic, width, height, maximum, comments)
MAX_NETPBM_HEADER_BYTES = 4096

_PNG_CHUNK = struct.Struct(">I4s")  # a chunk's length and type
# runs matched up to one byte past their limit, not to their end: 8 MB of them took 0.15 s
_JPEG_FILL = re.compile(rb"\xff{1,%d}" % (MAX_JPEG_STRAY_BYTES + 2))
_GIF_STRAY = re.compile(rb"[^!,;]{1,%d}" % (MAX_GIF_BLOCKS + 1))  # what Pillow skips a byte at a time


def check_header(data: bytes, field: str) -> None:
    """``data``'s Python-read parts within this module's limits, by its format's signature."""
    if data.startswith(PNG_SIGNATURE):
        check_png(data, field)
    elif data.startswith(JPEG_SIGNATURE):
        check_jpeg(data, field)
    elif data.startswith(GIF_SIGNATURES):
        check_gif(data, field)
    elif PpmImagePlugin._accept(data[:2]):  # Pillow's own test: P1–P6 and its float variants
        check_netpbm(data, field)


def _over(field: str, what: str) -> PayloadTooLarge:
    return PayloadTooLarge(f"{field}: {what} (the limit)")


def check_jpeg(jpeg: bytes, field: str) -> None:
    """A JPEG's part before its first scan within this module's limits, walked as Pillow reads it
    (segments by their lengths: a thumbnail's markers are not counted; runs of stray bytes
    skipped at C speed); then its scans within :data:`MAX_JPEG_SCANS`. libjpeg reads every scan
    over every block of the image, so a small file of thousands of scans holding nothing
    (end-of-band runs) keeps a decoder busy for minutes within the pixel limit (libjpeg-turbo's
    djpeg has ``-maxscans`` against it; the library itself sets no limit). A scan starts with the
    marker FF DA, which the entropy-coded data never holds (an FF there is followed by 00 or a
    restart marker); an embedded thumbnail adds its own."""
    at, end, segments, stray, parsed = 2, len(jpeg), 0, 0, 0
    while at < end and segments <= MAX_JPEG_SEGMENTS and stray <= MAX_JPEG_STRAY_BYTES:
        if jpeg[at] != 0xFF:  # junk, which Pillow skips byte by byte
            found = jpeg.find(b"\xff", at)
            stray += (end if found < 0 else found) - at
            at = end if found < 0 else found
            continue
        run = _JPEG_FILL.match(jpeg, at)
        assert run is not None
        stray += run.end() - at - 1  # fill bytes before the marker
        if run.end() >= end:
            break
        marker, at = 0xFF00 | jpeg[run.end()], run.end() + 1
        if marker == 0xFFDA:  # the first scan: libjpeg reads on
            break
        if marker == 0xFF00:  # an escaped FF out of place: Pillow skips it
            stray += 2
            continue
        segments += 1
        if marker not in JpegImagePlugin.MARKER:  # Pillow refuses the file here
            break
        handler = JpegImagePlugin.MARKER[marker][2]
        if handler is not None:  # a segment with a length
            length = int.from_bytes(jpeg[at : at + 2], "big")
            if handler in (JpegImagePlugin.DQT, JpegImagePlugin.SOF) or marker == 0xFFED:
                parsed += length
            at += length
    for count, limit, what in (
        (segments, MAX_JPEG_SEGMENTS, "segments"),
        (stray, MAX_JPEG_STRAY_BYTES, "bytes outside its segments"),
        (parsed, MAX_JPEG_PARSED_BYTES, "bytes of tables and Photoshop resources"),
    ):
        if count > limit:
            raise _over(field, f"a JPEG of more than {limit} {what} before its first scan")
    scans = jpeg.count(b"\xff\xda")
    if scans > MAX_JPEG_SCANS:
        raise PayloadTooLarge(f"{field}: a JPEG of {scans} scans, over the limit of {MAX_JPEG_SCANS}")


def check_png(png: bytes, field: str) -> None:
    """A PNG's chunks within :data:`MAX_PNG_CHUNKS` and :data:`MAX_PNG_DATA_CHUNKS`, walked by
    their lengths: Pillow reads each one's header in Python (≈ 9 µs an unknown chunk, 4 µs an
    IDAT)."""
    if len(png) <= 12 * MAX_PNG_CHUNKS:  # too short for more (a chunk takes 12 bytes at least)
        return
    at, end, chunks, data = len(PNG_SIGNATURE), len(png), 0, 0
    while at + 8 <= end and chunks <= MAX_PNG_CHUNKS and data <= MAX_PNG_DATA_CHUNKS:
        length, kind = _PNG_CHUNK.unpack_from(png, at)
        if kind == b"IDAT":
            data += 1
        else:
            chunks += 1
            if kind == b"IEND":
                break
        at += 12 + length
    if chunks > MAX_PNG_CHUNKS:
        raise _over(field, f"a PNG of more than {MAX_PNG_CHUNKS} chunks besides IDAT")
    if data > MAX_PNG_DATA_CHUNKS:
        raise _over(field, f"a PNG of more than {MAX_PNG_DATA_CHUNKS} IDAT chunks")


def check_gif(gif: bytes, field: str) -> None:
    """A GIF's sub-blocks and stray bytes before its first image within :data:`MAX_GIF_BLOCKS`,
    walked as Pillow reads them (its image data is decoded in C)."""
    if len(gif) < 13:
        return  # Pillow refuses it
    flags = gif[10]
    at = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # after the global colour table
    end, steps = len(gif), 0
    while at < end and steps <= MAX_GIF_BLOCKS:
        introducer = gif[at]
        if introducer in (0x2C, 0x3B):  # the first image, or the end
            return
        if introducer == 0x21:  # an extension: its label, then sub-blocks up to an empty one
            at += 2
            while at < end and steps <= MAX_GIF_BLOCKS:
                size, at, steps = gif[at], at + 1 + gif[at], steps + 1
                if size == 0:
                    break
            continue
        stray = _GIF_STRAY.match(gif, at)
        assert stray is not None
        steps += stray.end() - at
        at = stray.end()
    if steps > MAX_GIF_BLOCKS:
        raise _over(field, f"a GIF of more than {MAX_GIF_BLOCKS} blocks before its first image")


def check_netpbm(data: bytes, field: str) -> None:
    """A Netpbm image's header within :data:`MAX_NETPBM_HEADER_BYTES` (Pillow reads it a byte at a
    time, comments with no bound), and binary pixels (P4–P6): plain ones (P1–P3, numbers as text)
    are decoded in Python, a number at a time, and refused naming the field."""
    head = data[:MAX_NETPBM_HEADER_BYTES]
    try:
        with Image.open(io.BytesIO(head)) as image:  # its header alone
            codec = image.tile[0].codec_name if image.tile else ""
    except Exception as exc:  # a header cut at the limit, or Pillow's verdict on a short file
        if len(data) <= MAX_NETPBM_HEADER_BYTES:
            return  # decoded as it is: Pillow refuses it
        raise _over(field, f"a Netpbm header not within its first {MAX_NETPBM_HEADER_BYTES} bytes") from exc
    if codec.endswith("_plain"):
        raise InvalidInput(
            f"{field}: plain (ASCII) Netpbm is not accepted; send P4–P6, PNG or another format"
        )
