"""``service/api/forms.py``: multipart bodies as a real client library encodes them (urllib3, what
``requests`` uses), and every
malformed one refused with a message naming what is wrong."""

from __future__ import annotations

import time

import pytest
from urllib3.filepost import encode_multipart_formdata

from service.api import forms
from service.errors import InvalidInput


def encoded(data: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    body, ctype = encode_multipart_formdata({**data, **files})
    return body, ctype


def test_fields_and_files_as_a_client_library_sends_them() -> None:
    image = bytes(range(256)) * 40  # binary, with CR/LF and dashes inside
    body, ctype = encoded({"top_k": "3", "note": "café"}, {"file": ("a.png", image)})
    form = forms.parse(body, ctype, max_fields=16, max_files=1)
    assert form.fields == {"top_k": "3", "note": "café"}
    assert form.files == {"file": image}


def test_an_empty_upload_is_an_empty_file() -> None:
    body, ctype = encoded({}, {"file": ("a.png", b"")})
    assert forms.parse(body, ctype, 16, 1).files == {"file": b""}


@pytest.mark.parametrize(
    ("body", "ctype", "words"),
    [
        (b"--b\r\n\r\nx\r\n--b--\r\n", "multipart/form-data", "boundary"),
        (b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b--\r\n", "multipart/form-data; boundary=b", "no name"),
        (b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\n\xff\xfe\r\n--b--\r\n',
         "multipart/form-data; boundary=b", "a: not UTF-8"),
        (b"garbage that is no multipart at all", "multipart/form-data; boundary=b", "multipart"),
        (b"--" + b"b" * 257 + b"--\r\n", "multipart/form-data; boundary=" + "b" * 257, "content-type: .* boundary"),
    ],
)  # fmt: skip
def test_malformed_bodies_are_refused_by_name(body: bytes, ctype: str, words: str) -> None:
    with pytest.raises(InvalidInput, match=words):
        forms.parse(body, ctype, 16, 1)


def test_limits_on_files_and_fields() -> None:
    body, ctype = encoded({}, {"file": ("a.png", b"1"), "other": ("b.png", b"2")})
    with pytest.raises(InvalidInput, match="at most 1 file"):
        forms.parse(body, ctype, 16, 1)
    body, ctype = encoded({f"f{i}": "x" for i in range(5)}, {})
    with pytest.raises(InvalidInput, match="at most 4 fields"):
        forms.parse(body, ctype, 4, 1)


def test_parts_are_counted_as_they_come() -> None:
    """150,000 parts of one name (one field, replaced again and again) were all parsed before any
    limit was looked at: a second of the event loop for a 10 MB body. Parsing now stops at the
    first part past the limit."""
    part = b'--b\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n5\r\n'
    body = part * 150_000 + b"--b--\r\n"
    start = time.perf_counter()
    with pytest.raises(InvalidInput, match="more than 17 parts in the form"):
        forms.parse(body, "multipart/form-data; boundary=b", 16, 1)
    assert time.perf_counter() - start < 0.1
    assert forms.parse(part * 17 + b"--b--\r\n", "multipart/form-data; boundary=b", 16, 1).fields == {
        "top_k": "5"
    }


def test_a_long_disposition_is_parsed_and_not_remembered() -> None:
    """Dispositions are remembered (they repeat), but only short ones: a client chooses their
    length, up to the body limit, and 256 remembered megabytes would be a client's to fill."""
    forms._remembered.cache_clear()
    for name in ("a.png", "b" * 4096 + ".png"):  # the second: a 4 KiB file name
        body, ctype = encoded({"top_k": "3"}, {"file": (name, b"\x89PNG")})
        assert forms.parse(body, ctype, 16, 1).files == {"file": b"\x89PNG"}
        assert forms.parse(body, ctype, 16, 1).fields == {"top_k": "3"}
    # the short ones (top_k's and a.png's) once each, then found; the long one never kept
    info = forms._remembered.cache_info()
    assert (info.currsize, info.misses, info.hits) == (2, 2, 4), info
