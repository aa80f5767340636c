"""KServe v2 over HTTP and gRPC, proven with tritonclient (unchanged, in its own environment),
the typed attention.v1 gRPC service with our own stubs, and a client with no stubs at all
(server reflection)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from service.api.protos import attention_pb2 as apb
from service.api.protos import attention_pb2_grpc as apb_grpc
from tests.conftest import Service
from tests.service.test_app import canvas_png, reference

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[3]
TRITON_PYTHON = Path(os.environ.get("TRITON_CLIENT_PYTHON", ROOT / ".venv-triton" / "bin" / "python"))
TEXTS = ["5 mars 2024", "Tuesday, July 4, 1995", "31.12.1999"]
ISO = ["2024-03-05", "1995-07-04", "1999-12-31"]


@pytest.fixture(scope="module")
def probe(service: Service, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not TRITON_PYTHON.exists():
        pytest.skip(f"no tritonclient environment at {TRITON_PYTHON} (make test creates it)")
    image = tmp_path_factory.mktemp("probe") / "canvas.png"
    image.write_bytes(canvas_png(3)[0])
    http = service.url.removeprefix("http://")
    result = subprocess.run(
        [str(TRITON_PYTHON), str(ROOT / "tests" / "service" / "api" / "triton_probe.py"), http, service.grpc_target, str(image)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


def reference_decode(service: Service, name: str, beam: int) -> list[Any]:
    return reference(service, name).translate(TEXTS, beam_size=beam)


def test_http_health_and_metadata(probe: dict[str, Any]) -> None:
    h = probe["http"]
    assert h["live"] and h["ready"] and h["model_ready"] and h["model_ready_v1"]
    assert h["server"]["name"] == "attention-serve" and "binary_tensor_data" in h["server"]["extensions"]
    meta = h["metadata"]
    assert meta["versions"] == ["1"] and [i["name"] for i in meta["inputs"]] == ["IMAGE", "PIXELS"]
    assert {o["name"]: o["shape"] for o in meta["outputs"]}["ROLLOUT"] == [-1, 6, 6]


@pytest.mark.parametrize("binary", [False, True])
def test_http_translate_json_and_binary(probe: dict[str, Any], service: Service, binary: bool) -> None:
    r = probe["http"][f"translate_binary_{binary}"]
    expected = reference_decode(service, "dates-bahdanau", beam=2)
    assert r["id"] == "h1" and r["text"] == [e.text for e in expected] == ISO
    np.testing.assert_allclose(r["score"], [e.score for e in expected], atol=1e-4)
    assert r["attention_shape"][0] == 3 and r["attention_shape"][1] == 11  # 10 characters + </s>
    for sums, e in zip(r["attention_row_sums"], expected, strict=True):  # rows sum to 1, padding to 0
        np.testing.assert_allclose(sums[: len(e.target_tokens)], 1.0, atol=1e-4)


def test_http_defaults_and_classification(probe: dict[str, Any]) -> None:
    h = probe["http"]
    # no outputs named: every output but the attention map (the protocol's "all outputs")
    assert h["translate_defaults"] == {
        "outputs": ["TRANSLATION", "SCORE", "SOURCE_TOKENS", "TARGET_TOKENS"],
        "text": "1980-06-03",
    }
    assert h["translate_column"] == ["1980-06-03", "1976-07-04"]  # TEXT [2, 1], as its config has it
    beside = h["classify_classes_beside_labels"]
    assert len(beside["labels"]) == 5 and len(beside["classes"]) == 2
    assert [c.split(":")[2] for c in beside["classes"]] == beside["labels"][:2]
    c = h["classify_image"]
    assert len(c["labels"]) == 3 and c["probabilities"] == sorted(c["probabilities"], reverse=True)
    assert c["rollout_shape"] == [1, 6, 6] and c["rollout_max"] == pytest.approx(1.0)
    assert h["classify_pixels_attentions_shape"] == [2, 4, 4, 37, 37]
    # class_count=3 (Triton's classification extension): the same best 3 as "score:index:label"
    classes = [x.split(":") for x in h["classify_classes"]]
    assert [label for _, _, label in classes] == c["labels"] and all(i.isdigit() for _, i, _ in classes)
    np.testing.assert_allclose([float(p) for p, _, _ in classes], c["probabilities"], atol=1e-6)
    assert probe["grpc"]["classify_classes"] == h["classify_classes"]


def test_http_compressed_requests_and_answers(probe: dict[str, Any]) -> None:
    """tritonclient's request_/response_compression_algorithm (gzip, deflate, either alone), on
    both models at once from 8 connections: every answer equals the plain one."""
    seen = probe["http"]["compressed"]
    assert len(seen) == 10 and all(len(answers) == 3 for answers in seen.values())
    for model in ("dates-bahdanau", "fashion-vit"):
        [plain, *_] = seen[f"{model} None None"]
        assert plain.get("TRANSLATION", ISO) == ISO and len(plain) == (3 if model == "dates-bahdanau" else 2)
        for key, answers in seen.items():
            if key.startswith(model):
                for got in answers:
                    assert got.keys() == plain.keys(), key
                    for name, value in got.items():
                        if name == "TRANSLATION":
                            assert value == plain[name], key
                        else:
                            np.testing.assert_allclose(value, plain[name], atol=1e-6, err_msg=key)


def test_http_errors(probe: dict[str, Any]) -> None:
    e = probe["http"]["errors"]
    assert "nope" in e["unknown_model"]["message"] and e["unknown_model"]["status"] == "404"
    assert "version" in e["unknown_version"]["message"]
    assert "TEXT" in e["wrong_input"]["message"] and e["wrong_input"]["status"] == "422"
    assert "PIXELS" in e["wrong_dtype"]["message"]
    assert "nope" in e["metadata_unknown"]["message"]


def test_grpc_health_metadata_and_infer(probe: dict[str, Any], service: Service) -> None:
    g = probe["grpc"]
    assert g["live"] and g["ready"] and g["model_ready"] and g["model_ready_not_served"] == [False, False]
    assert g["server"]["name"] == "attention-serve"
    assert g["metadata"]["inputs"][0]["name"] == "TEXT"
    expected = reference_decode(service, "dates-transformer", beam=2)
    assert g["translate"]["id"] == "g1" and g["translate"]["text"] == [e.text for e in expected] == ISO
    assert g["translate"]["target_tokens"][0][:11] == [*"2024-03-05", "</s>"]
    assert g["translate"]["attention_shape"][:2] == [3, 11]
    assert g["classify"]["rollout_shape"] == [1, 6, 6] and len(g["classify"]["labels"]) == 5
    assert g["compressed"] == {"gzip": ISO, "deflate": ISO}  # compressed requests: gRPC's own


def test_grpc_decoupled_token_streams_with_tritonclient(probe: dict[str, Any]) -> None:
    """Two translations streamed on one ModelStreamInfer, interleaved: a response per token until
    the one flagged final, which carries the whole answer."""
    d0, d1 = probe["grpc"]["decoupled"]["d0"], probe["grpc"]["decoupled"]["d1"]
    assert d0["final"]["text"] == ["2024-03-05", "1980-06-03"] and d1["final"]["text"] == ["1999-12-31"]
    for got in (d0, d1):
        for i, text in enumerate(got["final"]["text"]):
            mine = [t for t in got["tokens"] if t["text_index"] == i]
            assert "".join(t["text"] for t in mine) == text
            assert len(mine) == len([x for x in got["final"]["target_tokens"][i] if x])  # EOS included
    assert all(t["attention_shape"][0] == 1 for t in d0["tokens"])
    assert all(t["attention_shape"] is None for t in d1["tokens"])


def test_grpc_streaming_answers_in_order_and_survives_errors(probe: dict[str, Any]) -> None:
    stream = probe["grpc"]["stream"]
    assert [s["text"] for s in stream] == ["2001-05-01", None, "2002-05-02"]
    assert [s["id"] for s in stream] == ["s0", None, "s2"]
    assert "nope" in stream[1]["error"]


def test_grpc_errors_use_status_codes(probe: dict[str, Any]) -> None:
    e = probe["grpc"]["errors"]
    assert e["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert (
        e["wrong_input"]["status"] == "StatusCode.INVALID_ARGUMENT" and "IMAGE" in e["wrong_input"]["message"]
    )
    assert e["unimplemented"]["status"] == "StatusCode.UNIMPLEMENTED"
    assert e["metadata_unknown"]["status"] == "StatusCode.NOT_FOUND"


def test_triton_statistics_configuration_and_index_through_tritonclient(probe: dict[str, Any]) -> None:
    """tritonclient's get_inference_statistics, get_model_config and get_model_repository_index,
    HTTP and gRPC: the probe's own traffic counted, both protocols saying the same."""
    x = probe["extensions"]
    http = {s["name"]: s for s in x["http_stats"]["model_stats"]}
    grpc_side = {s["name"]: s for s in x["grpc_stats"]["model_stats"]}
    served = ["dates-bahdanau", "dates-transformer", "fashion-vit", "fashion-vit-int8"]
    assert sorted(http) == sorted(grpc_side) == served
    for name in served[:3]:  # those the probe sent requests to
        stats = http[name]
        typed = grpc_side[name]  # protobuf's JSON: 64-bit numbers as strings, zeros left out
        assert stats["version"] == typed["version"] == "1"
        assert str(stats["inference_count"]) == typed["inference_count"]
        assert (
            str(stats["inference_stats"]["success"]["count"]) == typed["inference_stats"]["success"]["count"]
        )
        assert stats["inference_count"] >= stats["inference_stats"]["success"]["count"] >= 5
        assert 0 < stats["inference_stats"]["compute_infer"]["ns"] < stats["inference_stats"]["success"]["ns"]
        assert stats["execution_count"] == sum(b["compute_infer"]["count"] for b in stats["batch_stats"])
    # a translation request counts its texts (the probe sends three at a time); an image request
    # of N images reaches the model as N requests of one image
    bahdanau = http["dates-bahdanau"]
    assert bahdanau["inference_count"] - bahdanau["inference_stats"]["success"]["count"] >= 2
    [one] = x["http_stats_one"]["model_stats"]
    assert (
        one["name"] == "dates-bahdanau"
        and one["inference_count"] == http["dates-bahdanau"]["inference_count"]
    )
    assert x["grpc_stats_one"]["model_stats"][0]["name"] == "dates-bahdanau"

    image, text = x["http_config"]["fashion-vit"], x["http_config"]["dates-transformer"]
    assert image["max_batch_size"] == 64 and image["platform"] == "onnxruntime_onnx"
    assert [(i["name"], i["data_type"], i["dims"]) for i in image["input"]] == [
        ("IMAGE", "TYPE_STRING", [1]), ("PIXELS", "TYPE_UINT8", [48, 48])
    ]  # fmt: skip
    assert image["input"][0]["reshape"] == {"shape": []} and all(i["optional"] for i in image["input"])
    assert {o["name"]: o["dims"] for o in image["output"]}["ROLLOUT"] == [6, 6]
    assert [o["name"] for o in text["output"]][:2] == ["TRANSLATION", "SCORE"]
    assert text["instance_group"][0]["kind"] == "KIND_CPU"
    typed_config = x["grpc_config"]["dates-transformer"]["config"]
    assert typed_config["name"] == "dates-transformer" and typed_config["max_batch_size"] == 64
    assert [i["name"] for i in typed_config["input"]] == ["TEXT"] and typed_config["input"][0][
        "data_type"
    ] == "TYPE_STRING"

    assert [(m["name"], m["version"], m["state"]) for m in x["http_index"]] == [
        (m, "1", "READY") for m in served
    ]
    assert [m["name"] for m in x["grpc_index"]["models"]] == [m["name"] for m in x["http_index"]]
    e = x["errors"]
    assert e["http_stats_unknown"]["status"] == "404" and "nope" in e["http_stats_unknown"]["message"]
    assert e["grpc_config_unknown"]["status"] == "StatusCode.NOT_FOUND"
    assert e["http_config_version"]["status"] == "404" and "version" in e["http_config_version"]["message"]


# -- attention.v1, with our own stubs ------------------------------------------------------------


@pytest.fixture(scope="module")
def attention_stub(service: Service) -> apb_grpc.AttentionServiceStub:
    return apb_grpc.AttentionServiceStub(grpc.insecure_channel(service.grpc_target))


def test_typed_translate_with_attention(
    attention_stub: apb_grpc.AttentionServiceStub, service: Service
) -> None:
    r = attention_stub.Translate(
        apb.TranslateRequest(model="dates-bahdanau", texts=TEXTS[:2], return_attention=True)
    )
    assert [t.text for t in r.translations] == ISO[:2] and r.version == 1
    t = r.translations[0]
    grid = np.array(t.attention.values).reshape(list(t.attention.shape))
    assert grid.shape == (len(t.target_tokens), len(t.source_tokens))
    np.testing.assert_allclose(grid.sum(1), 1.0, atol=1e-4)
    assert r.metrics.batch_size >= 2 and r.metrics.tokens_generated == 22
    # which replica and node answered, as REST's metrics say (one replica here: the same one)
    rest = service.post("/v1/models/dates-bahdanau/translate", json={"text": TEXTS[0]}).json()["metrics"]
    assert r.metrics.replica and (r.metrics.replica, r.metrics.node) == (rest["replica"], rest["node"])


def test_typed_classify_with_rollout(attention_stub: apb_grpc.AttentionServiceStub) -> None:
    r = attention_stub.Classify(apb.ClassifyRequest(model="fashion-vit", image=canvas_png(4)[0], top_k=2,
                                                    return_attention=True))  # fmt: skip
    assert len(r.predictions) == 2 and list(r.rollout.shape) == [6, 6]


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (lambda s: s.Translate(apb.TranslateRequest(model="nope", texts=["x"])), grpc.StatusCode.NOT_FOUND),
        (
            lambda s: s.Translate(apb.TranslateRequest(model="dates-bahdanau", texts=[""])),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            lambda s: s.Translate(apb.TranslateRequest(model="fashion-vit", texts=["x"])),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            lambda s: s.Classify(apb.ClassifyRequest(model="fashion-vit", image=b"junk")),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ],
)
def test_typed_errors_map_to_codes(
    attention_stub: apb_grpc.AttentionServiceStub, call: Any, code: grpc.StatusCode
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call(attention_stub)
    assert info.value.code() == code and info.value.details()


def test_a_client_without_the_protos_calls_through_reflection(service: Service) -> None:
    """What grpcurl does: the services and their messages from server reflection alone (a pool of
    its own, none of our stubs), then a call built from those descriptors."""
    channel = grpc.insecure_channel(service.grpc_target)
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    v2 = pool.FindServiceByName("inference.GRPCInferenceService")
    assert {"ModelInfer", "ModelStreamInfer", "ModelMetadata"} <= {m.name for m in v2.methods}
    method = v2.FindMethodByName("ModelMetadata")
    ask, answer = (message_factory.GetMessageClass(t) for t in (method.input_type, method.output_type))
    call = channel.unary_unary(
        f"/{v2.full_name}/{method.name}",
        request_serializer=ask.SerializeToString,
        response_deserializer=answer.FromString,
    )
    metadata = call(ask(name="fashion-vit"), timeout=30)
    assert metadata.name == "fashion-vit" and [i.name for i in metadata.inputs] == ["IMAGE", "PIXELS"]
    assert pool.FindServiceByName("attention.v1.AttentionService").FindMethodByName("Translate")
    assert pool.FindServiceByName("grpc.health.v1.Health").FindMethodByName("Watch")
