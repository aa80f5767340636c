"""Bounds on the parts of an encoded image that Pillow reads in Python, checked before it reads them.

Pillow decodes pixels in C (libjpeg-turbo, zlib, libtiff, its own LZW decoder), but reads what
comes before and between them in Python: a JPEG's segments, a PNG's chunks, a GIF's extension
blocks, a Netpbm header, a TIFF's directories and strips, a segment, chunk, block, entry or byte at
a time. Within the 8 MiB image limit, such structure kept it busy for seconds (Pillow 13, this
machine): 8 MB of empty JPEG APP1 segments 5.4 s, of JPEG fill bytes 5 s, of quantisation tables
1.1 s; 7 MB of unknown PNG chunks 5.2 s, 990 iCCP chunks of 1 MB inflated 5 s; 8 MB of GIF comment
sub-blocks 1.5 s; an 8 MB Netpbm comment 4.6 s; 200,000 TIFF strips in 800 kB 6.2 s. Each check
below walks those units at C speed where it can and stops at its limit, so it costs milliseconds;
the limits stand far above what encoders write. A check that fails is :class:`PayloadTooLarge`
naming the field; bytes it cannot follow are left to Pillow, which refuses them. WebP is read by
libwebp, BMP's headers are fixed; a decoder Pillow writes in Python (run-length BMP, Netpbm of an
unusual maximum, plain Netpbm) is refused once the header is read (:func:`check_opened`).
"""

from __future__ import annotations

import io
import re
import struct

import numpy as np
from PIL import Image, ImageFile, JpegImagePlugin, PpmImagePlugin

from service.errors import InvalidInput, PayloadTooLarge

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"  # what Pillow takes for a JPEG
GIF_SIGNATURES = (b"GIF87a", b"GIF89a")
TIFF_SIGNATURES = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF, both byte orders

#: libjpeg's own progressive scripts write 10 scans (colour) or 6 (grey), a baseline JPEG one
#: per component at most: ten times that
MAX_JPEG_SCANS = 100
#: a JPEG's part before its first scan: segments (APPn, COM, DQT, DHT, SOF …), bytes outside any
#: segment (fill bytes, junk), and bytes of the segments whose content Pillow parses (quantisation
#: tables, frame headers, EXIF, Photoshop's APP13). An ICC profile takes 255 segments at most,
#: extended XMP one per 64 kB; four tables take 516 bytes, EXIF one segment of 64 kB at most
MAX_JPEG_SEGMENTS = 1000
MAX_JPEG_STRAY_BYTES = 4096
MAX_JPEG_PARSED_BYTES = 256 * 1024
#: a PNG's chunks other than IDAT (encoders write a few dozen), and its IDAT chunks (an 8 MB image
#: in libpng's 8 KiB chunks has a thousand)
MAX_PNG_CHUNKS = 1000
MAX_PNG_DATA_CHUNKS = 20_000
#: a PNG's compressed metadata chunks (iCCP, zTXt, iTXt): Pillow inflates each, up to 1 MB (990
#: iCCP chunks of 1 MB each in a 1 MB file: 5 s); the format allows one iCCP
MAX_PNG_COMPRESSED_CHUNKS = 16
#: a GIF's sub-blocks and stray bytes before its first image (a comment takes one sub-block per
#: 255 bytes, XMP's trailer a few hundred)
MAX_GIF_BLOCKS = 4096
#: a Netpbm header (magic, width, height, maximum, comments)
MAX_NETPBM_HEADER_BYTES = 4096
#: a TIFF's entries per directory (the first, and the EXIF, GPS and interoperability directories it
#: points to; writers use a few dozen), and its strips or tiles (Pillow makes a tile of each at
#: open, then decodes each: 200,000 one-row strips in 800 kB took 6.2 s; 65,535 entries in
#: directories pointing back at themselves 5.4 s). A 16 Mpx RGB image in 8 kB strips has 6,144
MAX_TIFF_ENTRIES = 1024
MAX_TIFF_STRIPS = 8192

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
    elif data[:4] in TIFF_SIGNATURES:
        check_tiff(data, field)
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
            if (
                handler in (JpegImagePlugin.DQT, JpegImagePlugin.SOF)
                or marker == 0xFFED
                or (
                    marker == 0xFFE1 and jpeg.startswith(b"Exif\0\0", at + 2)  # joined, parsed at open
                )
            ):
                parsed += length
            at += length
    for count, limit, what in (
        (segments, MAX_JPEG_SEGMENTS, "segments"),
        (stray, MAX_JPEG_STRAY_BYTES, "bytes outside its segments"),
        (parsed, MAX_JPEG_PARSED_BYTES, "bytes of tables, EXIF and Photoshop resources"),
    ):
        if count > limit:
            raise _over(field, f"a JPEG of more than {limit} {what} before its first scan")
    scans = jpeg.count(b"\xff\xda")
    if scans > MAX_JPEG_SCANS:
        raise PayloadTooLarge(f"{field}: a JPEG of {scans} scans, over the limit of {MAX_JPEG_SCANS}")


def check_png(png: bytes, field: str) -> None:
    """A PNG's chunks within :data:`MAX_PNG_CHUNKS`, :data:`MAX_PNG_DATA_CHUNKS` and
    :data:`MAX_PNG_COMPRESSED_CHUNKS`, walked by their lengths up to where Pillow stops reading
    (IEND; an animated PNG's second frame): Pillow reads each one's header in Python (≈ 9 µs an
    unknown chunk, 4 µs an IDAT)."""
    if len(png) <= 12 * MAX_PNG_CHUNKS:  # too short for more (a chunk takes 12 bytes at least)
        return
    at, end, chunks, data, compressed = len(PNG_SIGNATURE), len(png), 0, 0, 0
    while at + 8 <= end and chunks <= MAX_PNG_CHUNKS and data <= MAX_PNG_DATA_CHUNKS:
        length, kind = _PNG_CHUNK.unpack_from(png, at)
        if kind == b"IDAT":
            data += 1
        elif kind == b"IEND" or (kind == b"fcTL" and data):  # the end, or the next frame
            break
        else:
            chunks += 1
            compressed += kind in (b"iCCP", b"zTXt", b"iTXt")
        at += 12 + length
    if chunks > MAX_PNG_CHUNKS:
        raise _over(field, f"a PNG of more than {MAX_PNG_CHUNKS} chunks besides IDAT")
    if data > MAX_PNG_DATA_CHUNKS:
        raise _over(field, f"a PNG of more than {MAX_PNG_DATA_CHUNKS} IDAT chunks")
    if compressed > MAX_PNG_COMPRESSED_CHUNKS:
        raise _over(field, f"a PNG of more than {MAX_PNG_COMPRESSED_CHUNKS} compressed metadata chunks")


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
    """A Netpbm image's header within :data:`MAX_NETPBM_HEADER_BYTES`: Pillow reads it a byte at a
    time, comments with no bound."""
    if len(data) <= MAX_NETPBM_HEADER_BYTES:
        return
    try:
        Image.open(io.BytesIO(data[:MAX_NETPBM_HEADER_BYTES]), formats=["PPM"]).close()  # its header alone
    except Exception as exc:  # a header cut at the limit (or not one at all: refused either way)
        raise _over(field, f"a Netpbm header not within its first {MAX_NETPBM_HEADER_BYTES} bytes") from exc


def check_tiff(tiff: bytes, field: str) -> None:
    """A TIFF's directories within :data:`MAX_TIFF_ENTRIES` and its strips or tiles within
    :data:`MAX_TIFF_STRIPS`: the first directory, and the EXIF, GPS and interoperability ones it
    points to, each read once (a directory pointing back at itself, as Pillow would read it again,
    counts once). Bytes that cannot be followed are left to Pillow."""
    order, big = ("<" if tiff[:2] == b"II" else ">"), tiff[2:4] in (b"+\0", b"\0+")
    count_type = np.dtype(f"{order}u8" if big else f"{order}u2")  # a directory's entry count
    pointer = f"{order}u8" if big else f"{order}u4"
    entry = np.dtype([("tag", f"{order}u2"), ("type", f"{order}u2"), ("count", pointer), ("value", pointer)])
    if len(tiff) < 16:
        return  # Pillow refuses it
    todo, seen = [int(np.frombuffer(tiff, pointer, 1, 8 if big else 4)[0])], set[int]()
    while todo and len(seen) < 8:
        at = todo.pop()
        if at in seen or at + count_type.itemsize > len(tiff):
            continue
        seen.add(at)
        entries = int(np.frombuffer(tiff, count_type, 1, at)[0])
        if entries > MAX_TIFF_ENTRIES:
            raise _over(field, f"a TIFF directory of more than {MAX_TIFF_ENTRIES} entries")
        if at + count_type.itemsize + entries * entry.itemsize > len(tiff):
            continue
        table = np.frombuffer(tiff, entry, entries, at + count_type.itemsize)
        strips = table["count"][np.isin(table["tag"], (273, 324))]  # StripOffsets, TileOffsets
        if strips.size and int(strips.max()) > MAX_TIFF_STRIPS:
            raise _over(field, f"a TIFF of more than {MAX_TIFF_STRIPS} strips or tiles")
        todo += [int(v) for v in table["value"][np.isin(table["tag"], (34665, 34853, 40965))]]


def check_opened(image: ImageFile.ImageFile, field: str) -> None:
    """An opened image (its header read) whose pixels Pillow decodes in C: a decoder Pillow
    writes in Python (``Image.DECODERS``: run-length BMP, Netpbm of another maximum than 255 or
    65,535, plain ASCII Netpbm …) reads a pixel or a number at a time holding the interpreter
    lock, which a thread does not give back to the event loop (a 16.5 kB run-length BMP of
    4096 × 4096: 2.9 s; a 1 MB P5 of maximum 254: 2 s), and is refused naming the field."""
    codec = image.tile[0][0] if image.tile else ""  # its codec name (a tuple before Pillow 11)
    if codec in Image.DECODERS:
        raise InvalidInput(
            f"{field}: this {image.format} image would be decoded in Python by Pillow ({codec}), "
            "which is not accepted; send PNG, JPEG, WebP or another common encoding"
        )
