"""``multipart/form-data`` bodies, parsed in memory with python-multipart's streaming parser.

The body is already read and bounded (``Server.read_body``), so every part is kept as bytes.
Starlette's form parser, used before, spools each upload to a temporary file and builds its own
objects around the same parser: that cost more than the rest of an image request
(``benchmarks/results/*-peers.md``). Every problem becomes an :class:`InvalidInput` naming what is
wrong, as for any other body.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from python_multipart.exceptions import FormParserError, MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.errors import InvalidInput


@dataclass
class Form:
    fields: dict[str, str] = field(default_factory=dict)  # parts without a filename, decoded
    files: dict[str, bytes] = field(default_factory=dict)  # uploads (parts with a filename)


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)


def parse(body: bytes, content_type: str, max_fields: int, max_files: int) -> Form:
    """The form in ``body``; a later part of the same name replaces an earlier one."""
    # not remembered, unlike a part's disposition: most clients draw a new boundary per request
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise InvalidInput("content-type: multipart/form-data needs a boundary parameter")
    parts: list[_Part] = []
    name, value = bytearray(), bytearray()

    def part_begin() -> None:
        # counted as they come: 150,000 parts of one name (a field replaced 150,000 times) were
        # all parsed before any limit was looked at, a second of the event loop
        if len(parts) >= max_fields + max_files:
            raise InvalidInput(f"body: more than {max_fields + max_files} parts in the form")
        parts.append(_Part())

    def header_end() -> None:
        parts[-1].headers[bytes(name).strip().lower()] = bytes(value).strip()
        name.clear()
        value.clear()

    try:
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": part_begin,
                "on_part_data": lambda data, start, end: parts[-1].data.extend(data[start:end]),
                "on_header_field": lambda data, start, end: name.extend(data[start:end]),
                "on_header_value": lambda data, start, end: value.extend(data[start:end]),
                "on_header_end": header_end,
            },
        )
    except FormParserError as exc:  # a boundary over python-multipart's 256 bytes (RFC 2046: 70)
        raise InvalidInput(f"content-type: the multipart boundary is refused ({exc})") from exc
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise InvalidInput(f"body: not a valid multipart form ({exc})") from exc
    form = Form()
    for i, part in enumerate(parts):
        disposition = disposition_options(part.headers.get(b"content-disposition", b""))
        if b"name" not in disposition:
            raise InvalidInput(f"body: multipart part {i} has no name (Content-Disposition)")
        key = disposition[b"name"].decode("utf-8", "replace")
        if b"filename" in disposition:
            form.files[key] = bytes(part.data)
            if len(form.files) > max_files:
                raise InvalidInput(f"body: at most {max_files} file(s) per form")
            continue
        try:
            form.fields[key] = part.data.decode()
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"{key}: not UTF-8 text") from exc
        if len(form.fields) > max_fields:
            raise InvalidInput(f"body: at most {max_fields} fields per form")
    return form


def disposition_options(value: bytes) -> Mapping[bytes, bytes]:
    """The parameters (``name``, ``filename``) of a part's Content-Disposition, read-only.
    Remembered up to :data:`REMEMBERED_BYTES` long: clients send the same few again and again,
    and python-multipart's parsing of them (regular expressions, ``email``'s unquoting) was a third
    of what a one-image form cost on the event loop; a longer one (a client's to choose, up to the
    body limit) is parsed each time rather than kept."""
    if len(value) <= REMEMBERED_BYTES:
        return _remembered(value)
    return MappingProxyType(parse_options_header(value)[1])


#: the longest Content-Disposition :func:`disposition_options` remembers (256 of them at most)
REMEMBERED_BYTES = 512


@functools.lru_cache(maxsize=256)
def _remembered(value: bytes) -> Mapping[bytes, bytes]:
    return MappingProxyType(parse_options_header(value)[1])
