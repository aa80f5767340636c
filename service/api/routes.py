"""What every HTTP route module shares: the server dependency, the error body, and the lean route
class of the inference hot path with its dispatcher. Route modules (``rest.py``,
``kserve_routes.py``, ``explorer.py``) each build an :class:`~fastapi.APIRouter`; ``create_app``
includes them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute
from starlette.types import Scope

from service.api import content_coding
from service.api.server import CLIENT_CLOSED, Server


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def server_from(request: Request) -> Server:
    """The server of the app serving ``request`` (``create_app`` puts it on ``app.state``)."""
    server: Server = request.app.state.server
    return server


async def server_of(request: Request) -> Server:
    """The dependency; async on purpose: FastAPI runs a sync one in a thread pool (a thread hop)."""
    return server_from(request)


ServerDep = Annotated[Server, Depends(server_of)]
Endpoint = Callable[..., Awaitable[Response]]
Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class DirectRoute(APIRoute):
    """A route documented like any other whose endpoint is called with the raw request and its
    path parameters and returns a ready :class:`Response`.

    For the inference routes, the hot path: FastAPI's per-request machinery (dependency solving,
    body parsing, response-model validation and encoding) cost more CPU than a small model's
    inference (``benchmarks/results/``). The endpoint parses its body with the same pydantic
    schemas and raises the same :mod:`service.errors` types, so answers are unchanged. A long
    answer is compressed when its client accepts that (:mod:`service.api.content_coding`)."""

    def get_route_handler(self) -> Handler:
        endpoint: Endpoint = self.endpoint
        label = self.name  # the endpoint's name, its route label in the request metrics

        async def handler(request: Request) -> Response:
            server = server_from(request)
            try:  # bounded, and kept on the request for the endpoint
                with server.refusals(request.path_params.get("name", ""), label, request.scope):
                    await server.read_body(request)
            except ClientDisconnect:  # gone before its body was in: nobody to answer, nothing failed
                return Response(status_code=CLIENT_CLOSED)
            this = asyncio.current_task()
            watch = _DisconnectWatch(request, this)
            try:
                response = await endpoint(request, **request.path_params)
            except asyncio.CancelledError:
                if not watch.cancelled_it or this is None:
                    raise  # cancelled by someone else: not ours to swallow
                this.uncancel()
                return Response(status_code=CLIENT_CLOSED)  # nobody is listening any more
            finally:
                watch.stop()
            body = getattr(response, "body", None)  # a streamed answer has none: it goes as it is
            least = server.settings.compress_min_bytes
            if body is not None and least and len(body) >= least:
                await content_coding.compress(response, request.headers.get("accept-encoding", ""))
            return response

        return handler


#: a request still unanswered after this long starts watching for its client's disconnect
WATCH_AFTER_S = 0.1


class _DisconnectWatch:
    """Cancels ``task`` when the client goes away: its requests leave their batch (or queue)
    instead of holding a place for an answer nobody reads. The body is already read, so the
    next message on the connection can only be ``http.disconnect``.

    The watch starts :data:`WATCH_AFTER_S` after the request: a task per request, started and
    cancelled around every answer, was ≈ 10 % of the event loop's CPU per request on a small
    image model, and most answers come sooner. A client that left before then is found at once
    when the watch starts (its ``http.disconnect`` is waiting), so at most that much of its work
    is done for nobody."""

    def __init__(self, request: Request, task: asyncio.Task[Any] | None) -> None:
        self.request, self.task = request, task
        self.cancelled_it = False
        self._watcher: asyncio.Task[None] | None = None
        self._timer = asyncio.get_running_loop().call_later(WATCH_AFTER_S, self._start)

    def _start(self) -> None:
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        message = await self.request.receive()
        if message["type"] == "http.disconnect" and self.task is not None:
            self.cancelled_it = True
            self.task.cancel()

    def stop(self) -> None:
        self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()


class HotRoutes:
    """The :class:`DirectRoute` endpoints of an app, matched by splitting the path at ``/``
    instead of walking the router's regular expressions; ``create_app``'s app sends a match
    straight to the route's handler, past FastAPI's and Starlette's per-request layers (their
    exception wrappers, exit stacks, telemetry and body-limit middlewares): on a small model
    those cost more CPU than the inference (``benchmarks/results/``). Anything else — another
    method, a trailing slash, an empty segment — goes the ordinary way, so answers are the same."""

    def __init__(self, routes: list[BaseRoute]) -> None:
        #: per route: its segments (None where a parameter goes), the parameters' (position,
        #: name), its handler
        self.table: list[tuple[tuple[str | None, ...], tuple[tuple[int, str], ...], Handler]] = []
        for route in routes:
            if isinstance(route, DirectRoute):
                assert route.methods == {"POST"} and ":" not in route.path, route.path
                segments = route.path.split("/")
                fixed = tuple(None if s.startswith("{") else s for s in segments)
                params = tuple((i, s[1:-1]) for i, s in enumerate(segments) if s.startswith("{"))
                self.table.append((fixed, params, route.get_route_handler()))
        self._matched: dict[tuple[str, str], tuple[Handler, dict[str, str]] | None] = {}

    def match(self, scope: Scope) -> tuple[Handler, dict[str, str]] | None:
        """The handler of a POST to a direct route and its path parameters (a fresh dict: the
        caller's to keep), or None. Remembers up to :data:`MATCHES_KEPT` paths with their answer
        (all forgotten when full): clients send the same few paths again and again, and
        matching was ≈ 5 % of the event loop's time per request on the image path."""
        if scope["method"] != "POST":
            return None
        key = (scope["path"], scope.get("root_path", ""))
        hit = self._matched.get(key, _UNSEEN)
        if hit is _UNSEEN:
            hit = self._match(route_path(scope))
            if len(key[0]) <= KEPT_PATH_CHARS:  # a client chooses paths (up to ≈ 64 KiB each)
                if len(self._matched) >= MATCHES_KEPT:
                    self._matched.clear()  # and sends new ones: what is kept stays bounded
                self._matched[key] = hit
        if hit is None:
            return None
        handler, params = hit
        return handler, dict(params)

    def _match(self, path: str) -> tuple[Handler, dict[str, str]] | None:
        parts = path.split("/")
        for fixed, params, handler in self.table:
            if len(fixed) == len(parts) and all(
                p == f if f is not None else p for f, p in zip(fixed, parts, strict=True)
            ):
                return handler, {name: parts[i] for i, name in params}
        return None


#: paths ``HotRoutes.match`` remembers (cleared when full), each at most ``KEPT_PATH_CHARS`` long:
#: 1,024 paths of the 64 KiB uvicorn takes would be 64 MiB a client could fill
MATCHES_KEPT = 1024
KEPT_PATH_CHARS = 512
_UNSEEN: Any = object()


def route_path(scope: Scope) -> str:
    """The path the routes see: ``path`` without the ``root_path`` an ingress mounted it under
    (Starlette's rule)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] == "/":
        return path[len(root) :]
    return path


def direct_post(router: APIRouter, *paths: str, **options: Any) -> Callable[[Endpoint], Endpoint]:
    """``@router.post`` for a :class:`DirectRoute` endpoint ``(request, **path_params)``."""

    def register(endpoint: Endpoint) -> Endpoint:
        for path in paths:
            router.add_api_route(
                path, endpoint, methods=["POST"], route_class_override=DirectRoute, **options
            )
        return endpoint

    return register
