"""The HTTP application: ``create_app(server)`` builds it from the protocol routers (REST, KServe v2,
the explorer page) over one :class:`~service.api.server.Server`.

Every error leaves as ``{"error": "..."}`` — the v2 protocol's shape, and tritonclient's
expectation — with the status from the table in ``service/errors.py``; what nobody expected
leaves as a JSON 500 naming a request id (:class:`InternalErrors`). The hosting layer builds one
app per serving process, so nothing here is a module global.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import SecretStr
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api import auth, content_coding, cross_origin, explorer, kserve_routes, limits, rest
from service.api.routes import HotRoutes, error_response
from service.api.schemas import ErrorBody
from service.api.server import Server
from service.errors import (
    BodyTooLarge,
    CrossOrigin,
    ServiceError,
    Unauthorized,
    UnsupportedEncoding,
    unexpected,
    validation_message,
)


def create_app(server: Server, client_gone: tuple[type[BaseException], ...] = ()) -> App:
    """The FastAPI app serving ``server`` over REST and KServe v2, with the explorer at ``/``.
    ``client_gone``: what the hosting's ``receive`` raises once the client can no longer be
    answered (Ray's proxy died under the request), read as ``http.disconnect``."""
    app = App(
        title="attention-serve",
        description='Attention models with their attention maps. Errors are `{"error": "..."}`.',
        version="0.1.0",
        responses={code: {"model": ErrorBody} for code in (400, 404, 413, 422, 500, 503, 504)},
    )
    app.state.server = server
    app.client_gone = client_gone
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(ServiceError, _service_error)  # type: ignore[arg-type]
    app.add_middleware(BearerToken, token=server.settings.api_token)
    app.add_middleware(InternalErrors)  # the outermost of ours: it also covers BearerToken
    routers = (rest.router, kserve_routes.router, explorer.router)
    for router in routers:
        app.include_router(router)  # without a prefix: the paths below are the routers' own
    explorer.mount_static(app)
    app.hot_routes = HotRoutes([route for router in routers for route in router.routes])
    app.hot_path = HotPath(server.settings.api_token)
    app.trusted_origins = frozenset(o.encode() for o in server.settings.trusted_origins)
    return app


class App(FastAPI):
    """FastAPI with the inference routes' hot path, whose OpenAPI document shows the limits this
    service enforces (its server's ``Settings.limits``) in place of the schemas' ceilings,
    wherever a request schema appears (components and inline bodies).

    The hot path: a POST to a :class:`~service.api.routes.DirectRoute` (``HotRoutes``) goes
    through :class:`HotPath` (what our two middlewares and the exception handlers below do, in
    one step) straight to the route's handler — the rest of FastAPI's and Starlette's per-request
    layers are skipped. Everything else is FastAPI as usual. A HEAD request is
    answered as its GET (health checks, balancers probing with HEAD), the body left out; the
    router's slash redirects carry a relative ``Location``."""

    hot_routes: HotRoutes | None = None
    trusted_origins: frozenset[bytes] = frozenset()
    hot_path: ASGIApp | None = None
    client_gone: tuple[type[BaseException], ...] = ()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan
            await super().__call__(scope, receive, send)
            return
        try:
            cross_origin.check(scope, self.trusted_origins)
        except CrossOrigin as exc:  # before the request counts: it is not one
            await error_response(exc.http_status, exc.message)(scope, receive, send)
            return
        if scope["method"] == "HEAD":  # a GET's answer without its body: the HTTP server (uvicorn,
            # ours or Ray's proxy's) writes the head alone for a HEAD request (RFC 9110 §9.3.2)
            scope = {**scope, "method": "GET"}
        if self.client_gone:
            receive = _disconnect_on(receive, self.client_gone)
        server: Server = self.state.server
        # in flight until its answer is sent (encoded, compressed, written): Server.drain waits
        # for that, not only for the model's answer
        server.in_flight += 1
        try:
            if self.hot_routes is not None and self.hot_path is not None:
                hit = self.hot_routes.match(scope)
                if hit is not None:
                    scope["app"], scope["route_handler"], scope["path_params"] = self, hit[0], hit[1]
                    await self.hot_path(scope, receive, send)
                    return
            await super().__call__(scope, receive, _relative_redirect(send))
        finally:
            server.in_flight -= 1

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            limits.write_openapi(super().openapi(), self.state.server.settings.limits)
        return self.openapi_schema or {}


def _relative_redirect(send: Send) -> Send:
    """``send``, with the ``Location`` of a redirect made relative (its path and query): the
    router redirects a path with a trailing slash to the route without it, and one without to a
    mount with it (``/static`` → ``/static/``), writing the URL from the request's ``Host``
    header, which a client sets to what it likes."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start" and 300 <= message["status"] < 400:
            headers = [
                (name, _path_and_query(value) if name == b"location" else value)
                for name, value in message.get("headers", [])
            ]
            message = {**message, "headers": headers}
        await send(message)

    return sending


def _path_and_query(url: bytes) -> bytes:
    parts = urlsplit(url)
    return parts.path + (b"?" + parts.query if parts.query else b"")


def _disconnect_on(receive: Receive, gone: tuple[type[BaseException], ...]) -> Receive:
    """``receive``, answering ``http.disconnect`` where it would raise one of ``gone``: a request
    whose client is gone is not a server error (no 500, no traceback in the log)."""

    async def receiving() -> Message:
        try:
            return await receive()
        except gone:
            return {"type": "http.disconnect"}

    return receiving


class HotPath:
    """A direct route's request, in one step: refused without the bearer token (as
    :class:`BearerToken`), the route's handler, the exception handlers ``create_app`` registers
    for what a handler raises (the service's errors, Starlette's HTTPException), and anything
    else a JSON 500 naming a request id (as :class:`InternalErrors`); then the answer. Two
    middlewares around it wrapped every message the answer sends in one more call: ≈ 3 % of the
    event loop's time per request on the image path."""

    def __init__(self, token: SecretStr | None) -> None:
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        try:
            if self.token is not None and not auth.is_open(scope["path"]):
                auth.check(self.token, auth.header(scope, b"authorization"))
            response = await scope["route_handler"](request)
        except Unauthorized as exc:
            response = error_response(exc.http_status, exc.message, {"WWW-Authenticate": "Bearer"})
        except ServiceError as exc:
            response = await _service_error(request, exc)
        except StarletteHTTPException as exc:
            response = await _http_error(request, exc)
        except Exception as exc:
            error = unexpected(exc, f"{scope.get('method')} {scope.get('path')}")
            response = error_response(500, error.message, {"X-Request-Id": error.request_id})
        # a failure while the answer goes out is uvicorn's: it closes the connection (an answer
        # is begun), as InternalErrors leaves it
        await response(scope, receive, send)


async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, validation_message(exc))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """The router's own refusals (no such route, method not allowed) in the same error shape."""
    message = f"{str(exc.detail).lower()}: {request.method} {request.url.path}"
    return error_response(exc.status_code, message, dict(exc.headers) if exc.headers else None)


async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else None
    if isinstance(exc, BodyTooLarge):  # the rest of the body is not read: the connection ends here
        headers = {"Connection": "close"}
    if isinstance(exc, UnsupportedEncoding):  # the codings it takes (RFC 9110 §15.5.16)
        headers = {"Accept-Encoding": content_coding.CODINGS}
    return error_response(exc.http_status, exc.message, headers)


class BearerToken:
    """Refuse a request without the configured bearer token before any route runs (pure ASGI:
    no per-request cost beyond one comparison; nothing when no token is set)."""

    def __init__(self, app: ASGIApp, token: SecretStr | None) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token is not None and scope["type"] == "http" and not auth.is_open(scope["path"]):
            try:
                auth.check(self.token, auth.header(scope, b"authorization"))
            except Unauthorized as exc:
                answer = error_response(exc.http_status, exc.message, {"WWW-Authenticate": "Bearer"})
                await answer(scope, receive, send)
                return
        await self.app(scope, receive, send)


class InternalErrors:
    """Whatever no handler expected leaves as a JSON 500 naming a request id, never Starlette's
    plain-text page; the log line with the traceback carries the same id (``errors.unexpected``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            error = unexpected(exc, f"{scope.get('method')} {scope.get('path')}")
            if started:  # half an answer is out: the server closes the connection
                raise
            answer = error_response(500, error.message, {"X-Request-Id": error.request_id})
            await answer(scope, receive, send)
