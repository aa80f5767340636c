"""Bad settings fail at start with a message naming the setting."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_defaults_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTN_REPOSITORY", str(tmp_path))
    monkeypatch.setenv("ATTN_BATCHING__MAX_BATCH_SIZE", "64")
    monkeypatch.setenv("ATTN_MODEL_OVERRIDES", '{"m": {"max_batch_size": 8, "num_replicas": 2}}')
    s = Settings()
    assert s.host == "127.0.0.1" and s.http_port == 8000
    assert s.batching_for("other").max_batch_size == 64
    assert s.batching_for("m").max_batch_size == 8 and s.replicas_for("m") == 2
    assert not s.use_gpu


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ATTN_HTTP_PORT": "0"}, "http_port"),
        ({"ATTN_BATCHING__MAX_BATCH_SIZE": "0"}, "max_batch_size"),
        ({"ATTN_PROVIDERS": '["TPUExecutionProvider"]'}, "providers"),
        ({"ATTN_METRICS_PORT": "8000"}, "must differ"),
        ({"ATTN_REPOSITORY": "/no/such/dir"}, "repository"),
        ({"ATTN_LATENCY_BUCKETS_S": "[1, 0.5]"}, "ascending"),
        ({"ATTN_NO_SUCH_SETTING": "1"}, "no_such_setting"),
        ({"ATTN_FRONTEND": "haproxy"}, "frontend"),
        ({"ATTN_AUTOSCALING": '{"min_replicas": 5, "max_replicas": 4}'}, "min_replicas must not exceed"),
    ],
)
def test_bad_settings_name_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict, message: str
) -> None:
    monkeypatch.setenv("ATTN_REPOSITORY", str(tmp_path))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_frontends_set_rays_switches_before_ray_starts(tmp_path: Path) -> None:
    assert Settings(repository=tmp_path).ray_environment() == {}  # in-replica: no Ray proxy at all
    direct = Settings(repository=tmp_path, frontend="ray-direct", http_port=8000, grpc_port=9000)
    env = direct.ray_environment()
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1" and env["RAY_SERVE_PORT_QUARANTINE_S"] == "0"
    # the ingress replicas listen just above Ray's proxy, which keeps http_port / grpc_port
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == "8001"
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"] == "9001"
    scaled = Settings(repository=tmp_path, frontend="ray-proxy", autoscaling={"max_replicas": 3})
    assert scaled.scaling_for("m") == {"autoscaling_config": scaled.autoscaling.model_dump()}


def test_in_replica_autoscaling_scales_on_what_replicas_hold(tmp_path: Path) -> None:
    scaled = Settings(repository=tmp_path, autoscaling={"max_replicas": 3})
    config = scaled.scaling_for(None)["autoscaling_config"]
    assert config["policy"] == {"policy_function": "service.hosting.autoscaling:held_requests_policy"}  # type: ignore[index]
    assert scaled.ray_environment()["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] == "1"
