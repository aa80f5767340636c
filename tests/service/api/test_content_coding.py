"""Compressed request bodies and compressed answers (``service/api/content_coding.py``): the codings
alone, then through ``create_app`` on every inference route — REST JSON, a multipart upload, KServe
v2 JSON and binary — against fake models."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import random
import time
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.api import content_coding
from service.api.http import create_app
from service.errors import InvalidInput, PayloadTooLarge, UnsupportedEncoding
from tests.service.api.test_rest import BOUNDARY, call, multipart, png
from tests.service.fakes import fake_server

TEXT = json.dumps({"text": ["abc", "hello"], "return_attention": True}).encode()


def raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


def decode(body: bytes, coding: str, limit: int = 1 << 20) -> bytes:
    return asyncio.run(content_coding.decode(body, coding, limit))


@pytest.mark.parametrize(
    ("coding", "packed"),
    [
        ("gzip", gzip.compress(TEXT)),
        ("x-gzip", gzip.compress(TEXT)),
        ("GZip", gzip.compress(TEXT)),
        ("deflate", zlib.compress(TEXT)),  # HTTP's "deflate" is a zlib stream (tritonclient's)
        ("deflate", raw_deflate(TEXT)),  # which some clients send without zlib's header
        ("identity", TEXT),
        ("gzip, identity", gzip.compress(TEXT)),
        ("deflate, gzip", gzip.compress(zlib.compress(TEXT))),  # applied in order, undone last first
        ("gzip", gzip.compress(TEXT[:10]) + gzip.compress(TEXT[10:])),  # two gzip members
    ],
)
def test_codings_are_undone(coding: str, packed: bytes) -> None:
    assert decode(packed, coding) == TEXT


def test_large_bodies_and_member_boundaries_inside_a_chunk() -> None:
    """Inflated a chunk at a time: members longer than a chunk, and members that end mid-chunk."""
    noise = random.Random(0).randbytes(3 * content_coding.CHUNK)  # incompressible: 3 chunks packed
    for body, coding in [
        (gzip.compress(noise) + gzip.compress(TEXT) + gzip.compress(noise[:100]), "gzip"),
        (zlib.compress(noise), "deflate"),
        (raw_deflate(noise), "deflate"),
    ]:
        want = noise + TEXT + noise[:100] if coding == "gzip" else noise
        assert decode(body, coding, limit=1 << 22) == want


def test_many_gzip_members_are_refused_quickly() -> None:
    """550,000 empty gzip members (11 MB) took 83 s to refuse, on a thread the client could not
    stop; 200,000 now take well under a second, and 64 are still fine."""
    assert (
        decode(gzip.compress(b"x") * content_coding.MAX_MEMBERS, "gzip") == b"x" * content_coding.MAX_MEMBERS
    )
    start = time.perf_counter()
    with pytest.raises(InvalidInput, match="more than 64 gzip members"):
        decode(gzip.compress(b"") * 200_000, "gzip", limit=1 << 24)
    assert time.perf_counter() - start < 1.0
    with pytest.raises(InvalidInput, match="content-encoding: 5 codings, more than 4"):
        decode(TEXT, "identity, " * 4 + "identity")


@pytest.mark.parametrize(
    ("coding", "packed", "error", "words"),
    [
        ("br", TEXT, UnsupportedEncoding, "content-encoding: 'br' is not supported"),
        ("gzip, zstd", TEXT, UnsupportedEncoding, "'zstd'"),
        ("gzip", TEXT, InvalidInput, "not valid gzip data"),
        ("deflate", TEXT, InvalidInput, "not valid deflate data"),
        ("gzip", gzip.compress(TEXT)[:-9], InvalidInput, "gzip data ends early"),
        ("deflate", zlib.compress(TEXT) + b"tail", InvalidInput, "4 bytes after the end of the deflate data"),
        ("gzip", gzip.compress(TEXT) + b"tail", InvalidInput, "not valid gzip data"),
    ],
)
def test_bad_codings_are_refused_naming_the_body(
    coding: str, packed: bytes, error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words):
        decode(packed, coding)
    assert UnsupportedEncoding.http_status == 415


def test_a_bomb_is_refused_without_inflating_it() -> None:
    """64 MiB of zeros packs into ≈ 64 KiB; with a 1 MiB limit inflating stops past 1 MiB."""
    bomb = gzip.compress(bytes(64 << 20), compresslevel=9)
    assert len(bomb) < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooLarge, match="more than the limit of 1048576 bytes once inflated"):
            decode(bomb, "gzip", limit=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20
    many = gzip.compress(bytes(600_000)) * 2  # two members, each under the limit, too long together
    with pytest.raises(PayloadTooLarge):
        decode(many, "gzip", limit=1 << 20)
    assert decode(gzip.compress(bytes(1 << 20)), "gzip", limit=1 << 20) == bytes(1 << 20)  # the limit itself


def test_a_large_body_is_inflated_off_the_event_loop() -> None:
    """A body past IN_THREAD_BYTES is inflated on a worker thread: the same bytes come back."""
    payload = np.random.default_rng(0).integers(0, 255, 600_000, dtype=np.uint8).tobytes()
    packed = gzip.compress(payload)
    assert len(packed) >= content_coding.IN_THREAD_BYTES
    assert decode(packed, "gzip", limit=1 << 20) == payload


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        ("gzip", "gzip"),
        ("gzip, deflate", "gzip"),  # requests' and aiohttp's default
        ("gzip, deflate, br, zstd", "gzip"),  # a browser's
        ("deflate", "deflate"),
        ("x-gzip", "gzip"),
        ("GZIP", "gzip"),
        ("gzip;q=0.5, deflate;q=0.8", "deflate"),
        ("gzip;q=0, deflate", "deflate"),
        ("*", "gzip"),
        ("*;q=0.3, gzip;q=0", "deflate"),
        ("*;q=0", None),
        ("br, zstd", None),
        ("identity", None),
        ("", None),
        ("gzip;q=abc", None),  # an unreadable weight is a refusal, never a guess
        ("gzip;q=nan", None),  # float() reads it, and it chose deflate, which was never accepted
        ("gzip;q=inf, deflate;q=0.5", "deflate"),
        ("gzip; q=1.0 ; level=2", "gzip"),
    ],
)
def test_the_answer_s_coding_follows_accept_encoding(accept: str, chosen: str | None) -> None:
    assert content_coding.preferred(accept) == chosen


# -- through the app ------------------------------------------------------------------------------


@pytest.fixture
def app(tmp_path: Path) -> Any:
    return create_app(fake_server(tmp_path, compress_min_bytes=500)[0])


def unpack(headers: dict[str, str], content: bytes) -> bytes:
    coding = headers.get("content-encoding")
    if coding == "gzip":
        return gzip.decompress(content)
    if coding == "deflate":
        return zlib.decompress(content)
    assert coding is None, coding
    return content


def without_timings(answer: dict[str, Any]) -> dict[str, Any]:
    answer.pop("metrics", None)
    return answer


def test_every_inference_route_takes_a_compressed_body(app: Any) -> None:
    """The same request plain, gzip and deflate: the same answer (timings aside)."""
    image = png(np.array([[1, 1], [2, 0]]))
    pixels = {"name": "PIXELS", "datatype": "UINT8", "shape": [1, 2, 2], "data": [1, 1, 2, 0]}
    routes = [
        ("/v1/models/fake-translator/translate", TEXT, "application/json"),
        ("/v1/models/fake-classifier/classify",
         json.dumps({"image": base64.b64encode(image).decode(), "top_k": 2}).encode(), "application/json"),
        ("/v1/models/fake-classifier/classify", multipart(image), f"multipart/form-data; boundary={BOUNDARY}"),
        ("/v2/models/fake-classifier/infer", json.dumps({"inputs": [pixels]}).encode(), "application/json"),
    ]  # fmt: skip
    for path, body, ctype in routes:
        answers = []
        for coding, packed in (
            ("identity", body),
            ("gzip", gzip.compress(body)),
            ("deflate", zlib.compress(body)),
        ):
            headers = {"content-type": ctype, "content-encoding": coding}
            status, _, content = call(app, "POST", path, packed, headers)
            assert status == 200, (path, coding, content)
            answers.append(without_timings(json.loads(content)))
        assert answers[0] == answers[1] == answers[2], path


def test_a_binary_kserve_request_may_come_compressed(app: Any) -> None:
    """The binary extension's header length counts the inflated body, as tritonclient sends it."""
    pixels = {
        "name": "PIXELS",
        "datatype": "UINT8",
        "shape": [1, 2, 2],
        "parameters": {"binary_data_size": 4},
    }
    head = json.dumps({"inputs": [pixels]}).encode()
    body = head + bytes([1, 1, 2, 0])
    headers = {"inference-header-content-length": str(len(head)), "content-encoding": "gzip"}
    status, _, content = call(app, "POST", "/v2/models/fake-classifier/infer", gzip.compress(body), headers)
    assert status == 200, content
    assert json.loads(content)["model_name"] == "fake-classifier"


def test_bad_compressed_bodies_get_their_4xx(app: Any) -> None:
    path = "/v1/models/fake-translator/translate"
    status, headers, content = call(app, "POST", path, TEXT, {"content-encoding": "br"})
    assert status == 415 and headers["accept-encoding"] == "gzip, deflate"
    assert json.loads(content) == {
        "error": "content-encoding: 'br' is not supported; send gzip, deflate or identity"
    }
    status, _, content = call(app, "POST", path, TEXT, {"content-encoding": "gzip"})
    assert status == 422 and "not valid gzip data" in json.loads(content)["error"]
    status, _, content = call(
        app, "POST", "/v2/models/fake-classifier/infer", TEXT, {"content-encoding": "zstd"}
    )
    assert status == 415 and "zstd" in json.loads(content)["error"]  # v2 errors too: {"error": ...}
    bomb = gzip.compress(bytes(64 << 20))
    status, _, content = call(app, "POST", path, bomb, {"content-encoding": "gzip"})
    assert status == 413 and "once inflated" in json.loads(content)["error"]


def test_long_answers_are_compressed_for_clients_that_take_it(app: Any) -> None:
    path = "/v1/models/fake-translator/translate"
    json_headers = {"content-type": "application/json"}
    status, plain_headers, plain = call(app, "POST", path, TEXT, json_headers)
    assert status == 200 and len(plain) >= 500 and "content-encoding" not in plain_headers
    assert plain_headers["vary"] == "Accept-Encoding"  # a cache must not hand it to a gzip client
    for accept, coding in (("gzip, deflate", "gzip"), ("deflate", "deflate"), ("gzip;q=0, br", None)):
        status, headers, content = call(app, "POST", path, TEXT, {**json_headers, "accept-encoding": accept})
        assert status == 200 and headers.get("content-encoding") == coding, accept
        assert int(headers["content-length"]) == len(content)
        assert without_timings(json.loads(unpack(headers, content))) == without_timings(json.loads(plain))
        if coding:
            assert len(content) < len(plain)
    short = json.dumps({"text": "abc"}).encode()  # under compress_min_bytes: as it is
    status, headers, content = call(app, "POST", path, short, {**json_headers, "accept-encoding": "gzip"})
    assert (
        status == 200 and len(content) < 500 and "content-encoding" not in headers and "vary" not in headers
    )
    status, headers, content = call(
        app, "POST", "/v2/models/fake-translator/infer",
        json.dumps({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [6], "data": ["abc", "hello"] * 3}],
                    "outputs": [{"name": "ATTENTION"}, {"name": "TRANSLATION"}]}).encode(),
        {"accept-encoding": "deflate"},
    )  # fmt: skip
    assert status == 200 and headers["content-encoding"] == "deflate", content
    assert json.loads(zlib.decompress(content))["model_name"] == "fake-translator"


def test_compression_off(tmp_path: Path) -> None:
    app = create_app(fake_server(tmp_path, compress_min_bytes=0)[0])
    status, headers, _ = call(
        app, "POST", "/v1/models/fake-translator/translate", TEXT, {"accept-encoding": "gzip"}
    )
    assert status == 200 and "content-encoding" not in headers and "vary" not in headers
