"""The Ray-ingress frontends stay selectable: ray-proxy (Ray Serve's HTTP/gRPC proxy) and
ray-direct (the ingress replica listens itself, one port above the proxy's) serve REST and gRPC
from the same app, and shed overload through Ray's own queue limit with the same 503; the
ingress's version follower stays quiet when a stop takes the model deployments away."""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
import requests
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from service.api.protos import attention_pb2 as apb
from service.api.protos import attention_pb2_grpc as apb_grpc
from service.api.protos import grpc_service_pb2 as pb
from service.api.protos import grpc_service_pb2_grpc as pb_grpc
from service.errors import Overloaded
from service.hosting.ray_ingress import IngressReplica, RemoteModel
from service.inference.repository import load_entry
from service.settings import Settings
from tests.conftest import STOP_WITHIN_S, logged_since, running_service
from tests.service.fakes import fake_server
from tests.service.hosting.test_in_replica import with_a_broken_model
from tests.service.inference.test_model_set import version_of

pytestmark = pytest.mark.slow


def frontend_service(frontend: str, repository: Path, directory: Path, **settings: str) -> Any:
    """``running_service`` with ``frontend``, on port pairs (ray-direct's clients go to the
    ingress replica's own port, one above the proxy's)."""
    return running_service(
        repository,
        directory,
        port_offset=1 if frontend == "ray-direct" else 0,
        ATTN_FRONTEND=frontend,
        **settings,
    )


@pytest.mark.parametrize("frontend", ["ray-proxy", "ray-direct"])
def test_ray_ingress_frontends_serve_rest_and_grpc(
    frontend: str, tiny_repository: Path, tmp_path: Path
) -> None:
    """Also: a model that ONNX Runtime cannot load is left out and the others serve, as
    in-replica does (its deployment's failure failed the whole start)."""
    with frontend_service(
        frontend,
        with_a_broken_model(tiny_repository, tmp_path),
        tmp_path,
        ATTN_LIMITS__MAX_QUEUED_REQUESTS="1",
        ATTN_LIMITS__MAX_GRPC_VALUE_BYTES="65536",
        ATTN_MODEL_OVERRIDES=json.dumps(
            {
                m: {"max_batch_size": 1, "batch_wait_timeout_s": 0}
                for m in ("dates-transformer", "fashion-vit")
            }
        ),
    ) as svc:
        url = svc.url
        listing = requests.get(f"{url}/v1/models", timeout=30).json()
        assert "failed to load" in listing["rejected"]["broken-vit/1"], listing["rejected"]
        assert "broken-vit" not in [m["name"] for m in listing["models"]]
        left_out = requests.post(f"{url}/v1/models/broken-vit/classify", json={"pixels": [[0]]}, timeout=30)
        assert left_out.status_code == 404 and "not found" in left_out.json()["error"]
        assert requests.get(f"{url}/v2/health/ready", timeout=30).status_code == 200
        answer = requests.post(f"{url}/v1/models/dates-bahdanau/translate", json={"text": "3 juin 1980"})
        assert answer.status_code == 200 and answer.json()["translations"][0]["text"] == "1980-06-03"
        # 64 images, one handle call each, fit the ViT deployment's queue (16 at once, limit 1)
        images = {
            "inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": [64, 28, 28], "data": [7] * 64 * 784}]
        }
        many = requests.post(f"{url}/v2/models/fashion-vit/infer", json=images, timeout=60)
        assert many.status_code == 200 and many.json()["outputs"][0]["shape"][0] == 64, many.text[:300]
        head = requests.head(f"{url}/v2/health/ready", timeout=30)  # through Ray's proxy too
        assert (head.status_code, head.content) == (200, b"") and int(head.headers["content-length"]) > 0
        stub = apb_grpc.AttentionServiceStub(grpc.insecure_channel(svc.grpc_target))
        reply = stub.Translate(
            apb.TranslateRequest(model="dates-bahdanau", texts=["3 juin 1980"]), timeout=30
        )
        assert reply.translations[0].text == "1980-06-03"
        # a message protobuf cannot parse, parsed in Ray's proxy: INVALID_ARGUMENT as in-replica
        # (grpc_parsing), not UNKNOWN
        garbage = grpc.insecure_channel(svc.grpc_target).unary_unary(
            "/attention.v1.AttentionService/Translate"
        )
        with pytest.raises(grpc.RpcError) as undecodable:
            garbage(b"\xff\xff\xff\xff\x0f", timeout=30)
        assert undecodable.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid protobuf message" in (undecodable.value.details() or "")
        # typed contents over the limit, in the proxy or the ingress replica, which Ray's processes
        # read from the environment python -m service gives them
        typed = pb.ModelInferRequest(model_name="dates-bahdanau")
        typed.inputs.add(name="TEXT", datatype="UINT8").contents.uint_contents.extend([7] * 70_000)
        with pytest.raises(grpc.RpcError) as costly:
            pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(svc.grpc_target)).ModelInfer(
                typed, timeout=30
            )
        assert costly.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "over the limit of 65536 (limits.max_grpc_value_bytes)" in (costly.value.details() or "")
        slow = {"text": "Samstag, 15. Mai 1976 " * 8, "beam_size": 8, "truncate": True}
        target = f"{url}/v1/models/dates-transformer/translate"
        with ThreadPoolExecutor(64) as pool:
            statuses = Counter(
                pool.map(lambda _: requests.post(target, json=slow, timeout=60).status_code, range(128))
            )
        assert set(statuses) == {200, 503} and statuses[503] > 0, statuses
        asks = [
            apb.TranslateRequest(model="dates-transformer", texts=[slow["text"]], beam_size=8, truncate=True)
        ] * 96
        asks += [apb.TranslateRequest(model="nope", texts=["3 juin 1980"]),
                 apb.TranslateRequest(model="dates-bahdanau", texts=[""])]  # fmt: skip

        def code(ask: apb.TranslateRequest) -> tuple[grpc.StatusCode, str]:
            try:
                stub.Translate(ask, timeout=60)
            except grpc.RpcError as exc:
                return exc.code(), exc.details()
            return grpc.StatusCode.OK, ""

        with ThreadPoolExecutor(64) as pool:
            codes = list(pool.map(code, asks))
        *shed, unknown, empty = codes
        assert {c for c, _ in shed} == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, Counter(shed)
        assert unknown[0] == grpc.StatusCode.NOT_FOUND and "'nope' not found" in unknown[1]
        assert empty[0] == grpc.StatusCode.INVALID_ARGUMENT and "texts[0]: must not be empty" in empty[1]
        # the metrics answer, with the requests counted: under Ray's OpenCensus export every
        # scrape was a 500 once Ray's proxy reported its own series (the frontends' default now
        # is OpenTelemetry)
        scrapes, complete = [], 0
        # every process's series reach Ray's agent with its first exports (metrics_export_s), then
        # 2 more (the latency series come from the proxies, in ray-direct from the ingress replica)
        for _ in range(15):
            scrapes.append(requests.get(svc.metrics_url, timeout=10))
            text = scrapes[-1].text
            ours = "ray_attention_requests_total{" in text and 'status="503"' in text
            proxies = all(f"ray_serve_{p}_request_latency_ms_bucket" in text for p in ("http", "grpc"))
            proxies &= any(  # the proxy's event-loop series, what broke OpenCensus's export
                "ray_serve_event_loop_scheduling_latency_ms" in line and 'component="proxy"' in line
                for line in text.splitlines()
            )
            complete += ours and proxies
            if complete == 3 or scrapes[-1].status_code != 200:
                break
            time.sleep(2)
        assert [r.status_code for r in scrapes] == [200] * len(scrapes), scrapes[-1].text[:300]
        assert complete == 3, scrapes[-1].text[:3000]
    # refusals are answers, not failures: Ray logged each raised one with a traceback
    assert "Request failed" not in svc.log.read_text()
    # no token, ATTN_HOST loopback: the start says Ray's gRPC proxy listens on every interface
    assert "gRPC listens on every interface" in svc.log.read_text()


class _Gone:
    async def info(self) -> dict[str, Any]:
        raise DeploymentUnavailableError(DeploymentID(name="dates-bahdanau", app_name="attention"))


class _Broken:
    async def info(self) -> dict[str, Any]:
        raise RuntimeError("the info call broke")


def test_the_version_follower_is_quiet_about_model_deployments_that_are_gone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stop tears the model deployments down beside the ingress: a poll then finds one gone
    (DeploymentUnavailableError) and says nothing — it logged an ERROR with a traceback, which
    the stop check of the ray-proxy service caught. Any other failure is still logged, once
    (not at each of the 20 polls)."""
    replica = IngressReplica({}, {}, {}, Settings(repository=tmp_path, repository_poll_s=0.01))

    async def follow(remote: Any) -> None:
        replica.remote = {"dates-bahdanau": remote}
        task = asyncio.create_task(replica._follow_versions())
        await asyncio.sleep(0.2)  # about 20 polls
        task.cancel()

    with caplog.at_level(logging.INFO, logger="ray.serve"):
        asyncio.run(follow(_Gone()))
        assert not caplog.records
        asyncio.run(follow(_Broken()))
    assert "the info call broke" in caplog.text
    assert [r.getMessage() for r in caplog.records] == ["following the versions of dates-bahdanau failed"]


class _Serving:
    def __init__(self, version: int, rejected: dict[str, str]) -> None:
        self.version, self.rejected = version, rejected

    async def info(self) -> dict[str, Any]:
        return {"version": self.version, "rejected": self.rejected}


class _Replicas:
    """A model deployment whose replicas Ray routes the info call to in turn: each serves
    ``versions[i]`` (None: nothing, its load failed)."""

    def __init__(self, *versions: int | None) -> None:
        self.versions, self.calls = versions, 0

    async def info(self) -> dict[str, Any]:
        self.calls += 1
        version = self.versions[(self.calls - 1) % len(self.versions)]
        return {"version": version, "rejected": {} if version else {"fashion-vit/1": "failed to load: x"}}


def test_a_model_no_replica_ever_served_is_left_out_and_one_a_replica_serves_stays(
    tiny_repository: Path, tmp_path: Path
) -> None:
    """A deployment whose replicas serve nothing (no version of the model loads) is left out, and
    the others serve. One replica of several that serves nothing (a passing failure: it tries
    again at each poll, and answers 503 meanwhile) does not take the model away from the others:
    the model flapped in and out at each pass, as the info call reached one or the other."""
    entries = {name: load_entry(tiny_repository, name, 1) for name in ("dates-bahdanau", "fashion-vit")}
    replica = IngressReplica({}, entries, {}, Settings(repository=tiny_repository, repository_poll_s=0))

    async def passes(deployments: dict[str, Any], count: int) -> list[list[str]]:
        replica.remote = deployments
        seen = []
        for _ in range(count):
            await replica._follow_once()
            seen.append(sorted(replica.server.entries))
        return seen

    never = asyncio.run(passes({"dates-bahdanau": _Replicas(1), "fashion-vit": _Replicas(None)}, 3))
    assert never == [["dates-bahdanau"]] * 3 and replica.server.rejected == {
        "fashion-vit/1": "failed to load: x"
    }
    assert asyncio.run(replica.served()) == (["dates-bahdanau"], {"fashion-vit/1": "failed to load: x"})
    mixed = asyncio.run(passes({"dates-bahdanau": _Replicas(1), "fashion-vit": _Replicas(1, None)}, 4))
    assert mixed == [["dates-bahdanau", "fashion-vit"]] * 4


def test_one_model_that_cannot_be_followed_does_not_hold_up_the_others(
    tiny_repository: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """dates-bahdanau's deployment cannot be asked (or its version read here); fashion-vit's
    replicas went to v2 and refused v3: the ingress lists fashion-vit v2 and the refusal, and
    keeps what it knew of dates-bahdanau — one failing model stopped every other's updates."""
    repository = tmp_path / "repository"
    for name in ("dates-bahdanau", "fashion-vit"):
        shutil.copytree(tiny_repository / name / "1", repository / name / "1")
    version_of(tiny_repository, repository, 2, "fashion-vit")
    entries = {name: load_entry(repository, name, 1) for name in ("dates-bahdanau", "fashion-vit")}
    known = {"dates-bahdanau/2": "failed to load: before"}
    replica = IngressReplica({}, entries, known, Settings(repository=repository, repository_poll_s=0.01))

    async def follow() -> None:
        replica.remote = {"dates-bahdanau": _Broken(), "fashion-vit": _Serving(2, {"fashion-vit/3": "bad"})}  # type: ignore[dict-item]
        task = asyncio.create_task(replica._follow_versions())
        await asyncio.sleep(0.3)
        task.cancel()

    with caplog.at_level(logging.INFO, logger="ray.serve"):
        asyncio.run(follow())
    served = {name: e.version for name, e in replica.server.entries.items()}
    assert served == {"dates-bahdanau": 1, "fashion-vit": 2}, served
    assert replica.server.rejected == {"dates-bahdanau/2": "failed to load: before", "fashion-vit/3": "bad"}
    assert [r.getMessage() for r in caplog.records] == ["following the versions of dates-bahdanau failed"]


@pytest.mark.parametrize("frontend", ["ray-proxy", "ray-direct", "in-replica"])
def test_a_stop_answers_what_is_in_flight_and_refuses_the_rest_clearly(
    frontend: str, tiny_repository: Path, tmp_path: Path
) -> None:
    """SIGTERM under load from 8 clients (REST and KServe v2, short and slow requests): every
    request sent before the signal is answered 200; after it, each answer is 200 or a JSON 503
    saying the service stops, with Retry-After, until connections are refused. Ray's proxy
    answered a plain-text 404 for ~2 s (the app deleted while the proxy still listened)."""
    with frontend_service(frontend, tiny_repository, tmp_path) as svc:
        asks = [
            ("/v1/models/dates-bahdanau/translate", {"text": "3 juin 1980"}),
            ("/v1/models/dates-transformer/translate",
             {"text": "Samstag, 15. Mai 1976 " * 8, "beam_size": 8, "truncate": True}),
            ("/v2/models/dates-bahdanau/infer",
             {"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["3 juin 1980"]}]}),
        ]  # fmt: skip
        signalled = threading.Event()
        signalled_at: list[float] = []
        seen: list[
            tuple[float, float, int | str, str, str | None]
        ] = []  # sent, done, status, body, Retry-After

        def client(k: int) -> None:
            session = requests.Session()
            for i in itertools.count():
                path, body = asks[(k + i) % len(asks)]
                sent = time.monotonic()
                try:
                    answer = session.post(svc.url + path, json=body, timeout=30)
                except requests.ConnectionError as exc:
                    seen.append((sent, time.monotonic(), type(exc).__name__, "", None))
                    if signalled.is_set():
                        return  # refused or closed: the service is going
                    continue
                seen.append((sent, time.monotonic(), answer.status_code, answer.text,
                             answer.headers.get("retry-after")))  # fmt: skip
                if signalled_at and time.monotonic() > signalled_at[0] + 30:
                    return

        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(3)
        started = psutil.Process(svc.pid).children(recursive=True)  # Ray's processes, decode children
        before = svc.log.stat().st_size
        moment = datetime.datetime.now()
        signalled_at.append(time.monotonic())
        os.kill(svc.pid, signal.SIGTERM)
        signalled.set()
        for thread in threads:
            thread.join(60)
        process = psutil.Process(svc.pid)
        deadline = time.monotonic() + STOP_WITHIN_S
        while process.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.1)
        assert process.status() == psutil.STATUS_ZOMBIE, "the service did not stop"
        _, alive = psutil.wait_procs(started, timeout=10)
        assert not alive, alive  # nothing it started is left behind
    # sent well before the signal: answered; sent just before it, a request may reach the
    # ingress after the drain began (on a loaded machine), and a 503 "stopping" is its answer
    sent_before = [s for s in seen if s[0] < signalled_at[0] - 0.5]
    assert sent_before and all(s[2] == 200 for s in sent_before), Counter(s[2] for s in sent_before)
    after = [s for s in seen if s[0] >= signalled_at[0] - 0.5]
    for _, _, status, text, retry_after in after:
        if status == 503:
            assert "stopping" in json.loads(text)["error"] and retry_after == "1", text
        else:
            assert status in (200, "ConnectionError"), (status, text[:200])
    assert Counter(s[2] for s in seen if s[1] > signalled_at[0])[200] > 0  # in flight at the signal
    with svc.log.open("rb") as out:
        out.seek(before)
        stopping = out.read().decode(errors="replace")
    bad = [line for line in logged_since(stopping, moment) if re.search(r"ERROR|Traceback", line)]
    assert not bad, "errors while stopping:\n" + "\n".join(bad[:20])


class _ShedStream:
    """Ray's response generator for a call its queue limit shed: iterating raises
    BackPressureError, and so does ``cancel`` (it fetches the call's result)."""

    def __aiter__(self) -> _ShedStream:
        return self

    async def __anext__(self) -> Any:
        raise BackPressureError(num_queued_requests=1, max_queued_requests=1)

    def cancel(self) -> None:
        raise BackPressureError(num_queued_requests=1, max_queued_requests=1)


class _ShedHandle:
    def options(self, **_: Any) -> _ShedHandle:
        return self

    @property
    def stream(self) -> _ShedHandle:
        return self

    def remote(self, _: Any) -> _ShedStream:
        return _ShedStream()


def test_a_shed_stream_is_overloaded_not_an_internal_error() -> None:
    """An overloaded streamed translation (SSE, ModelStreamInfer, TranslateStream) got a 500 with
    a traceback: the generator's ``cancel`` in ``finally`` raised the shed call's error again."""

    async def go() -> None:
        with pytest.raises(Overloaded, match="overloaded"):
            async for _ in RemoteModel(_ShedHandle()).stream(object()):  # type: ignore[arg-type]
                pass

    asyncio.run(go())


class _Refusing:
    """A model deployment serving version 1 that refused to load version 3."""

    async def info(self) -> dict[str, Any]:
        return {"version": 1, "rejected": {"fake-translator/3": "failed to load: a checksum differs"}}


def test_versions_a_model_deployment_refused_are_listed_by_the_ingress(tmp_path: Path) -> None:
    """A newer version that failed to load was logged in the model's replica only: ``rejected``
    in /v1/models and the repository index said nothing (in-replica lists it)."""
    server = fake_server(tmp_path)[0]
    replica = IngressReplica({}, dict(server.entries), {"broken/1": "refused at start"},
                             Settings(repository=tmp_path, repository_poll_s=0.01))  # fmt: skip
    replica.remote = {"fake-translator": _Refusing()}  # type: ignore[dict-item]

    async def follow() -> None:
        task = asyncio.create_task(replica._follow_versions())
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(follow())
    assert replica.server.rejected == {
        "broken/1": "refused at start",
        "fake-translator/3": "failed to load: a checksum differs",
    }
