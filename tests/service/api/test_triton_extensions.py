"""Triton's model-configuration, statistics and repository-index extensions
(``service/api/triton_extensions.py``) over fake models: the dicts, that gRPC's messages take them
field for field, and the HTTP routes with their refusals. Live, through tritonclient:
``test_kserve_clients.py``; counted under mixed traffic: ``tests/service/test_mixed_traffic.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import json_format

from service.api import triton_extensions
from service.api.http import create_app
from service.api.protos import grpc_service_pb2 as pb
from service.inference.statistics import Statistics
from service.settings import Settings
from tests.service.api.test_rest import call
from tests.service.fakes import entry, fake_server


def test_the_configuration_describes_the_served_tensors_without_the_batch_axis(tmp_path: Path) -> None:
    settings = Settings(repository=tmp_path, batching={"max_batch_size": 8, "batch_wait_timeout_s": 0.002})
    image_entry = entry("img", "image-classification", tmp_path)
    image = triton_extensions.model_config(
        image_entry.manifest, settings, ["CUDAExecutionProvider"], triton_extensions.scheduling(image_entry)
    )
    assert image["parameters"]["scheduling"]["string_value"].startswith("dynamic")
    assert image["max_batch_size"] == settings.limits.max_images
    assert image["input"] == [
        {
            "name": "IMAGE",
            "data_type": "TYPE_STRING",
            "dims": [1],
            "reshape": {"shape": []},
            "optional": True,
        },
        {"name": "PIXELS", "data_type": "TYPE_UINT8", "dims": [4, 4], "optional": True},
    ]
    assert {o["name"]: o["dims"] for o in image["output"]} == {
        "LABELS": [-1], "PROBABILITIES": [-1], "INDICES": [-1], "ROLLOUT": [2, 2], "ATTENTIONS": [1, 1, 5, 5],
    }  # fmt: skip
    assert image["dynamic_batching"] == {"preferred_batch_size": [8], "max_queue_delay_microseconds": 2000}
    assert image["instance_group"][0]["kind"] == "KIND_GPU"
    text_entry = entry("mt", "translation", tmp_path)
    text = triton_extensions.model_config(
        text_entry.manifest, settings, None, triton_extensions.scheduling(text_entry)
    )
    assert text["parameters"]["scheduling"]["string_value"].startswith("iteration-level")
    assert (
        text["max_batch_size"] == settings.limits.max_texts
        and text["instance_group"][0]["kind"] == "KIND_CPU"
    )
    assert [i["name"] for i in text["input"]] == ["TEXT"] and "optional" not in text["input"][0]
    assert text["parameters"]["max_beam_size"] == {"string_value": str(settings.limits.max_beam_size)}
    for config in (image, text):  # gRPC's message takes every field (ParseDict refuses unknown ones)
        typed = json_format.ParseDict(config, pb.ModelConfig())
        back = json_format.MessageToDict(typed, preserving_proto_field_name=True)
        assert [i["name"] for i in back["input"]] == [i["name"] for i in config["input"]]


def test_statistics_and_the_index_fit_grpc_s_messages() -> None:
    s = Statistics()
    s.answered(2, 0.004, 0.001, 0.001, 0.001)
    s.executed(2, 0.001)
    stats = triton_extensions.statistics([s.snapshot("m", 3)])
    [m] = stats["model_stats"]
    assert (m["version"], m["inference_count"], m["execution_count"]) == ("3", 2, 1)
    assert m["batch_stats"] == [{"batch_size": 2, "compute_input": {"count": 1, "ns": 0},
                                 "compute_infer": {"count": 1, "ns": 1_000_000},
                                 "compute_output": {"count": 1, "ns": 0}}]  # fmt: skip
    typed = json_format.ParseDict(stats, pb.ModelStatisticsResponse())
    assert typed.model_stats[0].inference_stats.success.ns == 4_000_000


def test_the_index_lists_served_and_refused_versions(tmp_path: Path) -> None:
    served = {"a": entry("a", "translation", tmp_path), "b": entry("b", "translation", tmp_path)}
    refused = {"a/10": "manifest: bad", "a/2": "graph missing", "Bad": "not a model name"}
    index = triton_extensions.repository_index(served, refused, ready=True)
    assert [(m["name"], m["version"], m["state"]) for m in index] == [
        ("Bad", "", "UNAVAILABLE"), ("a", "1", "READY"), ("a", "2", "UNAVAILABLE"), ("a", "10", "UNAVAILABLE"),
        ("b", "1", "READY"),
    ]  # fmt: skip
    assert index[3]["reason"] == "manifest: bad"
    assert {m["state"] for m in triton_extensions.repository_index(served, {}, ready=False)} == {"LOADING"}


def test_the_http_routes(tmp_path: Path) -> None:
    app = create_app(fake_server(tmp_path)[0])
    body = json.dumps({"text": ["ab", "cde"]}).encode()
    assert call(app, "POST", "/v1/models/fake-translator/translate", body)[0] == 200

    status, _, content = call(app, "GET", "/v2/models/stats")
    assert status == 200
    counts = {m["name"]: m["inference_count"] for m in json.loads(content)["model_stats"]}
    assert counts == {"fake-classifier": 0, "fake-translator": 2}
    for path in ("/v2/models/fake-translator/stats", "/v2/models/fake-translator/versions/1/stats"):
        [one] = json.loads(call(app, "GET", path)[2])["model_stats"]
        assert one["name"] == "fake-translator" and one["inference_stats"]["success"]["count"] == 1
    status, _, content = call(app, "GET", "/v2/models/fake-translator/config")
    assert status == 200 and json.loads(content)["input"][0]["name"] == "TEXT"

    status, _, content = call(app, "POST", "/v2/repository/index")
    assert status == 200
    assert [(m["name"], m["state"]) for m in json.loads(content)] == [
        ("broken", "UNAVAILABLE"), ("fake-classifier", "READY"), ("fake-translator", "READY")
    ]  # fmt: skip
    ready_only = json.loads(call(app, "POST", "/v2/repository/index", b'{"ready": true}')[2])
    assert [m["name"] for m in ready_only] == ["fake-classifier", "fake-translator"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "named"),
    [
        ("GET", "/v2/models/nope/stats", b"", 404, "nope"),
        ("GET", "/v2/models/fake-translator/versions/7/stats", b"", 404, "version"),
        ("GET", "/v2/models/nope/config", b"", 404, "nope"),
        ("GET", "/v2/models/fake-classifier/versions/x/config", b"", 404, "version"),
        ("POST", "/v2/repository/index", b'{"ready": "yes"}', 422, "ready"),
        ("POST", "/v2/repository/index", b"[1", 422, "body"),
        ("POST", "/v2/repository/index", b"[]", 422, "body"),
    ],
)
def test_refusals_say_what_is_wrong_in_v2_s_error_form(
    tmp_path: Path, method: str, path: str, body: bytes, status: int, named: str
) -> None:
    got, _, content = call(create_app(fake_server(tmp_path)[0]), method, path, body)
    assert got == status and named in json.loads(content)["error"]
