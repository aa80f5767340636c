"""HTTP content codings (RFC 9110 §8.4) on the inference routes, as Triton's HTTP endpoint has them.

- A request body sent compressed (``Content-Encoding: gzip`` or ``deflate``, what tritonclient's
  ``request_compression_algorithm`` sends) is inflated under the same body limit as a plain one:
  inflating stops one byte past the limit, so a small bomb never becomes a large buffer. Another
  coding is refused with 415 and ``Accept-Encoding: gzip, deflate`` (RFC 9110 §15.5.16).
- An answer of at least ``Settings.compress_min_bytes`` is compressed when the client accepts
  gzip or deflate (``Accept-Encoding``: tritonclient's ``response_compression_algorithm``,
  browsers, requests, httpx); smaller answers (a classification's top-5) gain nothing from it.

Large bodies are (de)compressed on a worker thread (zlib lets go of the interpreter lock), so
the event loop goes on serving the replica's other requests meanwhile.
"""

from __future__ import annotations

import asyncio
import math
import zlib

from starlette.responses import Response

from service.errors import InvalidInput, PayloadTooLarge, UnsupportedEncoding

#: what a 415 answers in its Accept-Encoding header, and what ``Accept-Encoding`` may choose
CODINGS = "gzip, deflate"
#: zlib's window bits per coding: gzip's header and trailer, zlib's (HTTP "deflate")
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
#: gzip members in one body (a client sends one; several are legal, thousands are an attack)
MAX_MEMBERS = 64
#: codings in one Content-Encoding (each is undone under the body limit)
MAX_CODINGS = 4
#: compressed bytes fed to zlib at a time (see :func:`inflate`)
CHUNK = 64 * 1024
#: bodies and answers at least this long are (de)compressed on a worker thread
IN_THREAD_BYTES = 256 * 1024
#: zlib's fastest level: nginx's default (``gzip_comp_level 1``); JSON of numbers loses little
#: against level 6 and costs a third of the time
LEVEL = 1


async def decode(body: bytes, content_encoding: str, limit: int) -> bytes:
    """``body`` with the codings of its ``Content-Encoding`` undone (the last applied first), at
    most ``limit`` bytes once inflated."""
    codings = [c.strip().lower() for c in content_encoding.split(",")]
    if len(codings) > MAX_CODINGS:
        raise InvalidInput(f"content-encoding: {len(codings)} codings, more than {MAX_CODINGS}")
    for coding in reversed(codings):
        if coding in ("identity", ""):
            continue
        if coding not in _WBITS:
            raise UnsupportedEncoding(
                f"content-encoding: {coding!r} is not supported; send gzip, deflate or identity"
            )
        if len(body) >= IN_THREAD_BYTES:
            body = await asyncio.to_thread(inflate, body, coding, limit)
        else:
            body = inflate(body, coding, limit)
    return body


def inflate(data: bytes, coding: str, limit: int) -> bytes:
    """One coding undone: every gzip member (a gzip file may hold several, one after another: at
    most :data:`MAX_MEMBERS`), a zlib stream (HTTP's "deflate"; a raw deflate stream, which some
    clients send under that name, too), never more than ``limit`` bytes.

    The input is fed :data:`CHUNK` bytes at a time: zlib copies what follows a member's end into
    ``unused_data``, and fed the whole rest each time, 550,000 empty members (11 MB) took 83 s —
    time growing with the square of the count."""
    wbits, size, members = _WBITS[coding], 0, 0
    view, at = memoryview(data), 0
    parts: list[bytes] = []
    while True:
        inflater, start = zlib.decompressobj(wbits), at
        try:
            while not inflater.eof and at < len(view):
                chunk = view[at : at + CHUNK]
                at += len(chunk)
                part = inflater.decompress(chunk, limit - size + 1)
                size += len(part)
                if size > limit:
                    too_much = f"more than the limit of {limit} bytes once inflated ({coding})"
                    raise PayloadTooLarge(f"body: {too_much}")
                parts.append(part)
        except zlib.error as exc:
            if coding == "deflate" and wbits > 0 and not members:  # a raw deflate stream, no zlib header
                wbits, at, size, parts = -zlib.MAX_WBITS, start, 0, []
                continue
            raise InvalidInput(f"body: not valid {coding} data ({exc})") from exc
        if not inflater.eof:
            raise InvalidInput(f"body: the {coding} data ends early")
        members += 1
        at -= len(inflater.unused_data)  # the rest of the last chunk, after this member
        if at >= len(view):
            return b"".join(parts)
        if not coding.endswith("gzip"):
            raise InvalidInput(f"body: {len(view) - at} bytes after the end of the {coding} data")
        if members >= MAX_MEMBERS:
            raise InvalidInput(f"body: more than {MAX_MEMBERS} {coding} members")


def accept_weights(header: str) -> dict[str, float]:
    """An ``Accept``-style header's items (lower case) and their weights, ``q`` (RFC 9110
    §12.4.2): 1 unless given; one that is not a weight from 0 to 1 is a refusal, 0 (nan compared
    false with everything, and chose deflate)."""
    weights: dict[str, float] = {}
    for item in header.lower().split(","):
        name, _, params = item.partition(";")
        weight = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = math.nan
                weight = min(max(weight, 0.0), 1.0) if math.isfinite(weight) else 0.0
        weights[name.strip()] = weight
    return weights


def preferred(accept_encoding: str) -> str | None:
    """The coding to answer in: gzip or deflate, whichever the client's ``Accept-Encoding``
    weighs higher (gzip on a tie), counting ``*`` for a coding it does not name; None when it
    accepts neither (``q=0`` refuses a coding)."""
    weights = accept_weights(accept_encoding)
    anything = weights.get("*", 0.0)
    gzip = weights.get("gzip", weights.get("x-gzip", anything))
    deflate = weights.get("deflate", anything)
    if max(gzip, deflate) <= 0:
        return None
    return "gzip" if gzip >= deflate else "deflate"


async def compress(response: Response, accept_encoding: str) -> None:
    """Compress ``response``'s body in place when the client accepts a coding; either way the
    answer varies with ``Accept-Encoding`` (for caches between the client and the service)."""
    response.headers.append("vary", "Accept-Encoding")
    coding = preferred(accept_encoding)
    if coding is None:
        return
    body = bytes(response.body)
    if len(body) >= IN_THREAD_BYTES:
        packed = await asyncio.to_thread(_deflate, body, coding)
    else:
        packed = _deflate(body, coding)
    response.body = packed
    response.headers["content-length"] = str(len(packed))
    response.headers["content-encoding"] = coding


def _deflate(body: bytes, coding: str) -> bytes:
    packer = zlib.compressobj(LEVEL, zlib.DEFLATED, _WBITS[coding])
    return packer.compress(body) + packer.flush()
