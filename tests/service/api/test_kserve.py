"""The v2 contract over the core: outputs asked for and answered, parameters, classification, limits
and versions (the HTTP body itself: ``test_kserve_http.py``)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from service.api import kserve, kserve_http, kserve_tensors
from service.api.http import create_app
from service.errors import InvalidInput
from tests.service.api.test_kserve_http import ITEMS, VALUES, binary_body
from tests.service.api.test_rest import call
from tests.service.fakes import entry, fake_server


def test_a_pixel_batch_over_the_image_limit_is_refused_before_a_job_per_row(tmp_path: Path) -> None:
    """A [2000000, 1, 1] PIXELS tensor is 2 MB: a job per row was made before the images-per-request
    limit was looked at. Served: 413 naming the tensor."""
    server, _, _, _ = fake_server(tmp_path, limits={"max_images": 4})
    n = 2_000_000
    header = {"inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": [n, 1, 1],
                          "parameters": {"binary_data_size": n}}]}  # fmt: skip
    body, length = binary_body(header, bytes(n))
    status, _, content = call(
        create_app(server), "POST", "/v2/models/fake-classifier/infer", body,
        {"inference-header-content-length": length},
    )  # fmt: skip
    assert status == 413
    assert json.loads(content) == {"error": f"PIXELS: {n} images exceed the limit of 4 per request"}


@pytest.mark.parametrize("count", [65, 300])
def test_texts_over_the_limit_are_a_413_naming_text_whatever_the_image_limit(
    tmp_path: Path, count: int
) -> None:
    """A BYTES tensor may hold up to the larger of the two limits (``limits.tensor_items``): with
    more images allowed than the schema's 256 texts, 300 texts reached the schema and were a 422
    naming REST's ``text``, not the served limit."""
    server, _, _, _ = fake_server(tmp_path, limits={"max_images": 512, "max_texts": 64})
    body = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [count], "data": ["x"] * count}]}
    status, _, content = call(
        create_app(server), "POST", "/v2/models/fake-translator/infer", json.dumps(body).encode(),
        {"content-type": "application/json"},
    )  # fmt: skip
    assert status == 413, content
    assert json.loads(content) == {"error": f"TEXT: {count} texts exceed the limit of 64"}


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
        req = kserve_http.parse_request(json.dumps(body).encode(), None, ITEMS, VALUES)
        kserve.requested_outputs(manifest, req.outputs, req.parameters)


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


def test_image_errors_name_the_v2_tensor_element(tmp_path: Path) -> None:
    """A KServe image's errors (undecodable, too many bytes) name ``IMAGE[i]``, not REST's ``image``."""
    manifest = entry("fake-image-classification", "image-classification", tmp_path).manifest
    images = kserve_tensors.from_list("IMAGE", "BYTES", [2], ["a", "bb"])
    jobs = kserve.to_requests(manifest, [images], {}, ["LABELS"])
    assert [job.field for job in jobs] == ["IMAGE[0]", "IMAGE[1]"]  # type: ignore[union-attr]


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
