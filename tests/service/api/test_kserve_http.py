"""The KServe v2 HTTP body (``service/api/kserve_http.py``): JSON and binary-extension requests
and answers, and every way a body can lie — lengths, sizes, shapes, counts — each refused naming
the part before anything larger than it says is read."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.api import kserve, kserve_http, kserve_tensors
from service.errors import InvalidInput, PayloadTooLarge
from service.settings import Limits

#: the most elements a request's BYTES tensor may hold, as the server passes its limits
ITEMS = 64
VALUES = Limits().max_json_values


def binary_body(header: dict, *blobs: bytes) -> tuple[bytes, str]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), str(len(head))


def test_json_request_and_response() -> None:
    body = {"id": "7", "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]}],
            "outputs": [{"name": "TRANSLATION"}], "parameters": {"beam_size": 2}}  # fmt: skip
    req = kserve_http.parse_request(json.dumps(body).encode(), None, ITEMS, VALUES)
    assert req.id == "7" and req.parameters == {"beam_size": 2} and req.outputs == ["TRANSLATION"]
    assert req.inputs[0].data.tolist() == [b"a", b"b"] and not req.binary_outputs
    out = kserve.Tensor("SCORE", "FP32", [2], np.array([0.5, -1], dtype=np.float32))
    content, headers = kserve_http.encode_response("m", 1, req, [out])
    assert headers["content-type"] == "application/json"
    assert json.loads(content) == {"model_name": "m", "model_version": "1", "id": "7",
                                   "outputs": [{"name": "SCORE", "datatype": "FP32", "shape": [2], "data": [0.5, -1.0]}]}  # fmt: skip


def test_json_values_are_counted_in_the_json_part_only() -> None:
    """The value limit applies to the JSON of a request; a binary tail (commas are bytes 0x2C
    there) is not parsed value by value and not counted."""
    pixels = np.full((1, 100, 100), ord(","), dtype=np.uint8)
    header = {"inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": [1, 100, 100],
                          "parameters": {"binary_data_size": pixels.size}}]}  # fmt: skip
    body, length = binary_body(header, pixels.tobytes())
    assert kserve_http.parse_request(body, length, ITEMS, 100).inputs[0].data.shape == (1, 100, 100)
    assert kserve_http.json_length(body, length) == int(length) and kserve_http.json_length(
        body, None
    ) == len(body)
    listed = {"inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": [1, 100, 100],
                          "data": pixels.ravel().tolist()}]}  # fmt: skip
    with pytest.raises(PayloadTooLarge, match=r"^body: [\d,]+ JSON values, over the limit of 10,000"):
        kserve_http.parse_request(json.dumps(listed).encode(), None, ITEMS, 10_000)


def test_binary_request_and_response() -> None:
    text = kserve_tensors.serialize_bytes(np.array([b"5 mars 2024"], dtype=np.object_))
    pixels = np.zeros((1, 2, 2), dtype=np.uint8).tobytes()
    header = {"inputs": [
        {"name": "TEXT", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(text)}},
        {"name": "PIXELS", "datatype": "UINT8", "shape": [1, 2, 2], "parameters": {"binary_data_size": len(pixels)}},
    ], "parameters": {"binary_data_output": True}}  # fmt: skip
    body, length = binary_body(header, text, pixels)
    req = kserve_http.parse_request(body, length, ITEMS, VALUES)
    assert req.inputs[0].data.tolist() == [b"5 mars 2024"] and req.inputs[1].data.shape == (1, 2, 2)
    out = kserve.Tensor("TRANSLATION", "BYTES", [1], np.array([b"2024-03-05"], dtype=np.object_))
    content, headers = kserve_http.encode_response("m", 1, req, [out])
    split = int(headers[kserve_http.HEADER_LENGTH])
    meta = json.loads(content[:split])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == len(content) - split
    assert kserve_tensors.deserialize_bytes(content[split:], 1, "x").tolist() == [b"2024-03-05"]


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
        (
            b'{"inputs": [{"name": "T", "datatype": "BYTES", "shape": [1], "data": ["a"]}], "outputs": 5}',
            None,
            "outputs: a list of output tensors, got int",
        ),
        (
            b'{"inputs": [{"name": "T", "datatype": "BYTES", "shape": [1], "data": ["a"]}], "outputs": true}',
            None,
            "outputs: a list of output tensors, got bool",
        ),
        # beside a zero the product passes: numpy refused the shape with a 500
        (
            b'{"inputs": [{"name": "T", "datatype": "BYTES", "shape": [0, 4611686018427387904], "data": []}]}',
            None,
            r"T: shape \[0, 4611686018427387904\] is too large",
        ),
        (
            b'{"inputs": [{"name": "P", "datatype": "UINT8", "shape": [0, 4611686018427387904, 2], "data": []}]}',
            None,
            "P: shape .* is too large",
        ),
        (
            b'{"inputs": [{"name": "T", "datatype": "BYTES", "shape": [2], "data": ["a", "b", "c"]}]}',
            None,
            "T: BYTES data must be 2 strings",
        ),
        (
            b'{"inputs": ['
            + b", ".join([b'{"name": "T", "datatype": "BYTES", "shape": [1], "data": ["a"]}'] * 17)
            + b"]}",
            None,
            "inputs: 17 entries, at most 16 per request",
        ),
        (  # counted before they are walked
            b'{"inputs": [{"name": "T", "datatype": "BYTES", "shape": [1], "data": ["a"]}], "outputs": ['
            + b", ".join([b"{}"] * 17)
            + b"]}",
            None,
            "outputs: 17 entries, at most 16 per request",
        ),
        (  # a zero beside dimensions numpy cannot address together
            b'{"inputs": [{"name": "P", "datatype": "UINT8", "shape": [0, 67108864, 67108864, 67108864], "data": []}]}',
            None,
            "P: shape .* is too large",
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
        kserve_http.parse_request(body, length, ITEMS, VALUES)


def test_a_bytes_tensor_over_the_element_limit_is_refused_before_its_elements_are_read() -> None:
    """2 million one-byte images fit the body limit; decoding them element by element held the
    event loop for 10 s before the images-per-request limit was looked at. Now the shape is
    enough: 413, and data holding more elements than its shape is refused at the first extra."""
    n = 2_000_000
    element = b"\x01\x00\x00\x00\x89"
    header = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [n],
                          "parameters": {"binary_data_size": 5 * n}}]}  # fmt: skip
    body, length = binary_body(header, element * n)
    with pytest.raises(PayloadTooLarge, match=f"IMAGE: shape holds {n} elements, over the limit of {ITEMS}"):
        kserve_http.parse_request(body, length, ITEMS, VALUES)
    header["inputs"][0]["shape"] = [2]  # type: ignore[index]
    body, length = binary_body(header, element * n)
    with pytest.raises(InvalidInput, match="IMAGE: data holds more than the 2 elements of its shape"):
        kserve_http.parse_request(body, length, ITEMS, VALUES)
    listed = {
        "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [ITEMS + 1], "data": ["a"] * (ITEMS + 1)}]
    }
    with pytest.raises(PayloadTooLarge, match=f"TEXT: shape holds {ITEMS + 1} elements"):
        kserve_http.parse_request(json.dumps(listed).encode(), None, ITEMS, VALUES)


def test_binary_sizes_that_lie_are_refused() -> None:
    header = {
        "inputs": [{"name": "T", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 100}}]
    }
    body, length = binary_body(header, b"\x01\x00\x00\x00a")
    with pytest.raises(InvalidInput, match="overruns"):
        kserve_http.parse_request(body, length, ITEMS, VALUES)
    header["inputs"][0]["parameters"]["binary_data_size"] = 5  # type: ignore[index]
    body, length = binary_body(header, b"\x01\x00\x00\x00a", b"extra")
    with pytest.raises(InvalidInput, match="belong to no input"):
        kserve_http.parse_request(body, length, ITEMS, VALUES)


@pytest.mark.parametrize(
    ("request_flag", "output_flags", "binary"),
    [
        (True, {"SCORE": False}, {"TRANSLATION"}),  # an output's own false overrides the request's true
        (False, {"SCORE": True}, {"SCORE"}),
        (True, {}, {"TRANSLATION", "SCORE"}),
        (None, {"TRANSLATION": "true"}, {"TRANSLATION"}),
    ],
)
def test_an_output_s_own_binary_data_overrides_the_request_s(
    request_flag: bool | None, output_flags: dict, binary: set[str]
) -> None:
    """Triton's binary extension: "If binary_data is specified on an output it overrides this
    setting" (``binary_data_output``) — in both directions."""
    outputs = [
        {
            "name": name,
            **({"parameters": {"binary_data": output_flags[name]}} if name in output_flags else {}),
        }
        for name in ("TRANSLATION", "SCORE")
    ]
    params = {} if request_flag is None else {"binary_data_output": request_flag}
    body = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["a"]}],
            "outputs": outputs, "parameters": params}  # fmt: skip
    req = kserve_http.parse_request(json.dumps(body).encode(), None, ITEMS, VALUES)
    tensors = [
        kserve.Tensor("TRANSLATION", "BYTES", [1], np.array([b"x"], dtype=np.object_)),
        kserve.Tensor("SCORE", "FP32", [1], np.array([0.5], dtype=np.float32)),
    ]
    content, headers = kserve_http.encode_response("m", 1, req, tensors)
    split = int(headers.get(kserve_http.HEADER_LENGTH, len(content)))
    answered = {o["name"]: o for o in json.loads(content[:split])["outputs"]}
    assert {n for n, o in answered.items() if "binary_data_size" in o.get("parameters", {})} == binary
    assert {n for n, o in answered.items() if "data" in o} == {"TRANSLATION", "SCORE"} - binary


def test_a_binary_data_size_that_is_not_a_count_is_named_so() -> None:
    body = {
        "inputs": [
            {"name": "TEXT", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": "5"}}
        ]
    }
    head = json.dumps(body).encode()
    with pytest.raises(InvalidInput, match=r"TEXT: binary_data_size must be a non-negative integer, got '5'"):
        kserve_http.parse_request(head + b"\x01\x00\x00\x00a", str(len(head)), ITEMS, VALUES)


def test_binary_data_output_false_as_a_string_answers_json() -> None:
    body = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["a"]}],
            "outputs": [{"name": "SCORE", "parameters": {"binary_data": "false"}}],
            "parameters": {"binary_data_output": "false"}}  # fmt: skip
    req = kserve_http.parse_request(json.dumps(body).encode(), None, ITEMS, VALUES)
    out = kserve.Tensor("SCORE", "FP32", [1], np.array([0.5], dtype=np.float32))
    content, headers = kserve_http.encode_response("m", 1, req, [out])
    assert headers["content-type"] == "application/json" and json.loads(content)["outputs"][0]["data"] == [
        0.5
    ]


@pytest.mark.parametrize(
    ("request_id", "expected"), [("a-1", "a-1"), (7, "7"), ({"a": 1}, None), ([1], None), (True, None)]
)
def test_a_request_id_is_a_string_or_a_number(request_id: object, expected: str | None) -> None:
    body = {"id": request_id, "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}
    if expected is None:
        with pytest.raises(InvalidInput, match="id: expected a string"):
            kserve_http.parse_request(json.dumps(body).encode(), None, ITEMS, VALUES)
    else:
        assert kserve_http.parse_request(json.dumps(body).encode(), None, ITEMS, VALUES).id == expected
