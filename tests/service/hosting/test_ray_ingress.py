"""The Ray-ingress frontends stay selectable: ray-proxy (Ray Serve's HTTP/gRPC proxy) and
ray-direct (the ingress replica listens itself, one port above the proxy's) serve REST and gRPC
from the same app, and shed overload through Ray's own queue limit with the same 503."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import requests

from benchmarks.run import free_port_block
from service.api.protos import attention_pb2 as apb
from service.api.protos import attention_pb2_grpc as apb_grpc
from tests.conftest import running_service

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("frontend", ["ray-proxy", "ray-direct"])
def test_ray_ingress_frontends_serve_rest_and_grpc(
    frontend: str, tiny_repository: Path, tmp_path: Path
) -> None:
    offset = 1 if frontend == "ray-direct" else 0
    with running_service(
        tiny_repository,
        tmp_path,
        port_offset=offset,
        ATTN_FRONTEND=frontend,
        ATTN_HTTP_PORT=str(free_port_block(2)),
        ATTN_GRPC_PORT=str(free_port_block(2)),
        ATTN_LIMITS__MAX_QUEUED_REQUESTS="1",
        ATTN_MODEL_OVERRIDES='{"dates-transformer": {"max_batch_size": 1, "batch_wait_timeout_s": 0}}',
    ) as svc:
        url = svc.url
        answer = requests.post(f"{url}/v1/models/dates-bahdanau/translate", json={"text": "3 juin 1980"})
        assert answer.status_code == 200 and answer.json()["translations"][0]["text"] == "1980-06-03"
        stub = apb_grpc.AttentionServiceStub(grpc.insecure_channel(svc.grpc_target))
        reply = stub.Translate(
            apb.TranslateRequest(model="dates-bahdanau", texts=["3 juin 1980"]), timeout=30
        )
        assert reply.translations[0].text == "1980-06-03"
        slow = {"text": "Samstag, 15. Mai 1976 " * 8, "beam_size": 8, "truncate": True}
        target = f"{url}/v1/models/dates-transformer/translate"
        with ThreadPoolExecutor(64) as pool:
            statuses = Counter(
                pool.map(lambda _: requests.post(target, json=slow, timeout=60).status_code, range(128))
            )
        assert set(statuses) == {200, 503} and statuses[503] > 0, statuses
