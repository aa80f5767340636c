"""Streamed translations over REST (Server-Sent Events), on real models over real HTTP.

Against the running service (Ray, in-replica frontend): concurrent streams on two models beside
plain calls — every token event in order, the stream equal to the final answer and to the plain
answer (which comes gzip-compressed when long, the stream never); beam search answers alone; errors before the stream are ordinary JSON. Against the app
under uvicorn in this process, on a model that never stops: a client that disconnects, and one
that stops reading, free their rows long before the decode would have ended, while another
client's answer is unaffected."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import requests
import uvicorn

from service.api.grpc_aio import add_to_grpc_server
from service.api.grpc_servicer import GrpcServicer
from service.api.http import create_app
from service.api.protos import attention_pb2 as apb
from service.api.protos import attention_pb2_grpc as apb_grpc
from service.api.rest_stream import token_event, wants_stream
from service.api.schemas import TranslateRequest
from service.api.server import Server
from service.inference.jobs import TokenEvent
from service.settings import Settings
from tests.conftest import Service, free_port
from tests.service.inference.test_streaming import DATES, RowsSeen, endless, worker

pytestmark = pytest.mark.slow


def sse(response: requests.Response) -> list[tuple[str, Any]]:
    """(event name, JSON data) of every event of a text/event-stream answer."""
    events, name = [], "message"
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[6:])))
    return events


def stream(svc: Service, model: str, body: dict[str, Any], **kw: Any) -> tuple[requests.Response, list]:
    """The answer and its events (none when it is not an event stream: its body is read then)."""
    url = f"{svc.url}/v1/models/{model}/translate"
    with requests.post(url, json=body, stream=True, timeout=60, **kw) as r:
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            return r, sse(r)
        r.content  # noqa: B018 — read while the connection is open
        return r, []


def test_streams_under_concurrent_mixed_traffic(service: Service) -> None:
    calls = [
        (model, {"text": DATES[i % 6 : i % 6 + 1 + i % 3], "return_attention": i % 2 == 0})
        for i in range(12)
        for model in ("dates-transformer", "dates-bahdanau")
    ]

    compressed: list[bool] = []

    def one(call: tuple[str, dict[str, Any]]) -> tuple[list, dict[str, Any]]:
        model, body = call
        streamed = stream(service, model, {**body, "stream": True})
        plain = service.post(f"/v1/models/{model}/translate", json=body)
        # requests asks for gzip: an answer past ATTN_COMPRESS_MIN_BYTES comes compressed
        long = len(plain.content) >= Settings.model_fields["compress_min_bytes"].default
        assert plain.headers.get("content-encoding") == ("gzip" if long else None)
        compressed.append(long)
        return streamed, plain.json()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, calls))
    assert any(compressed) and not all(compressed)
    for (model, body), ((response, events), plain) in zip(calls, results, strict=True):
        assert response.status_code == 200 and response.headers["content-type"].startswith(
            "text/event-stream"
        )
        assert "content-encoding" not in response.headers  # events go as they come, uncompressed
        *tokens, (last, answer) = events
        assert last == "answer" and answer["model"] == model and tokens
        assert {name for name, _ in tokens} == {"token"}
        assert [t["text"] for t in answer["translations"]] == [t["text"] for t in plain["translations"]]
        assert answer["metrics"]["time_to_first_token_ms"] > 0
        for i, t in enumerate(answer["translations"]):
            mine = [e for _, e in tokens if e["text_index"] == i]
            assert [e["index"] for e in mine] == list(range(len(t["target_tokens"])))
            assert [e["token"] for e in mine] == t["target_tokens"]
            assert "".join(e["text"] for e in mine) == t["text"]
            if body["return_attention"]:
                rows = [e["attention"] for e in mine]
                np.testing.assert_allclose(rows, t["attention"]["values"], atol=2e-6)
            else:
                assert "attention" not in mine[0]


def test_accept_header_beam_and_errors(service: Service) -> None:
    response, events = stream(
        service, "dates-transformer", {"text": "3 juin 1980"}, headers={"Accept": "text/event-stream"}
    )
    assert events[-1][0] == "answer" and events[-1][1]["translations"][0]["text"] == "1980-06-03"
    response, events = stream(
        service, "dates-transformer", {"text": ["3 juin 1980"], "beam_size": 3, "stream": True}
    )
    assert [name for name, _ in events] == ["answer"]
    for model, body, status in (
        ("nope", {"text": "x", "stream": True}, 404),
        ("dates-transformer", {"text": "", "stream": True}, 422),
        ("fashion-vit", {"text": "x", "stream": True}, 400),
    ):
        response, events = stream(service, model, body)
        assert response.status_code == status and not events
        assert "error" in response.json()


# -- in process: clients that leave or stop reading ---------------------------------------------


class Statuses:
    def __init__(self) -> None:
        self.records: list[tuple[str, str, int]] = []

    def record(self, model: str, route: str, status: int, seconds: float) -> None:
        self.records.append((model, route, status))


@pytest.fixture(scope="module")
def endless_app(
    tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Any, Statuses, str]]:
    """The app with the endless model under uvicorn in a thread; a write blocked for 0.2 s ends a stream."""
    version = endless(tiny_repository, tmp_path_factory.mktemp("endless"))
    rows = RowsSeen()
    w = worker(version, rows)
    server = Server(
        Settings(repository=version.parent.parent, limits={"stream_write_timeout_s": 0.2}),
        statuses := Statuses(),
    )
    server.serve({"dates-transformer": w}, {"dates-transformer": w.entry}, {})
    grpc_address = serve_grpc(server)
    port = free_port()
    listener = socket.socket()
    # small kernel send buffers (accepted connections inherit them): a reader that stops blocks
    # the service's writes after tens of kilobytes, not megabytes
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    listener.bind(("127.0.0.1", port))
    uv = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.05)
    yield f"127.0.0.1:{port}", w, statuses, grpc_address
    uv.should_exit = True
    thread.join(10)


def serve_grpc(server: Server) -> str:
    """The servicer over ``server`` on a grpc.aio server, on an event loop of its own thread."""
    port = free_port()
    ready = threading.Event()

    async def run() -> None:
        grpc_server = grpc.aio.server()
        limits = server.settings.limits
        add_to_grpc_server(grpc_server, GrpcServicer(server), write_timeout_s=limits.stream_write_timeout_s)
        grpc_server.add_insecure_port(f"127.0.0.1:{port}")
        await grpc_server.start()
        ready.set()
        await grpc_server.wait_for_termination()

    threading.Thread(target=asyncio.run, args=(run(),), daemon=True).start()
    ready.wait(30)
    return f"127.0.0.1:{port}"


def raw_stream(address: str, body: dict[str, Any], rcvbuf: int | None = None) -> socket.socket:
    host, port = address.split(":")
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect((host, int(port)))
    data = json.dumps({**body, "stream": True}).encode()
    sock.sendall(
        b"POST /v1/models/dates-transformer/translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def rows_gone(w: Any, timeout_s: float = 20) -> float:
    start = time.perf_counter()
    while w.scheduler.held or w.scheduler.rows:
        assert time.perf_counter() - start < timeout_s, "the request's rows stayed in the batch"
        time.sleep(0.02)
    return time.perf_counter() - start


def test_answered_streams_are_recorded_as_answered(endless_app: tuple[str, Any, Statuses, str]) -> None:
    """A stream that delivered its answer is a 200 in the request metrics, over REST and gRPC —
    not a 499 because its writer closed it after the last event."""
    address, _, statuses, target = endless_app
    cut = len(statuses.records)
    url = f"http://{address}/v1/models/dates-transformer/translate"
    with requests.post(
        url, json={"text": DATES[:2], "max_length": 6, "stream": True}, stream=True, timeout=60
    ) as r:
        events = sse(r)
    assert r.status_code == 200 and events[-1][0] == "answer"
    with grpc.insecure_channel(target) as channel:
        stub = apb_grpc.AttentionServiceStub(channel)
        request = apb.TranslateRequest(model="dates-transformer", texts=DATES[:2], max_length=6)
        assert list(stub.TranslateStream(request))[-1].WhichOneof("event") == "answer"
    wanted = {
        ("dates-transformer", "translate_stream", 200),
        ("dates-transformer", "grpc_translate_stream", 200),
    }
    deadline = time.perf_counter() + 10
    while not wanted <= set(statuses.records[cut:]):  # recorded once the writer let go
        assert time.perf_counter() < deadline, statuses.records[cut:]
        time.sleep(0.02)
    assert all(status == 200 for _, _, status in statuses.records[cut:]), statuses.records[cut:]


def test_a_client_that_disconnects_frees_its_rows(endless_app: tuple[str, Any, Statuses, str]) -> None:
    address, w, statuses, _ = endless_app
    steps = w.scheduler.steps
    sock = raw_stream(address, {"text": DATES[:8] * 4, "max_length": 500})
    received = b""
    while b"event: token" not in received:
        received += sock.recv(65536)
    assert received.startswith(b"HTTP/1.1 200")
    sock.close()
    rows_gone(w)
    assert w.scheduler.steps - steps < 400, "the decode ran on for nobody"
    assert ("dates-transformer", "translate_stream", 499) in statuses.records


def test_a_client_that_stops_reading_is_cut_off_and_others_go_on(
    endless_app: tuple[str, Any, Statuses, str],
) -> None:
    address, w, statuses, _ = endless_app
    steps, cut = w.scheduler.steps, len(statuses.records)
    sock = raw_stream(
        address, {"text": DATES[:8] * 8, "max_length": 500, "return_attention": True}, rcvbuf=4096
    )
    time.sleep(0.2)
    other = requests.post(
        f"http://{address}/v1/models/dates-transformer/translate",
        json={"text": DATES[:2], "max_length": 30},
        timeout=60,
    )
    assert other.status_code == 200 and all(
        len(t["target_tokens"]) == 30 for t in other.json()["translations"]
    )
    waited = rows_gone(w)  # never read: the blocked write timed out and the request was cancelled
    assert w.scheduler.steps - steps < 500, "the decode ran on for a reader that stopped"
    sock.close()
    assert waited < 15 and ("dates-transformer", "translate_stream", 499) in statuses.records[cut:]


def test_a_cancelled_grpc_stream_frees_its_rows(endless_app: tuple[str, Any, Statuses, str]) -> None:
    _, w, statuses, target = endless_app
    steps = w.scheduler.steps
    with grpc.insecure_channel(target) as channel:
        stub = apb_grpc.AttentionServiceStub(channel)
        request = apb.TranslateRequest(model="dates-transformer", texts=DATES[:8] * 4, max_length=500)
        call = stub.TranslateStream(request)
        first = next(call)
        assert first.WhichOneof("event") == "token" and first.token.index == 0
        call.cancel()
        rows_gone(w)
    assert w.scheduler.steps - steps < 400, "the decode ran on for a cancelled call"
    assert ("dates-transformer", "grpc_translate_stream", 499) in statuses.records


def test_a_grpc_client_that_stops_reading_is_cut_off_and_others_go_on(
    endless_app: tuple[str, Any, Statuses, str],
) -> None:
    """It keeps its connection open, its HTTP/2 window full: each response the stream yielded
    then waited for good, holding the request's rows, its place among the calls and the
    replica's drain. Now a write blocked for ``stream_write_timeout_s`` cuts the stream."""
    address, w, statuses, target = endless_app
    steps, cut = w.scheduler.steps, len(statuses.records)
    # no BDP probing: the window stays at its first 64 kB instead of growing to megabytes
    with grpc.insecure_channel(target, options=[("grpc.http2.bdp_probe", 0)]) as channel:
        stub = apb_grpc.AttentionServiceStub(channel)
        request = apb.TranslateRequest(
            model="dates-transformer", texts=DATES[:8] * 8, max_length=500, return_attention=True
        )
        call = stub.TranslateStream(request)
        assert next(call).WhichOneof("event") == "token"  # then never read again
        other = requests.post(
            f"http://{address}/v1/models/dates-transformer/translate",
            json={"text": DATES[:2], "max_length": 30},
            timeout=60,
        )
        assert other.status_code == 200
        waited = rows_gone(w)
        assert w.scheduler.steps - steps < 500, "the decode ran on for a reader that stopped"
        call.cancel()
    assert waited < 15 and ("dates-transformer", "grpc_translate_stream", 499) in statuses.records[cut:]


def test_grpc_translate_stream(service: Service) -> None:
    """attention.v1 TranslateStream on two models at once: tokens, then the answer Translate gives."""
    with grpc.insecure_channel(service.grpc_target) as channel:
        stub = apb_grpc.AttentionServiceStub(channel)

        def one(i: int) -> tuple[str, list[Any], Any]:
            model = ("dates-transformer", "dates-bahdanau")[i % 2]
            request = apb.TranslateRequest(model=model, texts=DATES[i % 5 : i % 5 + 2], return_attention=True)
            return model, list(stub.TranslateStream(request)), stub.Translate(request)

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(one, range(12)))
        for model, events, plain in results:
            *tokens, last = events
            assert last.WhichOneof("event") == "answer" and last.answer.model == model
            assert [t.text for t in last.answer.translations] == [t.text for t in plain.translations]
            for i, t in enumerate(last.answer.translations):
                mine = [e.token for e in tokens if e.token.text_index == i]
                assert [m.token for m in mine] == list(t.target_tokens)
                assert "".join(m.text for m in mine) == t.text
                rows = [list(m.attention.values) for m in mine]
                np.testing.assert_allclose(
                    rows, np.reshape(t.attention.values, list(t.attention.shape)), atol=1e-6
                )
        with pytest.raises(grpc.RpcError) as err:
            list(stub.TranslateStream(apb.TranslateRequest(model="nope", texts=["x"])))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_token_events_carry_their_fields_as_json() -> None:
    """Every field of a token event arrives as JSON on one data line, whatever the strings and
    numbers: quotes, backslashes, control characters, U+2028, non-ASCII; log-probabilities and
    attention rounded to 6 decimals; non-finite log-probabilities as null (JSON has no NaN)."""
    row = np.array([0.1234567891, 0.0, 0.8765432109], dtype=np.float32)
    cases = [
        TokenEvent(0, 0, 17, "▁2024", "2024", -0.0123456789),
        TokenEvent(2, 5, 3, 'a"b\\c', "\n\t\x01\u2028é", -1e-12),
        TokenEvent(1, 9, 2, "</s>", "", float("-inf"), alignment=row),
        TokenEvent(0, 1, 4, "x", " x", -3.0, alignment=row, layers=np.stack([row[None], row[None]])),
        TokenEvent(0, 2, 5, "😀", "😀", float("nan")),
    ]
    for event in cases:
        written = token_event(event).decode()
        assert written.startswith("event: token\ndata: ") and written.endswith("\n\n")
        data = written[len("event: token\ndata: ") : -2]
        assert "\n" not in data and "\r" not in data  # one data line
        fields = json.loads(data)
        logprob = None if not np.isfinite(event.logprob) else round(event.logprob, 6)
        want: dict[str, Any] = {
            "text_index": event.text_index, "index": event.index, "token": event.token,
            "token_id": event.token_id, "text": event.piece, "logprob": logprob,
        }  # fmt: skip
        if event.alignment is not None:
            want["attention"] = [0.123457, 0.0, 0.876543]
        if event.layers is not None:
            want["attention_layers"] = [[[0.123457, 0.0, 0.876543]]] * 2
        assert fields == want, event


@pytest.mark.parametrize(
    ("accept", "streamed"),
    [
        ("text/event-stream", True),
        ("Text/Event-Stream", True),  # media types are case-insensitive (RFC 9110 §8.3.1)
        ("text/event-stream, application/json", True),
        ("application/json, text/event-stream;q=0", False),  # refused
        ("text/event-stream;q=0.1, application/json", False),  # JSON preferred
        ("application/json;q=0.5, text/event-stream", True),
        ("*/*", False),
        ("", False),
    ],
)
def test_accept_chooses_the_stream_by_its_weights(accept: str, streamed: bool) -> None:
    assert wants_stream(TranslateRequest(text="abc"), accept) is streamed
    assert wants_stream(TranslateRequest(text="abc", stream=True), accept)
