"""Right answers under mixed traffic: several models at once — two RNN translators of one family
sharing a tokenizer, a Transformer, a ViT and its int8 variant — over REST, KServe v2 HTTP, KServe
v2 gRPC and attention.v1 gRPC at the same time, in the default frontend and behind Ray's proxy.
Every answer must name the model asked for and equal what that model answers alone, streams must
end in the plain call's answer, and Triton's statistics must count every request once. Under the
same service (batches of 4, a small response limit), the limits: requests larger than a batch (up
to ``limits.max_texts``) come back whole and in order, an answer over
``limits.max_response_bytes`` and a chunked body over the body limit are refused, and OpenAPI
shows the limits as enforced. The workload and its clients are ``mixed_workload``'s."""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
import requests
from google.protobuf import json_format
from onnx import numpy_helper

from service.api.protos import attention_pb2 as apb
from service.api.protos import attention_pb2_grpc as apb_grpc
from service.api.protos import grpc_service_pb2 as pb
from service.api.protos import grpc_service_pb2_grpc as pb_grpc
from service.inference.manifest import Manifest
from tests.conftest import Service, running_service
from tests.service.mixed_workload import (
    DATES,
    IMAGES,
    MAX_BATCH,
    MAX_RESPONSE,
    MAX_TEXTS,
    PROTOCOLS,
    TRANSLATORS,
    TWINS,
    Answer,
    channel,
    rest,
    workload,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mixed_repository(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny models plus ``dates-bahdanau-b``: the tiny ``dates-bahdanau`` with every float
    weight of its graphs moved by noise (a tenth of the tensor's spread) — same family, same
    character tokenizer, different weights."""
    out = tmp_path_factory.mktemp("mixed") / "repository"
    out.mkdir()
    for model in tiny_repository.iterdir():
        (out / model.name).symlink_to(model, target_is_directory=True)
    source, twin = tiny_repository / "dates-bahdanau" / "1", out / "dates-bahdanau-b" / "1"
    shutil.copytree(source, twin)
    rng = np.random.default_rng(0)
    manifest = Manifest.load(source)
    for spec in manifest.graphs.values():
        graph = onnx.load(str(twin / spec.file))
        for weight in graph.graph.initializer:
            value = numpy_helper.to_array(weight)
            if value.dtype == np.float32 and value.size > 1:
                moved = value + rng.normal(0, 0.1 * float(value.std()), value.shape).astype(np.float32)
                weight.CopyFrom(numpy_helper.from_array(moved, weight.name))
        onnx.save(graph, str(twin / spec.file))
    # its scores are not the original's: none, rather than false ones
    manifest.model_copy(update={"name": "dates-bahdanau-b", "eval": {}, "eval_details": {}}).write(twin)
    digests = {
        hashlib.sha256((out / name / "1" / "source_tokenizer.json").read_bytes()).hexdigest()
        for name in TWINS
    }
    assert len(digests) == 1, "the twins must share a tokenizer"
    return out


@pytest.fixture(scope="module", params=["in-replica", "ray-proxy"])
def mixed_service(
    request: pytest.FixtureRequest, mixed_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    with running_service(
        mixed_repository,
        tmp_path_factory.mktemp(f"mixed-{request.param}"),
        ATTN_FRONTEND=request.param,
        ATTN_BATCHING__MAX_BATCH_SIZE=str(MAX_BATCH),
        ATTN_LIMITS__MAX_RESPONSE_BYTES=str(MAX_RESPONSE),
    ) as svc:
        yield svc


def test_every_answer_is_its_own_models_under_mixed_concurrent_traffic(mixed_service: Service) -> None:
    calls = [(protocol, model, payload) for protocol in PROTOCOLS for model, payload in workload()]
    alone = {i: PROTOCOLS[p](mixed_service, m, x) for i, (p, m, x) in enumerate(calls)}
    # the test can tell the models apart: same-family twins and fp32/int8 answer differently
    by_model: dict[str, list[Answer]] = {}
    for i, (p, m, _) in enumerate(calls):
        if p == "rest":
            by_model.setdefault(m, []).append(alone[i])
    for a, b in (TWINS, IMAGES):
        assert any(
            not np.allclose(x.values, y.values, atol=1e-4)
            for x, y in zip(by_model[a], by_model[b], strict=True)
        ), f"{a} and {b} answer alike: a mix-up could not be seen"
    assert all(alone[i].model == m for i, (_, m, _) in enumerate(calls))

    order = [i for i in range(len(calls)) for _ in range(3)]
    random.Random(1).shuffle(order)

    def send(i: int) -> tuple[int, Answer]:
        protocol, model, payload = calls[i]
        return i, PROTOCOLS[protocol](mixed_service, model, payload)

    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(send, order))
    wrong = [(calls[i][:2], got, alone[i]) for i, got in together if not got.matches(alone[i])]
    assert not wrong, f"{len(wrong)} of {len(together)} answers differ from the model's own: {wrong[:3]}"


def test_streams_in_every_frontend(mixed_service: Service) -> None:
    """Streams on two models at once, over SSE and attention.v1 TranslateStream — through Ray's
    proxy and a streaming deployment handle in the ray-proxy frontend: the tokens as chosen,
    then the answer the plain call gives."""

    def sse(model: str, text: str) -> tuple[list[str], str]:
        body = {"text": text, "stream": True}
        url = f"{mixed_service.url}/v1/models/{model}/translate"
        with requests.post(url, json=body, stream=True, timeout=60) as r:
            assert r.status_code == 200, r.text
            data = [
                json.loads(line[6:])
                for line in r.iter_lines(decode_unicode=True)
                if line.startswith("data: ")
            ]
        *tokens, answer = data
        return [t["text"] for t in tokens], answer["translations"][0]["text"]

    def grpc_stream(model: str, text: str) -> tuple[list[str], str]:
        with grpc.insecure_channel(mixed_service.grpc_target) as channel:
            stub = apb_grpc.AttentionServiceStub(channel)
            *tokens, last = stub.TranslateStream(apb.TranslateRequest(model=model, texts=[text]))
        return [t.token.text for t in tokens], last.answer.translations[0].text

    calls = [
        (f, m, d)
        for f in (sse, grpc_stream)
        for m in ("dates-transformer", "dates-bahdanau")
        for d in DATES[:4]
    ]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda c: c[0](c[1], c[2]), calls))
    for (_, model, text), (pieces, answer) in zip(calls, results, strict=True):
        assert pieces and "".join(pieces) == answer
        plain = requests.post(
            f"{mixed_service.url}/v1/models/{model}/translate", json={"text": text}, timeout=60
        )
        assert plain.json()["translations"][0]["text"] == answer


def test_statistics_count_every_request_of_every_model(mixed_service: Service) -> None:
    """Triton's statistics, configuration and repository-index extensions under the mixed load:
    every protocol's requests to five models at once, from 16 threads, are each counted once, on
    their own model, with their texts or images — the same over HTTP and gRPC, in both frontends."""
    stub = pb_grpc.GRPCInferenceServiceStub(channel(mixed_service))

    def http_stats() -> dict[str, dict[str, Any]]:
        got = mixed_service.get("/v2/models/stats")
        assert got.status_code == 200, got.text
        return {s["name"]: s for s in got.json()["model_stats"]}

    before = http_stats()
    calls = [(protocol, model, payload) for protocol in PROTOCOLS for model, payload in workload()]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda c: PROTOCOLS[c[0]](mixed_service, c[1], c[2]), calls))
    after = http_stats()
    over_grpc = json_format.MessageToDict(
        stub.ModelStatistics(pb.ModelStatisticsRequest(), timeout=30), preserving_proto_field_name=True
    )
    assert (
        sorted(after) == sorted(s["name"] for s in over_grpc["model_stats"]) == sorted(TRANSLATORS + IMAGES)
    )
    for model in TRANSLATORS + IMAGES:
        sent = [payload for _, m, payload in calls if m == model]
        items = len(sent) if model in IMAGES else sum(len(texts) for texts, _ in sent)
        a, b = after[model], before[model]
        requests_done = a["inference_stats"]["success"]["count"] - b["inference_stats"]["success"]["count"]
        assert requests_done == len(sent), model
        assert a["inference_count"] - b["inference_count"] == items, model
        assert a["inference_stats"]["fail"]["count"] == b["inference_stats"]["fail"]["count"], model
        assert a["execution_count"] > b["execution_count"] and a["last_inference"] >= b["last_inference"]
        batched = sum(x["batch_size"] * x["compute_infer"]["count"] for x in a["batch_stats"])
        if model in IMAGES:  # every image computed once, in batches of at most MAX_BATCH
            assert (
                batched - sum(x["batch_size"] * x["compute_infer"]["count"] for x in b["batch_stats"])
                == items
            )
            assert max(x["batch_size"] for x in a["batch_stats"]) <= MAX_BATCH
        grpc_side = next(s for s in over_grpc["model_stats"] if s["name"] == model)
        assert int(grpc_side["inference_count"]) == a["inference_count"], model  # nothing sent since

    for model in ("dates-transformer", "fashion-vit"):
        config = mixed_service.get(f"/v2/models/{model}/config").json()
        typed = stub.ModelConfig(pb.ModelConfigRequest(name=model), timeout=30).config
        assert json_format.MessageToDict(typed, preserving_proto_field_name=True)["name"] == model
        assert config["max_batch_size"] == typed.max_batch_size == 64  # limits.max_texts, max_images
        assert config["dynamic_batching"]["preferred_batch_size"] == [MAX_BATCH]
        metadata = mixed_service.get(f"/v2/models/{model}").json()
        assert (
            [t["name"] for t in config["input"]]
            == [t.name for t in typed.input]
            == [t["name"] for t in metadata["inputs"]]
        )
    index = mixed_service.post("/v2/repository/index").json()
    assert {(m["name"], m["state"]) for m in index} == {(m, "READY") for m in TRANSLATORS + IMAGES}
    typed_index = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=30)
    assert sorted(m.name for m in typed_index.models) == sorted(TRANSLATORS + IMAGES)


@pytest.mark.parametrize("beam", [1, 3])
def test_requests_larger_than_a_batch_come_back_whole_and_in_order(mixed_service: Service, beam: int) -> None:
    for n in (MAX_BATCH + 1, MAX_TEXTS):
        texts = [DATES[i % len(DATES)] for i in range(n)]
        whole = rest(mixed_service, "dates-transformer", (texts, beam))
        assert len(whole.texts) == n
        singles = {t: rest(mixed_service, "dates-transformer", ([t], beam)) for t in DATES}
        for i, text in enumerate(texts):
            assert whole.texts[i] == singles[text].texts[0]
            assert abs(whole.values[i] - singles[text].values[0]) < 1e-4
    too_many = mixed_service.post(
        "/v1/models/dates-transformer/translate", json={"text": ["1 mai 2000"] * (MAX_TEXTS + 1)}
    )
    assert too_many.status_code == 413 and "limit of 64" in too_many.json()["error"]


def test_an_answer_over_the_size_limit_is_refused_up_front(mixed_service: Service) -> None:
    """64 texts with every layer's attention could reach ~1 MB of JSON on the tiny Transformer
    (2 layers × 4 heads): refused before any work, naming the setting; without every layer it
    fits and is answered."""
    texts = ["3 juin 1980"] * MAX_TEXTS
    url = "/v1/models/dates-transformer/translate"
    body = {"text": texts, "return_attention": True, "attention_layers": "all"}
    refused = mixed_service.post(url, json=body)
    assert refused.status_code == 422, refused.text
    assert "limits.max_response_bytes" in refused.json()["error"]
    fits = mixed_service.post(url, json={**body, "attention_layers": "default"})
    assert fits.status_code == 200 and len(fits.content) < MAX_RESPONSE

    # every layer of one image (~197 kB) fits; two in one KServe v2 request do not: each image was
    # checked alone, and 64 of them made a 16 MB answer under a 256 kB limit
    def images(count: int) -> dict[str, Any]:
        pixels = {
            "name": "PIXELS",
            "datatype": "UINT8",
            "shape": [count, 28, 28],
            "data": [0] * (count * 784),
        }
        return {"inputs": [pixels], "outputs": [{"name": "ATTENTIONS"}]}

    one = mixed_service.post("/v2/models/fashion-vit/infer", json=images(1))
    assert one.status_code == 200 and len(one.content) < MAX_RESPONSE, one.text[:300]
    two = mixed_service.post("/v2/models/fashion-vit/infer", json=images(2))
    assert two.status_code == 422 and "limits.max_response_bytes" in two.json()["error"], two.text[:300]
    assert "fewer images" in two.json()["error"]


def test_a_chunked_body_is_cut_at_the_limit(mixed_service: Service, request: pytest.FixtureRequest) -> None:
    """No Content-Length: the service reads the stream up to its limit (the largest image,
    base64, plus room: ~11 MB by default), answers 413 and closes, while the client still has
    most of its 200 MB to send. Behind Ray's proxy only the 413 is ours: the proxy reads the
    client's socket and goes on reading after the replica refused (117 MB once, under 100 MB
    in three other runs), so how much it reads is Ray's, not the service's."""
    host, port = mixed_service.url.removeprefix("http://").split(":")
    chunk = b"x" * (1 << 20)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/models/dates-transformer/translate HTTP/1.1\r\nHost: test\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        sent = 0
        with contextlib.suppress(OSError):  # the server closing mid-stream is the point
            while sent < 200 * len(chunk):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        answer = b""
        with contextlib.suppress(OSError):
            while part := sock.recv(65536):
                answer += part
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer[:500]
    assert "body" in json.loads(body)["error"]
    if request.node.callspec.params["mixed_service"] == "in-replica":  # our own server reads it
        assert sent < 100 * len(chunk), f"the server read {sent >> 20} MB before refusing"


def test_openapi_shows_the_limits_the_service_enforces(mixed_service: Service) -> None:
    document = mixed_service.get("/openapi.json").json()
    bodies = [
        document["paths"]["/v1/models/{name}/translate"]["post"]["requestBody"]["content"][
            "application/json"
        ],
        document["paths"]["/v1/models/{name}/classify"]["post"]["requestBody"]["content"]["application/json"],
    ]
    translate, classify = (b["schema"]["properties"] for b in bodies)
    assert translate["beam_size"]["maximum"] == 8  # limits.max_beam_size, not the schema's 64
    [array] = [v for v in translate["text"]["anyOf"] if v.get("type") == "array"]
    assert array["maxItems"] == MAX_TEXTS and array["items"]["maxLength"] == 512
    assert "at most 64 texts" in translate["text"]["description"]
    assert classify["top_k"]["maximum"] == 100
    too_wide = mixed_service.post(
        "/v1/models/dates-transformer/translate", json={"text": "1 mai 2000", "beam_size": 9}
    )
    assert too_wide.status_code == 422 and "beam_size" in too_wide.json()["error"]
