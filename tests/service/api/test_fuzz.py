"""Bad input, generated and hand-made: every answer is a 4xx with a JSON error naming the problem
(never a 5xx, a hang or a crash), and the service is healthy afterwards.

Generated: schemathesis walks the OpenAPI document (REST and KServe v2 HTTP) with positive and
negative cases, bounded in count and time (``FUZZ_EXAMPLES`` per operation). Hand-made: the
cases a schema cannot express — invalid UTF-8, lying length headers, decompression bombs,
path-like model names, binary tensors whose sizes disagree.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import multiprocessing
import os
import struct
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from PIL import Image
from schemathesis import GenerationMode

from tests.conftest import Service
from tests.service.inference.test_vision import with_scans
from tests.service.test_app import bomb_png

pytestmark = pytest.mark.slow
OCTETS = {"content-type": "application/octet-stream"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png(size: tuple[int, int], mode: str = "L") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size).save(out, format="PNG")
    return out.getvalue()


def many_scans() -> bytes:
    """A 64×64 progressive JPEG of 5,000 scans (its last repeated): refused before decoding."""
    out = io.BytesIO()
    Image.new("L", (64, 64)).save(out, format="JPEG", progressive=True)
    return with_scans(out.getvalue(), 4_994)


def jpeg_with(extra: bytes) -> bytes:
    """A 16×16 JPEG with ``extra`` after its start-of-image marker."""
    out = io.BytesIO()
    Image.new("L", (16, 16)).save(out, format="JPEG")
    return out.getvalue()[:2] + extra + out.getvalue()[2:]


def v2_binary(header: dict, blob: bytes, declared: int | None = None) -> dict:
    head = json.dumps(header).encode()
    length = str(len(head) if declared is None else declared)
    return {"data": head + blob, "headers": {**OCTETS, "inference-header-content-length": length}}


def gzipped(body: object) -> dict:
    """``body`` as compact JSON (bytes as they are), gzip-encoded."""
    data = gzip.compress(
        body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
    )
    return {"data": data, "headers": {"content-type": "application/json", "content-encoding": "gzip"}}


def text_tensor(*texts: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(t)) + t for t in texts)


#: a KServe BYTES tensor of one JPEG with 4 MB of fill bytes before its first marker
FILLED = text_tensor(jpeg_with(b"\xff" * 4_000_000))


TRANSLATE, CLASSIFY = "/v1/models/dates-bahdanau/translate", "/v1/models/fashion-vit/classify"
V2 = "/v2/models/dates-bahdanau/infer"
V2_IMAGE = "/v2/models/fashion-vit/infer"
CORPUS = [
    # text
    (TRANSLATE, {"data": b"", "headers": {"content-type": "application/json"}}, 422, "body"),
    (TRANSLATE, {"data": b'{"text": "\xff\xfe\xfd"}', "headers": {"content-type": "application/json"}}, 422, ""),
    (TRANSLATE, {"data": b"\xff" * 64, "headers": {"content-type": "application/json"}}, 422, ""),
    (TRANSLATE, {"json": {"text": "x" * 2_000_000}}, 413, "text[0]: 2000000 characters exceed the limit of 512"),
    (TRANSLATE, {"json": {"text": ["3 juin 1980"] * 300}}, 413, "text: 300 texts exceed the limit of 64"),
    # a million items that are not texts: refused from the list's length, not item by item (this
    # held the event loop for seconds and GBs building one error per item)
    (TRANSLATE, {"json": {"text": [1] * 1_000_000}}, 413, "text: 1000000 texts exceed the limit of 64"),
    (TRANSLATE, {"json": {"text": [{}] * 200}}, 422, "; 181 more problems"),
    (TRANSLATE, {"json": {"text": []}}, 422, "text: give at least one text"),
    (TRANSLATE, {"data": b"x" * 20_000_000, "headers": {"content-type": "application/json"}}, 413, "body"),
    (TRANSLATE, {"json": {"text": ["3 juin 1980"] * 65}}, 413, "text"),
    (TRANSLATE, {"json": {"text": "x", "beam_size": -1}}, 422, "beam_size"),
    # over any schema ceiling: the served limit named, as for 9 (it named the schema's 64)
    (TRANSLATE, {"json": {"text": "x", "beam_size": 99}}, 422, "beam_size: 99 exceeds the limit of 8"),
    (V2, {"json": {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["x"]}],
                   "parameters": {"beam_size": 99}}}, 422, "beam_size: 99 exceeds the limit of 8"),
    (V2, {"json": {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["x" * 513]}]}}, 413,
     "TEXT[0]: 513 characters exceed the limit of 512"),
    (TRANSLATE, {"data": b'{"text": "x", "length_penalty": NaN}', "headers": {"content-type": "application/json"}},
     422, "length_penalty: Input should be a finite number"),
    (TRANSLATE, {"json": {"text": "x", "max_length": 10**9}}, 422, "max_length"),
    (TRANSLATE, {"json": ["not", "an", "object"]}, 422, ""),
    (TRANSLATE, {"json": {"text": None}}, 422, "text"),
    # images
    (CLASSIFY, {"json": {"image": b64(png((64, 64))[:40])}}, 422, "image"),
    (CLASSIFY, {"json": {"image": b64(b"\xff\xd8\xff\xe0" + os.urandom(200))}}, 422, "image"),
    (CLASSIFY, {"json": {"image": b64(bomb_png())}}, 413, "pixels"),
    (CLASSIFY, {"json": {"image": "A" * 12_000_000}}, 413, ""),
    (CLASSIFY, {"json": {"image": b64(png((48, 48))), "top_k": 10**6}}, 422, "top_k"),
    (CLASSIFY, {"json": {"image": b64(png((48, 48))), "head_fusion": "median"}}, 422, "head_fusion"),
    (CLASSIFY, {"files": {"file": ("x.png", b"", "image/png")}}, 422, ""),
    (CLASSIFY, {"json": {"image": b64(png((48, 48))), "top_k": 101}}, 422, "top_k"),  # limits.max_top_k
    (CLASSIFY, {"json": {"pixels": [[]]}}, 422, "pixels"),
    # an integer JSON reads whole and float64 cannot hold
    (CLASSIFY, {"data": b'{"pixels": [[1' + b"0" * 400 + b"]]}", "headers": {"content-type": "application/json"}},
     422, "pixels"),
    (CLASSIFY, {"json": {"image": b64(many_scans())}}, 413, "image: a JPEG of 5000 scans"),
    (CLASSIFY, {"files": {"file": ("x.jpg", many_scans(), "image/jpeg")}}, 413, "scans"),
    # segments and fill bytes that Pillow reads in Python one at a time (4 MB: seconds of a replica)
    (CLASSIFY, {"files": {"file": ("x.jpg", jpeg_with(b"\xff\xe1\x00\x02" * 1_000_000), "image/jpeg")}},
     413, "file: a JPEG of more than 1000 segments"),
    (V2_IMAGE, v2_binary({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1],
                                      "parameters": {"binary_data_size": len(FILLED)}}]}, FILLED),
     413, "IMAGE[0]: a JPEG of more than 4096 bytes outside its segments"),
    # JSON of millions of values, 5 kB on the wire when gzip-encoded: each value costs the event loop
    # its parse (a 7 MB body held it 0.6 s), so more than limits.max_json_values are refused unparsed
    (CLASSIFY, gzipped({"pixels": [[0] * 1500] * 1500}), 413, "body: 2,251,501 JSON values, over the limit of 1,050,624"),
    (V2_IMAGE, gzipped({"inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": [1, 1500, 1500],
                                    "data": [0] * 2_250_000}]}), 413, "JSON values, over the limit of 1,050,624"),
    (TRANSLATE, gzipped({"text": ["x"] * 2_000_000}), 413, "body: 2,000,001 JSON values"),
    # brackets parse as slowly as numbers: 11,000 lists nested 100 deep, 11,000 commas
    (TRANSLATE, gzipped(b'{"text": "x", "pad": [' + b",".join([b"[" * 100 + b"0" + b"]" * 100] * 11_000) + b"]}"),
     413, "body: 1,111,002 JSON values"),
    (V2_IMAGE, {"json": {"inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": [1, 0, 0], "data": []}]}},
     422, "PIXELS"),
    (V2_IMAGE, {"json": {"inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": [0, 28, 28], "data": []}]}},
     422, "PIXELS"),
    (V2_IMAGE, {"json": {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [0], "data": []}]}}, 422, "IMAGE"),
    (V2_IMAGE, {"json": {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [65],
                                     "data": [b64(png((28, 28)))] * 65}]}}, 413, "images"),
    # names that look like paths: a dictionary lookup, never the file system
    ("/v1/models/..%2f..%2fetc%2fpasswd/translate", {"json": {"text": "x"}}, 404, "not found"),
    ("/v1/models/%2Fetc%2Fpasswd/translate", {"json": {"text": "x"}}, 404, "not found"),
    ("/v1/models/dates-bahdanau%00/translate", {"json": {"text": "x"}}, 404, "not found"),
    ("/v2/models/..%2fdates-bahdanau/infer", {"json": {"inputs": []}}, 404, "not found"),
    ("/v2/models/dates-bahdanau/versions/99/infer", {"json": {"inputs": []}}, 404, "version"),
    ("/v2/models/dates-bahdanau/versions/..%2f1/infer", {"json": {"inputs": []}}, 404, "version"),
    # KServe v2 tensors
    (V2, {"json": {"inputs": []}}, 422, "inputs"),
    (V2, {"json": {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [0], "data": []}]}}, 422,
     "TEXT: give at least one text"),
    (V2, {"json": {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [2], "data": ["x", " "]}]}}, 422,
     "TEXT[1]: must not be empty"),
    (V2, {"json": {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [2], "data": ["x"]}]}}, 422, "TEXT"),
    (V2, {"json": {"inputs": [{"name": "TEXT", "datatype": "FP32", "shape": [1], "data": [1.0]}]}}, 422, "TEXT"),
    (V2, {"json": {"inputs": [{"name": "TEXT", "datatype": "NOPE", "shape": [1], "data": [1]}]}}, 422, "NOPE"),
    (V2, {"json": {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [-3], "data": []}]}}, 422, "shape"),
    (V2, {"json": {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [True], "data": ["x"]}]}}, 422, "shape"),
    (V2, {"data": b"{", "headers": {"content-type": "application/json"}}, 422, ""),
    (V2, v2_binary({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1],
                                "parameters": {"binary_data_size": 100}}]}, text_tensor(b"x")), 422, "TEXT"),
    (V2, v2_binary({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1],
                                "parameters": {"binary_data_size": 5}}]}, text_tensor(b"x"), 10**6), 422, ""),
    (V2, v2_binary({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1],
                                "parameters": {"binary_data_size": 9}}]}, b"\xff\xff\xff\x7fxxxxx"), 422, "TEXT"),
    (V2, {"data": b"{}", "headers": {**OCTETS, "inference-header-content-length": "-1"}}, 422, ""),
    (V2, {"data": b"{}", "headers": {**OCTETS, "inference-header-content-length": "1e9"}}, 422, ""),
]  # fmt: skip


@pytest.mark.parametrize(("path", "kwargs", "status", "field"), CORPUS)
def test_hand_made_corpus_gets_a_clear_4xx(
    service: Service, path: str, kwargs: dict, status: int, field: str
) -> None:
    answer = service.post(path, **kwargs)
    assert answer.status_code == status, answer.text[:500]
    message = answer.json()["error"]
    assert isinstance(message, str) and message and field in message


def test_the_service_is_healthy_after_the_corpus(service: Service) -> None:
    assert service.get("/readyz").status_code == 200
    ok = service.post(TRANSLATE, json={"text": "3 juin 1980"})
    assert ok.status_code == 200 and ok.json()["translations"][0]["text"] == "1980-06-03"


# -- generated from the OpenAPI document ----------------------------------------------------------

#: generated cases per operation and mode (REST + KServe v2 HTTP: 21 operations, 20 with inputs;
#: 500 send ≈ 11,000 requests)
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "500"))
#: processes generating cases at once: hypothesis and schemathesis spend ≈ 40 ms of the client's
#: CPU on each request sent, the service a few, so one generator leaves a core idle
FUZZ_PROCESSES = 2


def test_generated_requests_never_get_a_5xx(service: Service) -> None:
    """Every operation of the OpenAPI document, with valid (positive) and invalid (negative)
    requests: never a 5xx, every 4xx a JSON ``{"error": "..."}``; ≥ 10,000 requests in all, sent
    from :data:`FUZZ_PROCESSES` processes, each generating the cases of its share of the
    operations."""
    schema = schemathesis.openapi.from_url(f"{service.url}/openapi.json")
    labels = [result.ok().label for result in schema.get_all_operations()]
    assert len(labels) >= 15, labels
    shares = [labels[i::FUZZ_PROCESSES] for i in range(FUZZ_PROCESSES)]
    with ProcessPoolExecutor(FUZZ_PROCESSES, mp_context=multiprocessing.get_context("spawn")) as pool:
        counts = list(pool.map(fuzz_operations, [service.url] * FUZZ_PROCESSES, shares))
    sent = sum(counts, Counter())
    assert {label.rsplit(" ", 1)[0] for label in sent} == set(labels), sorted(sent)
    print(f"fuzz: {sum(sent.values())} requests over {len(labels)} operations")
    assert sum(sent.values()) >= 10_000 or FUZZ_EXAMPLES < 500, dict(sent)
    assert service.get("/readyz").status_code == 200


def fuzz_operations(url: str, labels: list[str]) -> Counter[str]:
    """Generated requests to the operations named ``labels``, positive and negative, in this
    process; how many went to each (operation, mode). A 5xx, or a 4xx without a JSON error,
    raises with the request as a curl command."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    sent: Counter[str] = Counter()

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])  # fmt: skip
    @given(data=st.data())
    def run(data: st.DataObject, strategy: st.SearchStrategy[schemathesis.Case], label: str) -> None:
        case = data.draw(strategy)
        response = case.call(base_url=url, timeout=60)
        sent[label] += 1
        assert response.status_code < 500, (case.as_curl_command(), response.text[:300])
        if response.status_code >= 400:
            error = response.json()["error"]
            assert isinstance(error, str) and error, case.as_curl_command()

    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.label not in labels:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                run(
                    strategy=operation.as_strategy(generation_mode=mode),
                    label=f"{operation.label} {mode.value}",
                )
            except Unsatisfiable:  # an operation without inputs has no invalid variant
                assert mode == GenerationMode.NEGATIVE, operation.label
    return sent
