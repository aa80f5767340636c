"""What every HTTP route module shares: the server dependency, the error body, and the lean route
class of the inference hot path. Route modules (``rest.py``, ``kserve_routes.py``,
``explorer.py``) each build an :class:`~fastapi.APIRouter`; ``create_app`` includes them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

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
            await server_from(request).read_body(request)  # bounded, and kept on the request for the endpoint
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


def direct_post(router: APIRouter, *paths: str, **options: Any) -> Callable[[Endpoint], Endpoint]:
    """``@router.post`` for a :class:`DirectRoute` endpoint ``(request, **path_params)``."""

    def register(endpoint: Endpoint) -> Endpoint:
        for path in paths:
            router.add_api_route(
                path, endpoint, methods=["POST"], route_class_override=DirectRoute, **options
            )
        return endpoint

    return register
