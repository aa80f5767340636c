"""The FastAPI application object, its router dependency and the error handlers every route shares.

Routes are attached by ``service/rest_routes.py`` (REST) and ``service/kserve_routes.py`` (KServe
v2); every error leaves as ``{"error": "..."}`` — the v2 protocol's shape, and tritonclient's
expectation — with the status from the table in ``service/errors.py``. The app is served by
whichever frontend the settings choose; the process's :class:`ModelRouter` registers itself with
:func:`attach` and routes receive it through the ``Router`` dependency.
"""

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import auth
from service.errors import (
    BodyTooLarge,
    NotReady,
    Overloaded,
    ServiceError,
    Unauthorized,
    unexpected,
    validation_message,
)
from service.routing import CLIENT_CLOSED, ModelRouter
from service.schemas import ErrorBody
from service.settings import Limits


class App(FastAPI):
    """FastAPI whose OpenAPI document shows the limits this service enforces (the router's
    ``Settings.limits``) in place of the schemas' ceilings, wherever a request schema appears
    (components and inline bodies). A method, not an attribute set on ``app``: the app a
    replica serves may be a pickled copy of this module's (see :func:`attach`)."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is not None:
            return self.openapi_schema
        document = super().openapi()
        if _router is None:  # not serving yet: the ceilings, and not kept
            self.openapi_schema = None
        else:
            _write_limits(document, _router.settings.limits)
        return document


app = App(
    title="attention-serve",
    description='Attention models with their attention maps. Errors are `{"error": "..."}`.',
    version="0.1.0",
    responses={code: {"model": ErrorBody} for code in (400, 404, 413, 422, 500, 503, 504)},
)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@app.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, validation_message(exc))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """The router's own refusals (no such route, method not allowed) in the same error shape."""
    message = f"{str(exc.detail).lower()}: {request.method} {request.url.path}"
    return error_response(exc.status_code, message, dict(exc.headers) if exc.headers else None)


@app.exception_handler(ServiceError)
async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, Overloaded) else None
    if isinstance(exc, BodyTooLarge):  # the rest of the body is not read: the connection ends here
        headers = {"Connection": "close"}
    return error_response(exc.http_status, exc.message, headers)


class BearerToken:
    """Refuse a request without the configured bearer token before any route runs (pure ASGI:
    no per-request cost beyond one comparison; nothing when no token is set)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        router = _router
        if scope["type"] == "http" and router is not None and not auth.is_open(scope["path"]):
            try:
                auth.check(router.settings.api_token, auth.header(scope, b"authorization"))
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


app.add_middleware(BearerToken)
app.add_middleware(InternalErrors)  # the outermost of ours: it also covers BearerToken


_router: ModelRouter | None = None


def attach(router: ModelRouter) -> None:
    """Make ``router`` the one this process's routes use (one router per serving process).

    A module global rather than ``app.state``: Ray pickles a deployment class's globals by value,
    so the app object a replica serves may be a copy of this module's ``app``."""
    global _router
    _router = router


def _write_limits(node: Any, limits: Limits) -> None:
    if isinstance(node, list):
        for item in node:
            _write_limits(item, limits)
        return
    if not isinstance(node, dict):
        return
    props = node.get("properties")
    if isinstance(props, dict):
        if "text" in props and "beam_size" in props:  # TranslateRequest
            text = props["text"]
            text["description"] = (
                f"One text or a list of texts (each at most {limits.max_text_chars} characters; "
                f"at most {limits.max_texts} texts)."
            )
            for variant in text.get("anyOf", []):
                if variant.get("type") == "string":
                    variant["maxLength"] = limits.max_text_chars
                elif variant.get("type") == "array":
                    variant["maxItems"] = limits.max_texts
                    variant.setdefault("items", {})["maxLength"] = limits.max_text_chars
            props["beam_size"]["maximum"] = limits.max_beam_size
        if "top_k" in props:  # ClassifyOptions / ClassifyRequest
            props["top_k"]["maximum"] = limits.max_top_k
        if "image" in props and "pixels" in props:  # base64 of the largest image accepted
            for variant in props["image"].get("anyOf", [props["image"]]):
                if variant.get("type") == "string":
                    variant["maxLength"] = -(-limits.max_image_bytes // 3) * 4
    for value in node.values():
        _write_limits(value, limits)


async def current_router() -> ModelRouter:
    """Async on purpose: FastAPI runs a sync dependency in a thread pool, a thread hop per request."""
    if _router is None:
        raise NotReady("not ready: the models are still loading")
    return _router


Router = Annotated[ModelRouter, Depends(current_router)]


Endpoint = Callable[..., Awaitable[Response]]


class DirectRoute(APIRoute):
    """A route documented like any other whose endpoint is called with the raw request and its
    path parameters and returns a ready :class:`Response`.

    For the inference routes, the hot path: FastAPI's per-request machinery (dependency solving,
    body parsing, response-model validation and encoding) cost more CPU than a small model's
    inference (``benchmarks/results/``). The endpoint parses its body with the same pydantic
    schemas and raises the same :mod:`service.errors` types, so answers are unchanged."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint: Endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            router = await current_router()
            await router.read_body(request)  # bounded, and kept on the request for the endpoint
            this = asyncio.current_task()
            watcher = asyncio.create_task(_cancel_on_disconnect(request, this))
            try:
                return await endpoint(request, **request.path_params)
            except asyncio.CancelledError:
                if not (watcher.done() and watcher.result()) or this is None:
                    raise  # cancelled by someone else: not ours to swallow
                this.uncancel()
                return Response(status_code=CLIENT_CLOSED)  # nobody is listening any more
            finally:
                watcher.cancel()

        return handler


async def _cancel_on_disconnect(request: Request, task: asyncio.Task[Any] | None) -> bool:
    """Cancel ``task`` when the client goes away: its requests leave their batch (or queue)
    instead of holding a place for an answer nobody reads. The body is already read, so the
    next message on the connection can only be ``http.disconnect``."""
    message = await request.receive()
    if message["type"] == "http.disconnect" and task is not None:
        task.cancel()
        return True
    return False


def direct_post(*paths: str, **options: Any) -> Callable[[Endpoint], Endpoint]:
    """``@app.post`` for a :class:`DirectRoute` endpoint ``(request, **path_params)``."""

    def register(endpoint: Endpoint) -> Endpoint:
        for path in paths:
            app.router.add_api_route(
                path, endpoint, methods=["POST"], route_class_override=DirectRoute, **options
            )
        return endpoint

    return register
