"""The optional bearer token: health stays open, everything else needs the token, over HTTP and
gRPC; the check itself is constant-time and names what is wrong."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from pydantic import SecretStr

from service.api import auth
from service.api.protos import attention_pb2 as apb
from service.api.protos import attention_pb2_grpc as apb_grpc
from service.api.protos import grpc_service_pb2 as pb
from service.api.protos import grpc_service_pb2_grpc as pb_grpc
from service.errors import Unauthorized
from tests.conftest import API_TOKEN, GUARDED_GRPC_CALLS, Service

TOKEN = API_TOKEN
BEARER = {"Authorization": f"Bearer {TOKEN}"}
GRPC_CALLS = GUARDED_GRPC_CALLS


def test_check_accepts_only_the_bearer_token() -> None:
    token = SecretStr(TOKEN)
    auth.check(None, None)  # no token configured: open
    auth.check(token, f"Bearer {TOKEN}")
    auth.check(token, f"bearer {TOKEN}")
    for bad, reason in [(None, "required"), ("", "required"), (f"Basic {TOKEN}", "not valid"),
                        ("Bearer wrong", "not valid"), (f"Bearer {TOKEN}x", "not valid")]:  # fmt: skip
        with pytest.raises(Unauthorized, match=reason):
            auth.check(token, bad)
    auth.check_metadata(token, [("x-other", "1"), ("authorization", f"Bearer {TOKEN}")])
    with pytest.raises(Unauthorized):
        auth.check_metadata(token, [("x-other", "1")])


@pytest.mark.slow
def test_http_needs_the_token_except_health(guarded: Service) -> None:
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
        assert requests.get(guarded.url + path, timeout=30).status_code == 200, path
    for method, path in [("GET", "/v1/models"), ("GET", "/openapi.json"), ("GET", "/v2/models/dates-bahdanau"),
                         ("POST", "/v1/models/dates-bahdanau/translate"), ("POST", "/v2/models/x/infer")]:  # fmt: skip
        answer = requests.request(method, guarded.url + path, json={"text": "3 juin 1980"}, timeout=30)
        assert answer.status_code == 401 and answer.headers["WWW-Authenticate"] == "Bearer", path
        assert answer.json()["error"].startswith("authorization:")
    wrong = requests.get(guarded.url + "/v1/models", headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401 and "not valid" in wrong.json()["error"]
    ok = requests.post(
        guarded.url + "/v1/models/dates-bahdanau/translate",
        json={"text": "3 juin 1980"},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=30,
    )
    assert ok.status_code == 200 and ok.json()["translations"][0]["text"] == "1980-06-03"
    assert TOKEN not in guarded.log.read_text()


@pytest.mark.slow
def test_grpc_needs_the_token_except_health(guarded: Service) -> None:
    channel = grpc.insecure_channel(guarded.grpc_target)
    v2, typed = pb_grpc.GRPCInferenceServiceStub(channel), apb_grpc.AttentionServiceStub(channel)
    assert v2.ServerLive(pb.ServerLiveRequest(), timeout=30).live
    assert v2.ServerReady(pb.ServerReadyRequest(), timeout=30).ready
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as refused:  # server reflection: with the token only
        list(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    request = apb.TranslateRequest(model="dates-bahdanau", texts=["3 juin 1980"])
    with pytest.raises(grpc.RpcError) as refused:
        typed.Translate(request, timeout=30)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as refused:
        v2.ServerMetadata(pb.ServerMetadataRequest(), timeout=30)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    metadata = [("authorization", f"Bearer {TOKEN}")]
    assert typed.Translate(request, metadata=metadata, timeout=30).translations[0].text == "1980-06-03"
    stream = v2.ModelStreamInfer(iter([pb.ModelInferRequest(model_name="dates-bahdanau")]), timeout=30)
    with pytest.raises(grpc.RpcError) as refused:
        list(stream)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.slow
def test_an_authenticated_clients_grpc_calls_are_bounded(guarded: Service) -> None:
    """The guarded service runs with ``ATTN_LIMITS__MAX_GRPC_CALLS=8``: eight KServe streams held
    open by a client with the token (each answered once, then idle) take every call; one call
    more is RESOURCE_EXHAUSTED at once while health probes and HTTP answer on; the streams
    closed, calls pass."""
    metadata = [("authorization", f"Bearer {TOKEN}")]
    channel = grpc.insecure_channel(guarded.grpc_target)
    v2 = pb_grpc.GRPCInferenceServiceStub(channel)
    request = pb.ModelInferRequest(model_name="dates-bahdanau", id="held")
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
        b"3 juin 1980"
    )
    ends = [threading.Event() for _ in range(GRPC_CALLS)]

    def held(end: threading.Event) -> Iterator[pb.ModelInferRequest]:
        yield request
        end.wait(60)

    streams = [v2.ModelStreamInfer(held(end), metadata=metadata, timeout=90) for end in ends]
    try:
        answers = [next(stream) for stream in streams]
        assert all(not a.error_message and a.infer_response.id == "held" for a in answers), answers
        with pytest.raises(grpc.RpcError) as refused:
            v2.ServerMetadata(pb.ServerMetadataRequest(), metadata=metadata, timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 8" in (refused.value.details() or "")
        # probes still answer: the open unary RPCs are not counted
        probe = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert probe.status == health_pb2.HealthCheckResponse.SERVING
        assert v2.ServerReady(pb.ServerReadyRequest(), timeout=30).ready
        assert requests.get(guarded.url + "/v1/models", headers=BEARER, timeout=30).status_code == 200
    finally:
        for end in ends:
            end.set()
    assert [list(stream) for stream in streams] == [[]] * GRPC_CALLS  # ended cleanly, nothing more
    assert v2.ServerMetadata(pb.ServerMetadataRequest(), metadata=metadata, timeout=30).name
    channel.close()
    counted = 0.0
    for _ in range(30):  # Ray's metrics agent takes them in within seconds
        text = requests.get(guarded.metrics_url, timeout=10).text
        found = re.search(r'^ray_attention_requests_total{[^}]*route="grpc_call"[^}]*} (\S+)$', text, re.M)
        counted = float(found.group(1)) if found else 0.0
        if counted:
            break
        time.sleep(1)
    assert counted == 1.0  # the call refused at the limit, in the request metrics
    # counted, not timed: refusals' times are the clients' (a 408 waits out the read timeout) and
    # put `_unknown` in the latency panels and the p99 alert
    assert not re.search(r'^ray_attention_request_duration_seconds_count{[^}]*model="_unknown"', text, re.M)
