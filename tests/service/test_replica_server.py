"""The default in-replica frontend under pressure: two replicas behind one port, overload shed
with 503 + Retry-After (HTTP) and RESOURCE_EXHAUSTED (gRPC) and counted in the metrics, the
serving ports bound to the configured host only."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
import pytest
import requests

from service.protos import attention_pb2 as apb
from service.protos import attention_pb2_grpc as apb_grpc
from tests.conftest import Service, running_service

pytestmark = pytest.mark.slow
SLOW = {"text": "Samstag, 15. Mai 1976 " * 8, "beam_size": 8}  # a few ms of beam search each


@pytest.fixture(scope="module")
def crowded(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """Two replicas; the Transformer batches one request at a time and queues one beyond the 16
    it works on, so each replica holds at most 17 of its requests."""
    with running_service(
        tiny_repository,
        tmp_path_factory.mktemp("crowded"),
        ATTN_NUM_REPLICAS="2",
        ATTN_LIMITS__MAX_QUEUED_REQUESTS="1",
        ATTN_MODEL_OVERRIDES='{"dates-transformer": {"max_batch_size": 1, "batch_wait_timeout_s": 0}}',
    ) as svc:
        yield svc


def test_two_replicas_answer_on_one_port(crowded: Service) -> None:
    replicas = set()
    for _ in range(40):  # a new connection each time: the kernel spreads them over the replicas
        answer = requests.post(
            f"{crowded.url}/v1/models/dates-bahdanau/translate", json={"text": "3 juin 1980"}
        )
        assert answer.status_code == 200, answer.text
        replicas.add(answer.json()["metrics"]["replica"])
    assert len(replicas) == 2


def test_overload_is_shed_fast_and_counted(crowded: Service) -> None:
    url = f"{crowded.url}/v1/models/dates-transformer/translate"
    with ThreadPoolExecutor(160) as pool:
        answers = list(pool.map(lambda _: requests.post(url, json=SLOW, timeout=60), range(320)))
    statuses = Counter(a.status_code for a in answers)
    assert set(statuses) == {200, 503} and statuses[503] > 0 and statuses[200] > 0, statuses
    shed = [a for a in answers if a.status_code == 503]
    assert all(a.headers["Retry-After"] == "1" and "overloaded" in a.json()["error"] for a in shed)
    assert max(a.elapsed.total_seconds() for a in shed) < 5  # refused at once, not after a queue
    # every refusal is in the metrics (Ray exports them every few seconds)
    deadline = time.monotonic() + 60
    while (counted := _counted(crowded, "dates-transformer", "503")) < statuses[503]:
        assert time.monotonic() < deadline, f"{counted} of {statuses[503]} refusals counted"
        time.sleep(2)
    assert counted == statuses[503]
    assert requests.get(f"{crowded.url}/readyz", timeout=30).status_code == 200


def test_grpc_overload_is_resource_exhausted(crowded: Service) -> None:
    stub = apb_grpc.AttentionServiceStub(grpc.insecure_channel(crowded.grpc_target))
    request = apb.TranslateRequest(model="dates-transformer", texts=[SLOW["text"]], beam_size=8)
    calls = [stub.Translate.future(request, timeout=60) for _ in range(200)]
    codes = Counter(c.code() for c in calls)
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert codes[grpc.StatusCode.RESOURCE_EXHAUSTED] > 0 and codes[grpc.StatusCode.OK] > 0


def test_serving_ports_bind_only_the_configured_host(crowded: Service) -> None:
    ports = {int(crowded.url.rsplit(":", 1)[1]), int(crowded.grpc_target.rsplit(":", 1)[1])}
    root = psutil.Process(crowded.pid)
    listening = [
        c.laddr
        for p in [root, *root.children(recursive=True)]
        for c in p.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port in ports
    ]
    assert {a.port for a in listening} == ports and len(listening) == 4  # 2 replicas × 2 protocols
    assert {a.ip for a in listening} <= {"127.0.0.1", "::ffff:127.0.0.1"}


def _counted(service: Service, model: str, status: str) -> float:
    text = requests.get(service.metrics_url, timeout=10).text
    pattern = rf'^ray_attention_requests_total{{[^}}]*model="{model}"[^}}]*status="{status}"[^}}]*}} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, text, flags=re.M))
