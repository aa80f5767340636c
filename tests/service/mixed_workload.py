"""The mixed-traffic workload (``test_mixed_traffic``): its
models — two RNN translators of one family sharing a tokenizer, a Transformer, a ViT and its int8
variant — the service's limits it is run under, its texts and images, and one client per
protocol (REST, KServe v2 HTTP, KServe v2 gRPC, attention.v1 gRPC), each giving an ``Answer``
that can be compared with what the model answers alone. The service itself is the
``mixed_service`` fixture of ``test_mixed_traffic``."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from service.api import kserve_tensors
from service.api.protos import attention_pb2 as apb
from service.api.protos import attention_pb2_grpc as apb_grpc
from service.api.protos import grpc_service_pb2 as pb
from service.api.protos import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import Service
from tests.service.test_app import canvas_png

MAX_BATCH = 4  # small, so that batches fill across clients and larger requests are split
MAX_TEXTS = 64  # limits.max_texts (the default)
MAX_RESPONSE = 256 * 1024  # limits.max_response_bytes, small enough to reach with the tiny models
TWINS = ("dates-bahdanau", "dates-bahdanau-b")  # family rnn-additive, one tokenizer
TRANSLATORS = (*TWINS, "dates-transformer")
IMAGES = ("fashion-vit", "fashion-vit-int8")
DATES = ["5 mars 2024", "Tuesday, July 4, 1995", "31.12.1999", "3 juin 1980", "Samstag, 15. Mai 1976",
         "1 janvier 2000", "martes, 9 de abril de 2019", "Dec 24, 1850", "7/8/2011"]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Answer:
    model: str
    texts: tuple[str, ...] = ()
    values: tuple[float, ...] = ()  # translation scores, or probabilities by class index

    def matches(self, other: Answer) -> bool:
        return (
            self.model == other.model
            and self.texts == other.texts
            and len(self.values) == len(other.values)
            and np.allclose(self.values, other.values, atol=1e-4)
        )


# -- one client per protocol, each giving an Answer ---------------------------------------------


def rest(svc: Service, model: str, payload: Any) -> Answer:
    if model in IMAGES:
        body = {"image": __import__("base64").b64encode(payload).decode(), "top_k": 10}
        got = svc.post(f"/v1/models/{model}/classify", json=body)
        assert got.status_code == 200, got.text
        return image_answer(
            got.json()["model"], [(p["index"], p["probability"]) for p in got.json()["predictions"]]
        )
    texts, beam = payload
    got = svc.post(f"/v1/models/{model}/translate", json={"text": texts, "beam_size": beam})
    assert got.status_code == 200, got.text
    items = got.json()["translations"]
    return Answer(got.json()["model"], tuple(t["text"] for t in items), tuple(t["score"] for t in items))


def kserve_http(svc: Service, model: str, payload: Any) -> Answer:
    if model in IMAGES:
        pixels = canvas_pixels(payload)
        body = {
            "inputs": [
                {
                    "name": "PIXELS",
                    "datatype": "UINT8",
                    "shape": [1, *pixels.shape],
                    "data": pixels.ravel().tolist(),
                }
            ],
            "outputs": [{"name": "PROBABILITIES"}, {"name": "INDICES"}],
            "parameters": {"top_k": 10},
        }
    else:
        texts, beam = payload
        body = {
            "inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [len(texts)], "data": texts}],
            "outputs": [{"name": "TRANSLATION"}, {"name": "SCORE"}],
            "parameters": {"beam_size": beam},
        }
    got = svc.post(f"/v2/models/{model}/infer", json=body)
    assert got.status_code == 200, got.text
    outputs = {o["name"]: o["data"] for o in got.json()["outputs"]}
    if model in IMAGES:
        return image_answer(
            got.json()["model_name"], list(zip(outputs["INDICES"], outputs["PROBABILITIES"], strict=True))
        )
    return Answer(got.json()["model_name"], tuple(outputs["TRANSLATION"]), tuple(outputs["SCORE"]))


def kserve_grpc(svc: Service, model: str, payload: Any) -> Answer:
    stub = pb_grpc.GRPCInferenceServiceStub(channel(svc))
    request = pb.ModelInferRequest(model_name=model, id="mixed")
    if model in IMAGES:
        pixels = canvas_pixels(payload)
        request.inputs.add(name="PIXELS", datatype="UINT8", shape=[1, *pixels.shape])
        request.raw_input_contents.append(pixels.tobytes())
        request.parameters["top_k"].int64_param = 10
        names = ["PROBABILITIES", "INDICES"]
    else:
        texts, beam = payload
        request.inputs.add(name="TEXT", datatype="BYTES", shape=[len(texts)])
        request.raw_input_contents.append(
            kserve_tensors.serialize_bytes(np.array([t.encode() for t in texts], dtype=object))
        )
        request.parameters["beam_size"].int64_param = beam
        names = ["TRANSLATION", "SCORE"]
    for name in names:
        request.outputs.add(name=name)
    reply = stub.ModelInfer(request, timeout=60)
    raw = dict(zip([o.name for o in reply.outputs], reply.raw_output_contents, strict=True))
    if model in IMAGES:
        indices = np.frombuffer(raw["INDICES"], dtype=np.int64)
        probs = np.frombuffer(raw["PROBABILITIES"], dtype=np.float32)
        return image_answer(reply.model_name, list(zip(indices.tolist(), probs.tolist(), strict=True)))
    texts = kserve_tensors.deserialize_bytes(raw["TRANSLATION"], len(payload[0]), "TRANSLATION")
    scores = np.frombuffer(raw["SCORE"], dtype=np.float32)
    return Answer(reply.model_name, tuple(bytes(t).decode() for t in texts), tuple(scores.tolist()))


def attention_grpc(svc: Service, model: str, payload: Any) -> Answer:
    stub = apb_grpc.AttentionServiceStub(channel(svc))
    if model in IMAGES:
        reply = stub.Classify(apb.ClassifyRequest(model=model, image=payload, top_k=10), timeout=60)
        return image_answer(reply.model, [(p.index, p.probability) for p in reply.predictions])
    texts, beam = payload
    reply = stub.Translate(apb.TranslateRequest(model=model, texts=texts, beam_size=beam), timeout=60)
    return Answer(
        reply.model, tuple(t.text for t in reply.translations), tuple(t.score for t in reply.translations)
    )


PROTOCOLS: dict[str, Callable[[Service, str, Any], Answer]] = {
    "rest": rest, "kserve-http": kserve_http, "kserve-grpc": kserve_grpc, "attention-grpc": attention_grpc,
}  # fmt: skip
_channels: dict[str, grpc.Channel] = {}


def channel(svc: Service) -> grpc.Channel:
    if svc.grpc_target not in _channels:
        _channels[svc.grpc_target] = grpc.insecure_channel(svc.grpc_target)
    return _channels[svc.grpc_target]


def canvas_pixels(png: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.uint8)


def image_answer(model: str, pairs: list[tuple[int, float]]) -> Answer:
    return Answer(model, (), tuple(p for _, p in sorted(pairs)))


def workload() -> list[tuple[str, Any]]:
    """(model, payload) pairs: translations of 1 to 9 texts (beyond the batch of 4), greedy and
    beam, and images."""
    rng = random.Random(7)
    calls: list[tuple[str, Any]] = []
    for model in TRANSLATORS:
        for n in (1, 3, MAX_BATCH + 1, 9):
            for beam in (1, 3):
                calls.append((model, (rng.sample(DATES, k=n), beam)))
    for model in IMAGES:
        for seed in range(4):
            calls.append((model, canvas_png(seed)[0]))
    return calls
