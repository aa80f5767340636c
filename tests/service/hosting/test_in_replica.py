"""The default in-replica frontend under pressure: two replicas behind one port, overload shed
with 503 + Retry-After (HTTP) and RESOURCE_EXHAUSTED (gRPC) and counted in the metrics, the
serving ports bound to the configured host only, long-lived clients (a gRPC channel, a slow HTTP
client) moved between the replicas by the connection age, a killed replica replaced, a replica
added by autoscaling. A repository that changes while served is ``test_in_replica_repository``'s;
the gRPC health service until a stop, ``test_in_replica_health``'s."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import requests

from benchmarks.loadgen import Request, closed_loop
from service.api.protos import attention_pb2 as apb
from service.api.protos import attention_pb2_grpc as apb_grpc
from tests.conftest import Service, running_service

pytestmark = pytest.mark.slow
# a few ms of beam search each: a text over the model's source limit, cut to it (64 tokens)
SLOW = {"text": "Samstag, 15. Mai 1976 " * 8, "beam_size": 8, "truncate": True}


def with_a_broken_model(repository: Path, root: Path) -> Path:
    """``repository``'s models plus ``broken-vit``: a manifest that validates (no checksums)
    over a graph file ONNX Runtime cannot read — incompatible rather than visibly corrupt."""
    out = root / "repository"
    out.mkdir()
    for model in repository.iterdir():
        (out / model.name).symlink_to(model, target_is_directory=True)
    broken = out / "broken-vit" / "1"
    shutil.copytree(repository / "fashion-vit" / "1", broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest.update(name="broken-vit", checksums={})
    (broken / "manifest.json").write_text(json.dumps(manifest))
    (broken / manifest["graphs"]["model"]["file"]).write_bytes(b"not an ONNX graph")
    return out


@pytest.fixture(scope="module")
def crowded(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """Two replicas; the Transformer (and the ViT) batch one request at a time and queue one
    beyond the 16 they work on, so each replica holds at most 17 of the Transformer's requests;
    one model cannot load; client connections are asked to reconnect after 1 s."""
    root = tmp_path_factory.mktemp("crowded")
    with running_service(
        with_a_broken_model(tiny_repository, root),
        root,
        ATTN_NUM_REPLICAS="2",
        ATTN_CONNECTION_MAX_AGE_S="1",
        ATTN_LIMITS__MAX_QUEUED_REQUESTS="1",
        ATTN_MODEL_OVERRIDES=json.dumps(
            {
                m: {"max_batch_size": 1, "batch_wait_timeout_s": 0}
                for m in ("dates-transformer", "fashion-vit")
            }
        ),
    ) as svc:
        yield svc


def test_a_request_of_as_many_images_as_allowed_fits_a_small_queue(crowded: Service) -> None:
    """The ViT works on 16 requests at once (batch size 1) and the queue limit is 1: a KServe v2
    request of ``max_images`` (64) images, one model request each, was refused 503 on an idle
    model however often it was retried. An image model's queue holds a whole request."""
    pixels = np.random.default_rng(0).integers(0, 256, (64, 28, 28), dtype=np.uint8)
    body = {"inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": list(pixels.shape),
                        "data": pixels.ravel().tolist()}]}  # fmt: skip
    answer = requests.post(f"{crowded.url}/v2/models/fashion-vit/infer", json=body, timeout=60)
    assert answer.status_code == 200, answer.text[:300]
    assert [o["shape"][0] for o in answer.json()["outputs"]] == [64] * len(answer.json()["outputs"])


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
    before = {s: _counted(crowded, "dates-transformer", s) for s in ("200", "503")}
    with ThreadPoolExecutor(160) as pool:
        answers = list(pool.map(lambda _: requests.post(url, json=SLOW, timeout=60), range(320)))
    statuses = Counter(a.status_code for a in answers)
    assert set(statuses) == {200, 503} and statuses[503] > 0 and statuses[200] > 0, statuses
    shed = [a for a in answers if a.status_code == 503]
    assert all(a.headers["Retry-After"] == "1" and "overloaded" in a.json()["error"] for a in shed)
    assert max(a.elapsed.total_seconds() for a in shed) < 5  # refused at once, not after a queue
    # every refusal and every answer is in the metrics (Ray exports them every few seconds). The
    # answers too: refusals all come first, so a count that waited for them alone left answers to
    # arrive during the next test, which counted them as its own
    deadline = time.monotonic() + 60

    def counted() -> dict[int, float]:
        return {int(s): _counted(crowded, "dates-transformer", s) - n for s, n in before.items()}

    while (now := counted()) != {200: statuses[200], 503: statuses[503]}:
        assert all(now[s] <= statuses[s] for s in now), f"counted {now}, answered {statuses}"
        assert time.monotonic() < deadline, f"counted {now} of {statuses}"
        time.sleep(2)
    assert requests.get(f"{crowded.url}/readyz", timeout=30).status_code == 200


def test_grpc_overload_is_resource_exhausted(crowded: Service) -> None:
    stub = apb_grpc.AttentionServiceStub(grpc.insecure_channel(crowded.grpc_target))
    request = apb.TranslateRequest(
        model="dates-transformer", texts=[SLOW["text"]], beam_size=8, truncate=True
    )
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


def _counted(service: Service, model: str, status: str, route: str | None = None) -> float:
    text = requests.get(service.metrics_url, timeout=10).text
    pattern = r"^ray_attention_requests_total{([^}]*)} (\S+)$"
    wanted = {f'model="{model}"', f'status="{status}"'} | ({f'route="{route}"'} if route else set())
    return sum(
        float(v) for labels, v in re.findall(pattern, text, flags=re.M) if wanted <= set(labels.split(","))
    )


def test_a_model_onnx_runtime_refuses_is_left_out_and_the_others_serve(crowded: Service) -> None:
    listing = requests.get(f"{crowded.url}/v1/models", timeout=30).json()
    assert "failed to load" in listing["rejected"]["broken-vit/1"]
    assert "broken-vit" not in [m["name"] for m in listing["models"]]
    answer = requests.post(f"{crowded.url}/v1/models/broken-vit/classify", json={"pixels": [[0]]}, timeout=30)
    assert answer.status_code == 404
    ok = requests.post(f"{crowded.url}/v1/models/dates-bahdanau/translate", json={"text": "3 juin 1980"})
    assert ok.status_code == 200


def test_clients_that_disconnect_free_their_places(crowded: Service) -> None:
    """Each replica works on one of these at a time and holds at most 17: an HTTP request still
    waiting when its disconnect watch starts (``routes.WATCH_AFTER_S``) leaves as a 499, one
    answered sooner was answered (the unit test of the watch, ``tests/service/api/test_routes.py``,
    times both), one beyond a replica's places was shed (503: the kernel spreads connections
    over the two replicas unevenly); a cancelled gRPC call leaves at once. Either way none holds
    its place afterwards."""
    host, port = crowded.url.removeprefix("http://").split(":")
    body = json.dumps(SLOW).encode()
    model = "dates-transformer"
    before = {s: _counted(crowded, model, s, route="translate") for s in ("200", "499", "503")}
    grpc_before = _counted(crowded, model, "499", route="grpc_translate")
    for _ in range(30):  # send, then hang up at once
        with socket.create_connection((host, int(port))) as s:
            s.sendall(
                b"POST /v1/models/dates-transformer/translate HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
    deadline = time.monotonic() + 60

    def ended() -> dict[str, float]:  # the abandoned HTTP requests' statuses so far
        return {s: _counted(crowded, model, s, route="translate") - before[s] for s in before}

    while sum((now := ended()).values()) < 30:
        assert time.monotonic() < deadline, f"not all 30 abandoned HTTP requests ended: {now}"
        time.sleep(2)
    assert sum(now.values()) == 30, now  # none left waiting
    # then gRPC, once the HTTP requests left their places (else the channel's replica may shed
    # every call): calls of 16 texts each, long enough to be still at work or queued when the
    # client cancels them, on a channel already connected (a call cancelled before it reached
    # the server is never seen there)
    channel = grpc.insecure_channel(crowded.grpc_target)
    grpc.channel_ready_future(channel).result(timeout=30)
    stub = apb_grpc.AttentionServiceStub(channel)
    request = apb.TranslateRequest(
        model="dates-transformer", texts=[SLOW["text"]] * 16, beam_size=8, truncate=True
    )
    calls = [stub.Translate.future(request, timeout=60) for _ in range(30)]
    time.sleep(0.2)
    cancelled = sum(call.cancel() for call in calls)  # False: it had ended (answered or shed)
    assert cancelled > 0, Counter(c.code() for c in calls)
    while _counted(crowded, model, "499", route="grpc_translate") - grpc_before < 1:
        assert time.monotonic() < deadline, "no cancelled gRPC call counted as 499"
        time.sleep(2)
    # the abandoned requests left the queue: the next one waits for at most the batch in flight
    answer = requests.post(f"{crowded.url}/v1/models/dates-transformer/translate", json=SLOW, timeout=60)
    metrics = answer.json()["metrics"]
    assert metrics["queue_wait_ms"] < 4 * metrics["compute_ms"] + 100, metrics


def test_long_lived_clients_reach_both_replicas(crowded: Service) -> None:
    """ATTN_CONNECTION_MAX_AGE_S (1 s here): a gRPC channel keeps one connection for its whole life
    (it stayed on one replica before the age existed), and an HTTP client slower than
    ATTN_KEEPALIVE_REQUESTS (100) per connection would keep its connection for long; with the age
    each is asked to reconnect, lands on either replica, and no call fails on the way — unary and
    streamed gRPC calls and HTTP requests together, from concurrent clients."""
    stub = apb_grpc.AttentionServiceStub(grpc.insecure_channel(crowded.grpc_target))
    request = apb.TranslateRequest(model="dates-bahdanau", texts=["3 juin 1980"])
    streamed = apb.TranslateRequest(model="dates-transformer", texts=["15 mai 1976"])
    deadline = time.monotonic() + 40
    seen: dict[str, Counter[str]] = {"grpc": Counter(), "stream": Counter(), "http": Counter()}
    http_closes = []  # requests sent on the session's connection when it was asked to close

    def done() -> bool:
        return all(len(c) == 2 for c in seen.values()) or time.monotonic() > deadline

    def unary() -> None:
        while not done():
            seen["grpc"][stub.Translate(request, timeout=30).metrics.replica] += 1

    def stream() -> None:
        while not done():
            *_, last = stub.TranslateStream(streamed, timeout=30)
            seen["stream"][last.answer.metrics.replica] += 1

    def http() -> None:
        with requests.Session() as session:
            sent = 0
            while not done():
                answer = session.post(
                    f"{crowded.url}/v1/models/dates-bahdanau/translate",
                    json={"text": "3 juin 1980"},
                    timeout=30,
                )
                assert answer.status_code == 200, answer.text
                seen["http"][answer.json()["metrics"]["replica"]] += 1
                sent += 1
                if answer.headers.get("connection") == "close":
                    http_closes.append(sent)
                    sent = 0
                time.sleep(0.05)  # a client of ≈ 15 requests/s: 100 requests would take ≈ 7 s

    with ThreadPoolExecutor(4) as pool:
        for job in [pool.submit(f) for f in (unary, unary, stream, http)]:
            job.result()  # raises a failed call
    assert all(len(c) == 2 for c in seen.values()), seen
    assert http_closes and max(http_closes) < 100, http_closes  # closed by age, not by count


def test_a_killed_replica_is_replaced_and_at_most_a_thousandth_of_requests_fail(crowded: Service) -> None:
    """The last test on `crowded`: it kills one of its two replicas under load (SIGKILL, by PID)."""
    root = psutil.Process(crowded.pid)
    victims = [
        p for p in root.children(recursive=True) if "ServeReplica:attention:replica" in " ".join(p.cmdline())
    ]
    assert len(victims) == 2
    host, port = crowded.url.removeprefix("http://").split(":")
    work = [Request.json("/v1/models/dates-bahdanau/translate", {"text": "3 juin 1980"})]
    timer = threading.Timer(2, victims[0].send_signal, (signal.SIGKILL,))
    timer.start()
    # clients retry a dropped connection up to twice (urllib3's default allows three): a first
    # retry can still land in the dying replica's accept queue
    result = asyncio.run(closed_loop(host, int(port), work, 4, 10, retries=2))
    timer.join()
    # the goal: at most 0.1 % fail after the retries
    assert result.ok > 100 and result.errors <= 0.001 * (result.ok + result.errors), (
        result.statuses,
        result.errors,
    )
    deadline = time.monotonic() + 90
    while True:  # Ray starts a replacement, which rejoins the port once its models are warm
        replicas = set()
        for _ in range(30):
            answer = requests.post(
                f"{crowded.url}/v1/models/dates-bahdanau/translate", json={"text": "3 juin 1980"}
            )
            replicas.add(answer.json()["metrics"]["replica"])
        if len(replicas) == 2:
            break
        assert time.monotonic() < deadline, "the killed replica was not replaced"
        time.sleep(2)


def test_serving_replicas_autoscale_on_the_requests_they_hold(tiny_repository: Path, tmp_path: Path) -> None:
    """In-replica autoscaling: Ray routes no request here, so each replica reports what it holds
    (Ray's custom autoscaling metrics) and the policy adds a replica under load; the new one
    joins the port and answers a share of new connections."""
    settings = '{"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4, "look_back_period_s": 2, "upscale_delay_s": 0}'
    with running_service(tiny_repository, tmp_path, ATTN_AUTOSCALING=settings) as svc:
        url = f"{svc.url}/v1/models/dates-transformer/translate"
        replicas: Counter[str] = Counter()
        deadline = time.monotonic() + 90

        def client() -> None:
            while len(replicas) < 2 and time.monotonic() < deadline:
                answer = requests.post(url, json=SLOW, headers={"Connection": "close"}, timeout=30)
                assert answer.status_code == 200, answer.text
                replicas[answer.json()["metrics"]["replica"]] += 1

        with ThreadPoolExecutor(16) as pool:
            for future in [pool.submit(client) for _ in range(16)]:
                future.result()
        assert len(replicas) == 2, f"no second replica answered within 90 s: {replicas}"
        assert "Upscaling" in svc.log.read_text(errors="replace")
