"""The gRPC health service (grpc.health.v1) of the default in-replica frontend: SERVING while the
replica serves, NOT_SERVING told to a watcher when the service stops."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import running_service

pytestmark = pytest.mark.slow


def test_grpc_health_serves_while_the_replica_does_and_tells_watchers_it_stops(
    tiny_repository: Path, tmp_path: Path
) -> None:
    """grpc.health.v1 on the service's gRPC port: SERVING for the server and both services while
    it serves; a Watch open across connection ages (1 s) hears NOT_SERVING when the service is
    stopped (SIGINT), before the drain ends its stream."""
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    heard: list[Any] = []
    with running_service(tiny_repository, tmp_path, ATTN_CONNECTION_MAX_AGE_S="1") as svc:
        stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(svc.grpc_target))
        for name in ("", "inference.GRPCInferenceService", "attention.v1.AttentionService"):
            assert stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=30).status == serving
        with pytest.raises(grpc.RpcError) as unknown:
            stub.Check(
                health_pb2.HealthCheckRequest(service="grpc.reflection.v1.ServerReflection"), timeout=30
            )
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        watch = stub.Watch(health_pb2.HealthCheckRequest())

        def follow() -> None:
            try:
                heard.extend(reply.status for reply in watch)
            except grpc.RpcError as exc:  # the drain ends the stream
                heard.append(exc.code())

        follower = threading.Thread(target=follow)
        follower.start()
        time.sleep(3)  # a few connection ages: the stream stays
        assert heard == [serving]
    follower.join(30)
    assert heard[:2] == [serving, not_serving], heard


def test_a_stopping_replica_says_it_is_not_ready_while_it_serves_on_for_unready_s(
    tiny_repository: Path, tmp_path: Path
) -> None:
    """``ATTN_UNREADY_S``: a replica asked to stop first answers /readyz 503 (gRPC health
    NOT_SERVING) while it still answers predictions, so a balancer probing readiness (a
    Kubernetes Service) takes it out before its port closes; then it drains and closes."""
    seen: list[tuple[float, int, int | str]] = []  # (when, /readyz, a prediction's status or error)
    with running_service(tiny_repository, tmp_path, ATTN_UNREADY_S="3") as svc:
        url = f"{svc.url}/v1/models/dates-bahdanau/translate"
        assert svc.get("/readyz").status_code == 200
        stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(svc.grpc_target))
        svc.process.send_signal(signal.SIGINT)
        begun, health = time.monotonic(), []
        while time.monotonic() - begun < 15:
            try:
                ready = requests.get(f"{svc.url}/readyz", timeout=5).status_code
                answer: int | str = requests.post(url, json={"text": "3 juin 1980"}, timeout=5).status_code
                health.append(stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status)
            except (requests.ConnectionError, grpc.RpcError) as exc:
                seen.append((time.monotonic() - begun, -1, type(exc).__name__))
                break
            seen.append((time.monotonic() - begun, ready, answer))
            time.sleep(0.1)
    leaving = [(t, answer) for t, ready, answer in seen if ready == 503]
    assert leaving and all(answer == 200 for _, answer in leaving), seen
    assert leaving[-1][0] - leaving[0][0] >= 2, seen  # ~3 s of it
    assert seen[-1][1] == -1, seen  # then the port closed
    assert health_pb2.HealthCheckResponse.NOT_SERVING in health
