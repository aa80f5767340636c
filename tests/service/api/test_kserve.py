"""The v2 contract: JSON and binary bodies, outputs, classification, and every malformed case."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.api import kserve, kserve_http, kserve_tensors
from service.api.http import create_app
from service.errors import InvalidInput
from tests.service.api.test_rest import call
from tests.service.fakes import entry, fake_server


def binary_body(header: dict, *blobs: bytes) -> tuple[bytes, str]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), str(len(head))


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
    text = kserve_tensors.serialize_bytes(np.array([b"5 mars 2024"], dtype=np.object_))
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
        ("translation", {}, [], ["TRANSLATION", "SCORE", "SOURCE_TOKENS", "TARGET_TOKENS"]),
        ("translation", {"return_attention": True}, [],
         ["TRANSLATION", "SCORE", "SOURCE_TOKENS", "TARGET_TOKENS", "ATTENTION"]),
        ("translation", {"return_attention": True}, ["ATTENTION"], ["ATTENTION"]),
        ("image-classification", {}, [], ["LABELS", "PROBABILITIES", "INDICES"]),
        ("image-classification", {"return_attention": True}, [],
         ["LABELS", "PROBABILITIES", "INDICES", "ROLLOUT", "ATTENTIONS"]),
    ],
)  # fmt: skip
def test_unnamed_outputs_are_every_output_but_the_attention_maps_unless_asked(
    tmp_path: Path, task: str, params: dict, named: list[str], outputs: list[str]
) -> None:
    """The protocol: "if not specified all outputs produced by the model will be returned" — all
    but the attention maps, which are computed only on request; ``return_attention`` adds them."""
    manifest = entry(f"fake-{task}", task, tmp_path).manifest
    assert kserve.requested_outputs(manifest, named, params) == outputs


@pytest.mark.parametrize(
    ("params", "outputs"),
    [
        (
            {"return_attention": "false"},
            ["TRANSLATION", "SCORE", "SOURCE_TOKENS", "TARGET_TOKENS"],
        ),  # a string
        ({"return_attention": 0}, ["TRANSLATION", "SCORE", "SOURCE_TOKENS", "TARGET_TOKENS"]),
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
    req = kserve_http.parse_request(json.dumps(body).encode(), None)
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
        kserve_http.parse_request(head + b"\x01\x00\x00\x00a", str(len(head)))


def test_a_column_of_one_element_per_row_is_taken_as_triton_s_configuration_describes_it(
    tmp_path: Path,
) -> None:
    """``TEXT`` and ``IMAGE`` are ``dims: [1]`` reshaped to ``[]`` in the model configuration: a
    Triton client sends ``[N, 1]`` for them, the metadata's ``[-1]`` is ``[N]``; both are taken."""
    translator = entry("fake-translation", "translation", tmp_path).manifest
    column = kserve_tensors.from_list("TEXT", "BYTES", [2, 1], [["a"], ["b"]])
    [job] = kserve.to_requests(translator, [column], {}, ["TRANSLATION"])
    assert job.texts == ["a", "b"]  # type: ignore[union-attr]
    classifier = entry("fake-image-classification", "image-classification", tmp_path).manifest
    images = kserve_tensors.from_list("IMAGE", "BYTES", [2, 1], [["a"], ["bb"]])
    jobs = kserve.to_requests(classifier, [images], {}, ["LABELS"])
    assert [job.image for job in jobs] == [b"a", b"bb"]  # type: ignore[union-attr]
    wide = kserve_tensors.from_list("TEXT", "BYTES", [1, 2], [["a", "b"]])
    with pytest.raises(
        InvalidInput, match=r"TEXT: expected BYTES with shape \[-1\] or \[-1, 1\], got BYTES \[1, 2\]"
    ):
        kserve.to_requests(translator, [wide], {}, ["TRANSLATION"])


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
    images = kserve_tensors.from_list("IMAGE", "BYTES", [2], ["a", "bb"])
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


@pytest.mark.parametrize(
    ("parameters", "classes", "shown", "ranked"),
    [
        ({}, 2, 4, 5),  # LABELS keep the default top_k (5; the fake has 4 classes)
        ({"top_k": 2, "binary_data_output": True}, 2, 2, 2),
        ({"top_k": 1}, 3, 1, 3),  # the jobs rank 3 for PROBABILITIES; LABELS keep 1
    ],
)
def test_classification_answers_probabilities_as_triton_s_class_strings_and_only_them(
    tmp_path: Path, parameters: dict, classes: int, shown: int, ranked: int
) -> None:
    """Triton's classification extension (tritonclient's ``class_count``) on PROBABILITIES, over
    HTTP JSON and binary: the best k as ``"<score>:<index>:<label>"``; the other outputs keep the
    request's ``top_k``, as in Triton, where the parameter changes only the output it is set on."""
    server, _, classifier, _ = fake_server(tmp_path)
    app = create_app(server)
    pixels = {"name": "PIXELS", "datatype": "UINT8", "shape": [2, 2, 2], "data": [1, 1, 2, 0] * 2}
    status, _, plain = call(app, "POST", "/v2/models/fake-classifier/infer",
                            json.dumps({"inputs": [pixels], "outputs": [{"name": "LABELS"}, {"name": "PROBABILITIES"},
                                                                        {"name": "INDICES"}]}).encode())  # fmt: skip
    assert status == 200
    labels, probabilities, indices = (o["data"] for o in json.loads(plain)["outputs"])
    expected = [f"{p:f}:{i}:{name}" for p, i, name in zip(probabilities, indices, labels, strict=True)]
    named = [{"name": "LABELS"}, {"name": "PROBABILITIES", "parameters": {"classification": classes}}]
    body = {"inputs": [pixels], "outputs": named, "parameters": parameters}
    status, headers, content = call(
        app, "POST", "/v2/models/fake-classifier/infer", json.dumps(body).encode()
    )
    assert status == 200, content
    split = int(headers.get("inference-header-content-length", len(content)))
    head = json.loads(content[:split])
    answered = {o["name"]: o for o in head["outputs"]}
    assert answered["PROBABILITIES"]["datatype"] == "BYTES" and answered["PROBABILITIES"]["shape"] == [
        2,
        classes,
    ]
    assert answered["LABELS"]["shape"] == [2, shown]
    if split == len(content):
        strings, label_rows = answered["PROBABILITIES"]["data"], answered["LABELS"]["data"]
    else:  # binary: LABELS' bytes, then PROBABILITIES'; each element a 4-byte length and its bytes
        size = answered["LABELS"]["parameters"]["binary_data_size"]
        label_rows = [
            s.decode()
            for s in kserve_tensors.from_raw("L", "BYTES", [2, shown], content[split:][:size]).data.ravel()
        ]
        tensor = kserve_tensors.from_raw("P", "BYTES", [2, classes], content[split:][size:])
        strings = [s.decode() for s in tensor.data.ravel()]
    assert strings == [e for row in range(2) for e in expected[row * 4 : row * 4 + classes]], strings
    assert label_rows == [e for row in range(2) for e in labels[row * 4 : row * 4 + shown]]
    assert [job.top_k for job in classifier.jobs[-2:]] == [ranked, ranked]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("task", "classification", "params", "message"),
    [
        ("image-classification", {"LABELS": 3}, {}, "LABELS: classification applies to an image model's PROBABILITIES"),
        ("image-classification", {"PROBABILITIES": 3, "INDICES": 3}, {}, "INDICES: classification applies to"),
        ("translation", {"SCORE": 3}, {}, "SCORE: classification applies to an image model's PROBABILITIES"),
        ("image-classification", {"PROBABILITIES": 0}, {}, "must be a positive integer, got 0"),
        ("image-classification", {"PROBABILITIES": "3"}, {}, "must be a positive integer, got '3'"),
        ("image-classification", {"PROBABILITIES": True}, {}, "must be a positive integer, got True"),
    ],
)  # fmt: skip
def test_classification_elsewhere_or_malformed_is_refused(
    tmp_path: Path, task: str, classification: dict, params: dict, message: str
) -> None:
    manifest = entry(f"fake-{task}", task, tmp_path).manifest
    with pytest.raises(InvalidInput, match=message):
        kserve.requested_outputs(manifest, list(classification), params, classification)


def test_an_answer_names_the_version_that_produced_it(tmp_path: Path) -> None:
    """A newer version swapped in between the route's lookup and the model's answer: the answer
    names the version that computed it (the REST answers always did), over HTTP and gRPC."""
    from service.api.grpc_servicer import GrpcServicer
    from service.api.protos import grpc_service_pb2 as pb

    server, translator, _, _ = fake_server(tmp_path)
    translator.version = 2  # the model answers as version 2; the served entry still says 1
    body = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["ab"]}]}
    status, _, content = call(
        create_app(server), "POST", "/v2/models/fake-translator/infer", json.dumps(body).encode()
    )
    assert status == 200 and json.loads(content)["model_version"] == "2"
    request = pb.ModelInferRequest(model_name="fake-translator")
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"ab")

    class Context:
        def invocation_metadata(self) -> list:
            return []

    reply = asyncio.run(GrpcServicer(server).ModelInfer(request, Context()))  # type: ignore[arg-type]
    assert reply.model_version == "2"
    request.parameters["stream"].bool_param = True  # a decoupled answer: its final response too

    async def streamed() -> list[Any]:
        async def one() -> Any:
            yield request

        return [r async for r in GrpcServicer(server).ModelStreamInfer(one(), Context())]  # type: ignore[arg-type]

    [final] = asyncio.run(streamed())
    assert not final.error_message and final.infer_response.model_version == "2"


def test_a_classification_over_the_top_k_limit_is_named_as_itself(tmp_path: Path) -> None:
    server, _, _, _ = fake_server(tmp_path, limits={"max_top_k": 3})
    pixels = {"name": "PIXELS", "datatype": "UINT8", "shape": [1, 2, 2], "data": [1, 1, 2, 0]}
    body = {"inputs": [pixels], "parameters": {"top_k": 2},
            "outputs": [{"name": "PROBABILITIES", "parameters": {"classification": 4}}]}  # fmt: skip
    status, _, content = call(
        create_app(server), "POST", "/v2/models/fake-classifier/infer", json.dumps(body).encode()
    )
    assert status == 422
    assert json.loads(content) == {"error": "PROBABILITIES: classification 4 exceeds the limit of 3"}


def test_images_split_between_two_versions_by_a_swap_are_refused_to_be_retried(tmp_path: Path) -> None:
    """One v2 answer names one version: a batch whose images two versions computed (a swap in
    between) answers 503, retryable, instead of naming one of them for all."""
    server, _, classifier, recorded = fake_server(tmp_path)
    predict, calls = classifier.predict, {"n": 0}

    async def swapping(job: Any) -> Any:
        calls["n"] += 1
        classifier.version = 1 if calls["n"] == 1 else 2
        return await predict(job)

    classifier.predict = swapping  # type: ignore[method-assign]
    pixels = {"name": "PIXELS", "datatype": "UINT8", "shape": [2, 2, 2], "data": [1, 1, 2, 0] * 2}
    body = json.dumps({"inputs": [pixels]}).encode()
    status, _, content = call(create_app(server), "POST", "/v2/models/fake-classifier/infer", body)
    assert status == 503 and "moved from version 1 to 2" in json.loads(content)["error"]
    assert recorded.records[-1] == ("fake-classifier", "v2_infer", 503)  # counted as what it answered
    calls["n"] = 1  # from here on, every image is version 2's
    status, _, content = call(create_app(server), "POST", "/v2/models/fake-classifier/infer", body)
    assert status == 200 and json.loads(content)["model_version"] == "2"
