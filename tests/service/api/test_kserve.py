"""The v2 tensor codec: BYTES serialisation, JSON and binary bodies, and every malformed case."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.api import kserve, kserve_http
from service.api.http import create_app
from service.errors import InvalidInput
from tests.service.api.test_rest import call
from tests.service.fakes import entry, fake_server


def binary_body(header: dict, *blobs: bytes) -> tuple[bytes, str]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), str(len(head))


def test_bytes_round_trip_keeps_empty_and_non_ascii_elements() -> None:
    data = np.array([b"", "mars é".encode(), b"\x00\xff"], dtype=np.object_)
    raw = kserve.serialize_bytes(data)
    assert raw[:4] == b"\x00\x00\x00\x00"
    assert kserve.deserialize_bytes(raw, 3, "T").tolist() == data.tolist()


@pytest.mark.parametrize(
    ("raw", "count", "message"),
    [
        (b"\x05\x00\x00\x00ab", 1, "overruns"),
        (b"\x01\x00", 1, "truncated"),
        (b"\x01\x00\x00\x00a\x01\x00\x00\x00b", 1, "holds 2"),
    ],
)
def test_bytes_that_lie_about_lengths_are_refused(raw: bytes, count: int, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        kserve.deserialize_bytes(raw, count, "T")


def test_raw_numeric_tensors_check_their_byte_length() -> None:
    t = kserve.from_raw("P", "FP32", [2, 2], np.arange(4, dtype="<f4").tobytes())
    assert t.data.tolist() == [[0, 1], [2, 3]]
    with pytest.raises(InvalidInput, match="do not fit"):
        kserve.from_raw("P", "FP32", [2, 3], np.arange(4, dtype="<f4").tobytes())
    with pytest.raises(InvalidInput, match="datatype"):
        kserve.from_raw("P", "COMPLEX", [1], b"")
    with pytest.raises(InvalidInput, match="shape"):
        kserve.from_raw("P", "FP32", [-1], b"")
    with pytest.raises(InvalidInput, match="too large"):
        kserve.from_raw("P", "UINT8", [1 << 20, 1 << 20], b"")


def test_json_request_and_response() -> None:
    body = {"id": "7", "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]}],
            "outputs": [{"name": "TRANSLATION"}], "parameters": {"beam_size": 2}}  # fmt: skip
    req = kserve_http.parse_request(json.dumps(body).encode(), None)
    assert req.id == "7" and req.parameters == {"beam_size": 2} and req.outputs == ["TRANSLATION"]
    assert req.inputs[0].data.tolist() == [b"a", b"b"] and not req.binary_outputs
    out = kserve.Tensor("SCORE", "FP32", [2], np.array([0.5, -1], dtype=np.float32))
    content, headers = kserve_http.encode_response("m", 1, req, [out])
    assert headers["content-type"] == "application/json"
    assert json.loads(content) == {"model_name": "m", "model_version": "1", "id": "7",
                                   "outputs": [{"name": "SCORE", "datatype": "FP32", "shape": [2], "data": [0.5, -1.0]}]}  # fmt: skip


def test_binary_request_and_response() -> None:
    text = kserve.serialize_bytes(np.array([b"5 mars 2024"], dtype=np.object_))
    pixels = np.zeros((1, 2, 2), dtype=np.uint8).tobytes()
    header = {"inputs": [
        {"name": "TEXT", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(text)}},
        {"name": "PIXELS", "datatype": "UINT8", "shape": [1, 2, 2], "parameters": {"binary_data_size": len(pixels)}},
    ], "parameters": {"binary_data_output": True}}  # fmt: skip
    body, length = binary_body(header, text, pixels)
    req = kserve_http.parse_request(body, length)
    assert req.inputs[0].data.tolist() == [b"5 mars 2024"] and req.inputs[1].data.shape == (1, 2, 2)
    out = kserve.Tensor("TRANSLATION", "BYTES", [1], np.array([b"2024-03-05"], dtype=np.object_))
    content, headers = kserve_http.encode_response("m", 1, req, [out])
    split = int(headers[kserve_http.HEADER_LENGTH])
    meta = json.loads(content[:split])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == len(content) - split
    assert kserve.deserialize_bytes(content[split:], 1, "x").tolist() == [b"2024-03-05"]


@pytest.mark.parametrize(
    ("body", "length", "message"),
    [
        (b"{not json", None, "JSON"),
        (b"[]", None, "inputs"),
        (b'{"inputs": []}', None, "inputs"),
        (b'{"inputs": [{"name": "T", "shape": [1], "data": ["a"]}]}', None, "datatype"),
        (b'{"inputs": [{"name": "T", "datatype": "BYTES", "shape": [1]}]}', None, "needs data"),
        (b'{"inputs": [{"name": "T", "datatype": "BYTES", "shape": [2], "data": ["a"]}]}', None, "2 strings"),
        (b'{"inputs": [{"name": "T", "datatype": "FP32", "shape": [1], "data": [[1, 2], [3]]}]}', None, "T"),
        (
            b'{"inputs": [{"name": "T", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}',
            "9999",
            "does not fit",
        ),
        (
            b'{"inputs": [{"name": "T", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}',
            "abc",
            "does not fit",
        ),
        (  # a digit to str.isdigit(), not to int() (HTTP headers arrive as latin-1)
            b'{"inputs": [{"name": "T", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}',
            "\u00b2",
            "does not fit",
        ),
    ],
)
def test_malformed_bodies_name_the_problem(body: bytes, length: str | None, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        kserve_http.parse_request(body, length)


def test_binary_sizes_that_lie_are_refused() -> None:
    header = {
        "inputs": [{"name": "T", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 100}}]
    }
    body, length = binary_body(header, b"\x01\x00\x00\x00a")
    with pytest.raises(InvalidInput, match="overruns"):
        kserve_http.parse_request(body, length)
    header["inputs"][0]["parameters"]["binary_data_size"] = 5  # type: ignore[index]
    body, length = binary_body(header, b"\x01\x00\x00\x00a", b"extra")
    with pytest.raises(InvalidInput, match="belong to no input"):
        kserve_http.parse_request(body, length)


@pytest.mark.parametrize(
    ("task", "params", "named", "outputs"),
    [
        ("translation", {}, [], ["TRANSLATION", "SCORE"]),
        ("translation", {"return_attention": True}, [],
         ["TRANSLATION", "SCORE", "SOURCE_TOKENS", "TARGET_TOKENS", "ATTENTION"]),
        ("translation", {"return_attention": True}, ["ATTENTION"], ["ATTENTION"]),
        ("image-classification", {}, [], ["LABELS", "PROBABILITIES"]),
        ("image-classification", {"return_attention": True}, [],
         ["LABELS", "PROBABILITIES", "ROLLOUT", "ATTENTIONS"]),
    ],
)  # fmt: skip
def test_return_attention_adds_the_map_with_what_labels_it(
    tmp_path: Path, task: str, params: dict, named: list[str], outputs: list[str]
) -> None:
    """Unnamed outputs with ``return_attention``: a translation's map comes with the source tokens
    (its columns) as well as the target tokens (its rows)."""
    manifest = entry(f"fake-{task}", task, tmp_path).manifest
    assert kserve.requested_outputs(manifest, named, params) == outputs


@pytest.mark.parametrize(
    ("params", "outputs"),
    [
        ({"return_attention": "false"}, ["TRANSLATION", "SCORE"]),  # a string, read as REST reads it
        ({"return_attention": 0}, ["TRANSLATION", "SCORE"]),
        (
            {"return_attention": "true"},
            ["TRANSLATION", "SCORE", "SOURCE_TOKENS", "TARGET_TOKENS", "ATTENTION"],
        ),
    ],
)
def test_boolean_parameters_are_read_as_booleans(tmp_path: Path, params: dict, outputs: list[str]) -> None:
    manifest = entry("fake-translation", "translation", tmp_path).manifest
    assert kserve.requested_outputs(manifest, [], params) == outputs


@pytest.mark.parametrize(
    ("params", "output_params", "message"),
    [
        ({"return_attention": "maybe"}, {}, "parameters: return_attention: Input should be a valid boolean"),
        ({"return_attention": None}, {}, "parameters: return_attention: Input should be a valid boolean"),
        ({"binary_data_output": [1]}, {}, "parameters: binary_data_output: Input should be a valid boolean"),
        ({}, {"binary_data": "maybe"}, "SCORE: binary_data: Input should be a valid boolean"),
    ],
)
def test_boolean_parameters_of_another_type_are_refused(
    tmp_path: Path, params: dict, output_params: dict, message: str
) -> None:
    body = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["a"]}],
            "outputs": [{"name": "SCORE", "parameters": output_params}], "parameters": params}  # fmt: skip
    manifest = entry("fake-translation", "translation", tmp_path).manifest
    with pytest.raises(InvalidInput, match=message):
        req = kserve_http.parse_request(json.dumps(body).encode(), None)
        kserve.requested_outputs(manifest, req.outputs, req.parameters)


def test_binary_data_output_false_as_a_string_answers_json() -> None:
    body = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["a"]}],
            "outputs": [{"name": "SCORE", "parameters": {"binary_data": "false"}}],
            "parameters": {"binary_data_output": "false"}}  # fmt: skip
    req = kserve_http.parse_request(json.dumps(body).encode(), None)
    out = kserve.Tensor("SCORE", "FP32", [1], np.array([0.5], dtype=np.float32))
    content, headers = kserve_http.encode_response("m", 1, req, [out])
    assert headers["content-type"] == "application/json" and json.loads(content)["outputs"][0]["data"] == [
        0.5
    ]


def test_image_errors_name_the_v2_tensor_element(tmp_path: Path) -> None:
    """A KServe image's errors (undecodable, too many bytes) name ``IMAGE[i]``, not REST's ``image``."""
    manifest = entry("fake-image-classification", "image-classification", tmp_path).manifest
    images = kserve.from_list("IMAGE", "BYTES", [2], ["a", "bb"])
    jobs = kserve.to_requests(manifest, [images], {}, ["LABELS"])
    assert [job.field for job in jobs] == ["IMAGE[0]", "IMAGE[1]"]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("request_id", "expected"), [("a-1", "a-1"), (7, "7"), ({"a": 1}, None), ([1], None), (True, None)]
)
def test_a_request_id_is_a_string_or_a_number(request_id: object, expected: str | None) -> None:
    body = {"id": request_id, "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}
    if expected is None:
        with pytest.raises(InvalidInput, match="id: expected a string"):
            kserve_http.parse_request(json.dumps(body).encode(), None)
    else:
        assert kserve_http.parse_request(json.dumps(body).encode(), None).id == expected


def test_an_output_named_twice_is_refused(tmp_path: Path) -> None:
    manifest = entry("fake-translator", "translation", tmp_path).manifest
    with pytest.raises(InvalidInput, match="outputs: each output named once"):
        kserve.requested_outputs(manifest, ["TRANSLATION", "SCORE", "TRANSLATION"], {})


def test_classification_answers_probabilities_as_triton_s_class_strings(tmp_path: Path) -> None:
    """Triton's classification extension (tritonclient's ``class_count``) on PROBABILITIES, over
    HTTP JSON and binary: the best k as ``"<score>:<index>:<label>"``, k the request's top_k."""
    server, _, classifier, _ = fake_server(tmp_path)
    app = create_app(server)
    pixels = {"name": "PIXELS", "datatype": "UINT8", "shape": [2, 2, 2], "data": [1, 1, 2, 0] * 2}
    named = [{"name": "LABELS"}, {"name": "PROBABILITIES", "parameters": {"classification": 2}}]
    status, _, plain = call(app, "POST", "/v2/models/fake-classifier/infer",
                            json.dumps({"inputs": [pixels], "outputs": [{"name": "LABELS"}, {"name": "PROBABILITIES"},
                                                                        {"name": "INDICES"}]}).encode())  # fmt: skip
    assert status == 200
    labels, probabilities, indices = (o["data"] for o in json.loads(plain)["outputs"])
    for body in ({"inputs": [pixels], "outputs": named},
                 {"inputs": [pixels], "outputs": named, "parameters": {"top_k": 2, "binary_data_output": True}}):  # fmt: skip
        status, headers, content = call(
            app, "POST", "/v2/models/fake-classifier/infer", json.dumps(body).encode()
        )
        assert status == 200, content
        split = int(headers.get("inference-header-content-length", len(content)))
        head = json.loads(content[:split])
        [classes] = [o for o in head["outputs"] if o["name"] == "PROBABILITIES"]
        assert classes["datatype"] == "BYTES" and classes["shape"] == [2, 2]
        if split == len(content):
            strings = classes["data"]
        else:  # binary: after LABELS' bytes, each element is a 4-byte length and its bytes
            tensor = kserve.from_raw(
                "P", "BYTES", [2, 2], content[split:][-classes["parameters"]["binary_data_size"] :]
            )
            strings = [s.decode() for s in tensor.data.ravel()]
        expected = [f"{p:f}:{i}:{name}" for p, i, name in zip(probabilities, indices, labels, strict=True)]
        assert strings == [e for row in range(2) for e in expected[row * 4 : row * 4 + 2]], strings
    assert [job.top_k for job in classifier.jobs[-4:]] == [2, 2, 2, 2]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("task", "classification", "params", "message"),
    [
        ("image-classification", {"LABELS": 3}, {}, "LABELS: classification applies to an image model's PROBABILITIES"),
        ("image-classification", {"PROBABILITIES": 3, "INDICES": 3}, {}, "INDICES: classification applies to"),
        ("translation", {"SCORE": 3}, {}, "SCORE: classification applies to an image model's PROBABILITIES"),
        ("image-classification", {"PROBABILITIES": 0}, {}, "must be a positive integer, got 0"),
        ("image-classification", {"PROBABILITIES": "3"}, {}, "must be a positive integer, got '3'"),
        ("image-classification", {"PROBABILITIES": True}, {}, "must be a positive integer, got True"),
        ("image-classification", {"PROBABILITIES": 3}, {"top_k": 2}, "top_k 2 differs from PROBABILITIES' classification 3"),
    ],
)  # fmt: skip
def test_classification_elsewhere_or_malformed_is_refused(
    tmp_path: Path, task: str, classification: dict, params: dict, message: str
) -> None:
    manifest = entry(f"fake-{task}", task, tmp_path).manifest
    with pytest.raises(InvalidInput, match=message):
        kserve.requested_outputs(manifest, list(classification), params, classification)
