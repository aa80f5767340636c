"""The inference routes' hot path (``HotRoutes`` in ``service/api/routes.py``, ``App.__call__`` in
``service/api/http.py``): which requests take it, and that they are answered exactly as FastAPI's
own routing answers them — successes, every error shape, auth, multipart refusals."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.api import routes
from service.api.http import App, create_app
from service.api.routes import HotRoutes, route_path
from tests.service.api.test_rest import BOUNDARY, call, multipart, png
from tests.service.fakes import fake_server


def scope(method: str, path: str, root_path: str = "") -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "root_path": root_path}


def test_only_posts_to_the_direct_routes_match(tmp_path: Path) -> None:
    app = create_app(fake_server(tmp_path)[0])
    hot = app.hot_routes
    assert isinstance(hot, HotRoutes) and len(hot.table) == 4  # translate, classify, v2 infer ×2
    for path, params in [
        ("/v1/models/m/translate", {"name": "m"}),
        ("/v1/models/m/classify", {"name": "m"}),
        ("/v2/models/m/infer", {"name": "m"}),
        ("/v2/models/m/versions/3/infer", {"name": "m", "version": "3"}),
    ]:
        hit = hot.match(scope("POST", path))
        assert hit is not None and hit[1] == params, path
    for method, path in [
        ("GET", "/v1/models/m/translate"),  # 405 from the router
        ("POST", "/v1/models/m/translate/"),  # the router's redirect
        ("POST", "/v1/models//translate"),  # an empty name: the router's 404
        ("POST", "/v1/models/m/explain"),
        ("POST", "/v2/models/m/versions/infer"),
        ("POST", "/v1/models"),
    ]:
        assert hot.match(scope(method, path)) is None, (method, path)


def test_matches_are_remembered_boundedly_and_answer_as_the_first_time(tmp_path: Path) -> None:
    """A path matched before answers from memory — the same handler and parameters, in a dict
    of the caller's own (a handler may change it) — misses and root paths included, and no
    stream of new paths, nor of long ones, makes the memory grow past its bound."""
    hot = create_app(fake_server(tmp_path)[0]).hot_routes
    assert hot is not None
    for _ in range(2):
        first = hot.match(scope("POST", "/v1/models/m/classify"))
        assert first is not None and first[1] == {"name": "m"}
        first[1]["name"] = "changed by the caller"
        assert hot.match(scope("POST", "/v1/models/m/explain")) is None
        mounted = hot.match(scope("POST", "/api/v1/models/m/translate", "/api"))
        assert mounted is not None and mounted[1] == {"name": "m"}
        assert hot.match(scope("POST", "/api/v1/models/m/translate")) is None  # no root path: no route
    for i in range(3 * routes.MATCHES_KEPT):
        hit = hot.match(scope("POST", f"/v2/models/m{i}/infer"))
        assert hit is not None and hit[1] == {"name": f"m{i}"}
    assert len(hot._matched) <= routes.MATCHES_KEPT
    hot._matched.clear()
    long = "m" * 60_000  # a model name as long as uvicorn lets a path be: matched, never kept
    for _ in range(2):
        hit = hot.match(scope("POST", f"/v1/models/{long}/classify"))
        assert hit is not None and hit[1] == {"name": long}
    assert not hot._matched


def test_a_root_path_is_taken_off_as_starlette_does() -> None:
    assert route_path(scope("POST", "/api/v1/models/m/classify", "/api")) == "/v1/models/m/classify"
    assert route_path(scope("POST", "/apiv1/x", "/api")) == "/apiv1/x"
    assert route_path(scope("POST", "/v1/x")) == "/v1/x"


def requests_to_compare() -> list[tuple[str, bytes, dict[str, str]]]:
    image = png(np.array([[1, 1], [2, 0]]))
    as_json = {"content-type": "application/json"}
    form = multipart(image)
    upload = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    v2 = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [2], "data": ["ab", "xyz"]}]}

    def body(payload: Any) -> bytes:
        return json.dumps(payload).encode()

    return [
        (
            "/v1/models/fake-translator/translate",
            body({"text": ["ab", "xyz"], "return_attention": True}),
            as_json,
        ),
        ("/v1/models/fake-classifier/classify", body({"image": base64.b64encode(image).decode()}), as_json),
        ("/v1/models/fake-classifier/classify", form, upload),
        ("/v2/models/fake-translator/infer", body(v2), as_json),
        ("/v2/models/fake-translator/versions/1/infer", body(v2), as_json),
        ("/v2/models/fake-translator/versions/7/infer", body(v2), as_json),  # 404: no such version
        ("/v1/models/nope/translate", body({"text": "x"}), as_json),  # 404
        ("/v1/models/fake-classifier/translate", body({"text": "x"}), as_json),  # 400: wrong task
        ("/v1/models/fake-translator/translate", body({"text": "x", "beam_size": 0}), as_json),  # 422
        ("/v1/models/fake-translator/translate", b"{not json", as_json),  # 422
        ("/v1/models/fake-classifier/classify", b"x", {"content-type": "text/plain"}),  # 422
        ("/v1/models/fake-classifier/classify", b"--XyZ\r\nbroken", upload),  # 422: no file
        (
            "/v1/models/fake-classifier/classify",
            form,
            {"content-type": "multipart/form-data"},
        ),  # 422: no boundary
        ("/v2/models/fake-translator/infer", body({"inputs": []}), as_json),  # 422
        ("/v1/models/fake-translator/translate", b"{}", {"content-length": str(10**9)}),  # 413
    ]


def compared(app: App, hot: bool, headers: dict[str, str] | None = None) -> list[tuple[int, Any, str]]:
    app.hot_routes = app.hot_routes if hot else None
    answers = []
    for path, content, extra in requests_to_compare():
        status, got_headers, body = call(app, "POST", path, content, {**extra, **(headers or {})})
        answer = json.loads(body)
        if "metrics" in answer:
            answer["metrics"].pop("total_ms")  # the only field that differs between two calls
        answers.append((status, answer, got_headers.get("content-type", "")))
    return answers


@pytest.mark.parametrize("token", [None, "a-token-of-32-characters-at-least"])
def test_the_hot_path_answers_as_the_router_does(tmp_path: Path, token: str | None) -> None:
    settings = {"api_token": token} if token else {}
    app = create_app(fake_server(tmp_path, **settings)[0])
    headers = {"authorization": f"Bearer {token}"} if token else {}
    hot, routed = compared(app, True, headers), compared(app, False, headers)
    assert hot == routed
    statuses = [status for status, _, _ in hot]
    assert statuses == [200, 200, 200, 200, 200, 404, 404, 400, 422, 422, 422, 422, 422, 422, 413], hot
    assert all(ctype == "application/json" for _, _, ctype in hot)
    if token:  # without the token: refused on both paths alike
        app = create_app(fake_server(tmp_path, **settings)[0])
        hot, routed = compared(app, True), compared(app, False)
        assert hot == routed and {status for status, _, _ in hot} == {401}


def exchange(app: Any, leave_after_s: float | None) -> tuple[list[int], int]:
    """A translation whose client leaves ``leave_after_s`` after sending it (None: stays) →
    (the statuses sent, the tasks running beside the exchange's own when it is answered)."""
    statuses: list[int] = []
    body = json.dumps({"text": "x"}).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/models/fake-translator/translate", "raw_path": b"",
        "root_path": "", "query_string": b"", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))],
    }  # fmt: skip
    others = 0

    async def main() -> None:
        sent = False
        gone = asyncio.Event()

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal others
            if message["type"] == "http.response.start":
                statuses.append(message["status"])
                others = len(asyncio.all_tasks()) - 2  # main and the app's

        if leave_after_s is not None:
            asyncio.get_running_loop().call_later(leave_after_s, gone.set)
        await asyncio.wait_for(app(scope, receive, send), 10)

    asyncio.run(main())
    return statuses, others


def test_a_client_that_leaves_is_answered_499_once_the_watch_starts(tmp_path: Path) -> None:
    server, translator, _, recorded = fake_server(tmp_path)
    app = create_app(server)
    translator.delay_s = 0.0
    assert exchange(app, None) == ([200], 0)  # answered before the watch began: no task was made
    translator.delay_s = 2.0
    for leave_after_s in (0.0, routes.WATCH_AFTER_S / 2, routes.WATCH_AFTER_S * 3):
        start = time.perf_counter()
        statuses, _ = exchange(app, leave_after_s)
        took = time.perf_counter() - start
        assert statuses == [499], leave_after_s
        assert took < max(leave_after_s, routes.WATCH_AFTER_S) + 0.5, (leave_after_s, took)
    translator.delay_s = routes.WATCH_AFTER_S * 3  # watched, and stays: answered
    assert exchange(app, None)[0] == [200]
    assert [r[2] for r in recorded.records] == [200, 499, 499, 499, 200]


def test_a_client_that_leaves_before_its_body_is_in_is_answered_499(tmp_path: Path) -> None:
    """Not an internal error (no 500, no traceback logged as one): the client is gone — and
    counted so in the request metrics (it was not counted at all)."""
    server, _, _, recorded = fake_server(tmp_path)
    app = create_app(server)
    statuses: list[int] = []
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/models/fake-translator/translate", "raw_path": b"",
        "root_path": "", "query_string": b"", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")],
    }  # fmt: skip
    messages = [
        {"type": "http.request", "body": b'{"text": ', "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    assert statuses == [499] and recorded.records == [("fake-translator", "translate", 499)]


def test_a_stopping_server_answers_503_with_retry_after_and_readiness_says_why(tmp_path: Path) -> None:
    server = fake_server(tmp_path)[0]
    server.stopping = True
    app = create_app(server)
    for path, body in [
        ("/v1/models/fake-translator/translate", {"text": "ab"}),
        ("/v2/models/fake-translator/infer",
         {"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["ab"]}]}),
    ]:  # fmt: skip
        status, headers, content = call(app, "POST", path, json.dumps(body).encode(),
                                        {"content-type": "application/json"})  # fmt: skip
        assert status == 503 and headers["retry-after"] == "1", (path, content)
        assert "stopping" in json.loads(content)["error"]
    for path in ("/readyz", "/v2/health/ready"):
        status, _, content = call(app, "GET", path)
        assert status == 503 and json.loads(content) == {"error": "not ready: the service is stopping"}


class _ProxyDied(Exception):
    pass


def test_a_receive_that_raises_what_the_hosting_calls_client_gone_is_a_disconnect(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Ray's proxy dying under a request reaches the body read as an exception from ``receive``:
    with ``client_gone`` naming it, the request ends as a client gone (499, nothing logged), not
    as a 500 with a traceback per request."""
    server = fake_server(tmp_path)[0]

    async def exchange(app: App) -> int:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            raise _ProxyDied("the actor died unexpectedly")

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        headers = [(b"content-type", b"application/json"), (b"content-length", b"13")]
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/v1/models/fake-translator/translate", "root_path": "",
            "raw_path": b"/v1/models/fake-translator/translate", "query_string": b"", "headers": headers,
            "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
        }  # fmt: skip
        await app(scope, receive, send)
        return int(next(m for m in sent if m["type"] == "http.response.start")["status"])

    assert asyncio.run(exchange(create_app(server, client_gone=(_ProxyDied,)))) == 499
    assert "failed unexpectedly" not in caplog.text
    assert asyncio.run(exchange(create_app(server))) == 500  # without it: what Ray's replicas logged
    assert "failed unexpectedly" in caplog.text


def test_bodies_refused_before_the_endpoint_are_counted_under_their_model_and_route(tmp_path: Path) -> None:
    """A body over the limit (413) or in a coding the service does not take (415) is refused
    while the direct route reads it, before its endpoint runs: counted in the request metrics
    like every other refusal (neither was, so no error panel or ratio saw them)."""
    server, _, _, recorded = fake_server(tmp_path, limits={"max_image_bytes": 1024})
    app = create_app(server)
    json_type = {"content-type": "application/json"}
    too_large = b'{"image": "' + b"A" * (server.max_body + 10) + b'"}'
    assert call(app, "POST", "/v1/models/fake-classifier/classify", too_large, json_type)[0] == 413
    assert call(app, "POST", "/v2/models/fake-classifier/infer", too_large, json_type)[0] == 413
    brotli = {**json_type, "content-encoding": "br"}
    assert call(app, "POST", "/v1/models/fake-translator/translate", b'{"text": "ab"}', brotli)[0] == 415
    assert recorded.records == [
        ("fake-classifier", "classify", 413),
        ("fake-classifier", "v2_infer", 413),
        ("fake-translator", "translate", 415),
    ]


def test_a_drain_waits_for_an_answer_until_it_is_written(tmp_path: Path) -> None:
    """The model's answer is in before its HTTP answer is encoded, compressed and written: the
    drain waited for the first only, so the Ray-ingress stop could cut an answer in flight."""
    server = fake_server(tmp_path)[0]
    app = create_app(server)
    written: list[float] = []

    async def go() -> float:
        loop = asyncio.get_running_loop()
        body = json.dumps({"text": "ab"}).encode()

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                await asyncio.sleep(0.3)  # a slow write (a large answer, a slow link)
            written.append(loop.time())

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": "/v1/models/fake-translator/translate", "root_path": "",
            "raw_path": b"/v1/models/fake-translator/translate", "query_string": b"",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
        }  # fmt: skip
        exchange = asyncio.create_task(app(scope, receive, send))
        await asyncio.sleep(0.1)  # answered by the model, its first write under way
        assert await server.drain(5.0, settle_s=0) == 0
        drained = loop.time()
        await exchange
        return drained

    drained = asyncio.run(go())
    assert written and drained >= written[-1]
