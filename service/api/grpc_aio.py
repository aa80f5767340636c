"""Serving :class:`~service.api.grpc_servicer.GrpcServicer` with grpc.aio (the in-replica
frontend, ``service/hosting/in_replica.py``): its two services with grpc.aio's error path, request
parsing that never ends a stream, and beside them the standard health service and server
reflection. Ray's gRPC proxy (the Ray-ingress frontends) calls the servicer's methods itself and
uses none of this.
"""

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from pydantic import SecretStr

from service.api import auth
from service.api.grpc_parsing import DEFAULT_VALUE_BYTES, Lenient, Undecodable
from service.api.grpc_servicer import GrpcServicer
from service.api.protos import attention_pb2_grpc, grpc_service_pb2_grpc
from service.errors import ServiceError, unexpected
from service.settings.limits import Limits

log = logging.getLogger("ray.serve")


def add_to_grpc_server(
    grpc_server: grpc.aio.Server,
    servicer: GrpcServicer,
    max_value_bytes: int = DEFAULT_VALUE_BYTES,
    write_timeout_s: float = Limits().stream_write_timeout_s,
) -> list[str]:
    """Serve both services of ``servicer`` on a grpc.aio server; their full names. The RPCs set
    the error's code on their context and raise it; grpc.aio needs ``abort`` to send it. A request
    protobuf cannot parse (a string field that is not UTF-8, a corrupt message) reaches the RPC as
    :class:`Undecodable` and is answered INVALID_ARGUMENT — grpc's own parser answered UNKNOWN,
    and in ``ModelStreamInfer`` ended the whole stream; one it would parse value by value beyond
    ``max_value_bytes`` (``limits.max_grpc_value_bytes``) is refused unparsed, as large (``grpc_parsing``).
    A streamed response waits at most ``write_timeout_s`` (``limits.stream_write_timeout_s``) to be
    written (:func:`_aio_streaming`)."""
    kserve_v2, attention_v1 = grpc_service_pb2_grpc, attention_pb2_grpc
    services = []
    for base, add in (
        (kserve_v2.GRPCInferenceServiceServicer, kserve_v2.add_GRPCInferenceServiceServicer_to_server),
        (attention_v1.AttentionServiceServicer, attention_v1.add_AttentionServiceServicer_to_server),
    ):
        overrides = {}
        for name, _ in inspect.getmembers(base, inspect.isfunction):
            if name in servicer.METHODS:
                impl = getattr(servicer, name)
                overrides[name] = (
                    _aio_streaming(impl, write_timeout_s)
                    if inspect.isasyncgenfunction(impl)
                    else _aio_unary(impl)
                )
        lenient = Lenient(grpc_server, max_value_bytes=max_value_bytes)
        add(type(base.__name__, (base,), overrides)(), lenient)
        if not lenient.services:  # stubs from grpcio-tools < 1.62 register generic handlers only
            raise RuntimeError(f"{add.__name__} registered no methods: regenerate the stubs (make protos)")
        services += lenient.services
    return services


def add_reflection(grpc_server: grpc.aio.Server, services: list[str]) -> None:
    """gRPC server reflection (``grpc.reflection.v1alpha``, grpcio-reflection's) for ``services``,
    the health service and itself: grpcurl, grpcui, Postman and ghz list and call the services
    without their ``.proto`` files. Behind the token when one is set (:func:`interceptors`), as
    every RPC but health."""
    names = [*services, health.SERVICE_NAME, reflection.SERVICE_NAME]
    servicer = reflection.aio.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, grpc_server)


def interceptors(
    token: SecretStr | None, max_calls: int, refused: Callable[[], None] | None = None
) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors of a grpc.aio server: with a token, :class:`TokenFirst`; then
    :class:`CallLimit` (a call refused for want of the token is never counted), which calls
    ``refused()`` for each call it refuses."""
    return [*([TokenFirst(token)] if token is not None else []), CallLimit(max_calls, refused)]


#: RPCs answered without a token: the KServe v2 health RPCs and ``grpc.health.v1``
OPEN_RPCS = frozenset(f"/inference.GRPCInferenceService/{m}" for m in auth.OPEN_METHODS)
OPEN_SERVICES = (f"/{health.SERVICE_NAME}/",)
#: the health service's stream: open to anyone, so counted apart from the other calls
HEALTH_WATCH = f"/{health.SERVICE_NAME}/Watch"


class TokenFirst(grpc.aio.ServerInterceptor):
    """The bearer token checked from the call's metadata before its request is read: an RPC
    without it is answered UNAUTHENTICATED by a handler that reads nothing. The servicer's own
    check comes after the request is received and parsed — 12 calls of 60 MiB each, with no
    token, took a replica from 0.7 to 1.5 GB (and stayed there), and a request that did not
    parse was answered INVALID_ARGUMENT instead of UNAUTHENTICATED. The servicer keeps its check
    for Ray's gRPC proxy (the Ray-ingress frontends), which calls it without this server."""

    def __init__(self, token: SecretStr) -> None:
        self.token = token

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: grpc.HandlerCallDetails
    ) -> Any:
        method = details.method
        if method in OPEN_RPCS or method.startswith(OPEN_SERVICES):
            return await continuation(details)
        try:
            auth.check_metadata(self.token, details.invocation_metadata)
        except ServiceError as exc:
            return grpc.stream_stream_rpc_method_handler(_refusal(exc))  # reads no request
        return await continuation(details)


class _Pool:
    """Calls in progress of one kind, at most ``limit``."""

    def __init__(self, limit: int, what: str, refused: Callable[[], None] | None) -> None:
        self.limit, self.what, self.refused, self.held = limit, what, refused, 0

    @property
    def full(self) -> bool:
        return self.held >= self.limit

    async def take(self, context: grpc.aio.ServicerContext) -> None:
        """A place for the calling RPC, or it ends RESOURCE_EXHAUSTED (a call let in while there
        was room, whose request grpc read meanwhile; one that finds the pool full is refused by
        :meth:`refuse` before its request is read)."""
        if self.full:
            await self.refuse(None, context)
        self.held += 1

    async def refuse(self, _: Any, context: grpc.aio.ServicerContext) -> None:
        if self.refused is not None:
            self.refused()
        message = f"{self.what}: this replica holds its limit of {self.limit} in progress; retry"
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


class CallLimit(grpc.aio.ServerInterceptor):
    """At most ``limit`` calls in progress, an open stream counting as one for its whole life
    (``ATTN_LIMITS__MAX_GRPC_CALLS``); one more ends RESOURCE_EXHAUSTED at once. Health's
    ``Watch`` streams, which need no token, have a pool of their own of the same size: a client
    without the token cannot take the places of those who have it. The open unary RPCs (health
    ``Check``, KServe's ``ServerLive`` …), answered at once, are not counted: a probe is answered
    whatever the load. After :class:`TokenFirst`: a call refused for want of the token is not
    counted either. Handlers that are not coroutines or async generators (none here) are not
    counted. ``refused()`` is told of each refusal (the request metrics count it)."""

    def __init__(self, limit: int, refused: Callable[[], None] | None = None) -> None:
        self.calls = _Pool(limit, "gRPC calls", refused)
        self.watches = _Pool(limit, "gRPC health watches", refused)

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(details)
        method = details.method
        open_unary = method in OPEN_RPCS or (method.startswith(OPEN_SERVICES) and method != HEALTH_WATCH)
        if handler is None or open_unary:
            return handler  # no such method (UNIMPLEMENTED), or an open unary RPC
        pool = self.watches if method == HEALTH_WATCH else self.calls
        if pool.full:  # refused by a handler that reads nothing: grpc reads and parses a unary
            return grpc.stream_stream_rpc_method_handler(pool.refuse)  # request before its handler
        return _counted(handler, pool)


def _counted(handler: Any, pool: _Pool) -> Any:
    """``handler`` (grpc's RpcMethodHandler) whose behaviour holds a place in ``pool`` while it runs."""
    kind = ("stream_" if handler.request_streaming else "unary_") + (
        "stream" if handler.response_streaming else "unary"
    )
    behaviour = getattr(handler, kind)
    if inspect.isasyncgenfunction(behaviour):

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await pool.take(context)
            try:
                async with contextlib.aclosing(behaviour(request, context)) as replies:
                    async for reply in replies:
                        yield reply
            finally:
                pool.held -= 1

        return handler._replace(**{kind: streaming})
    if inspect.iscoroutinefunction(behaviour):

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await pool.take(context)
            try:
                return await behaviour(request, context)
            finally:
                pool.held -= 1

        return handler._replace(**{kind: call})
    return handler


def _refusal(error: ServiceError) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]:
    async def refuse(_: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(getattr(grpc.StatusCode, error.grpc_code), error.message)

    return refuse


class GrpcHealth:
    """The standard gRPC health service, ``grpc.health.v1.Health`` (grpcio-health-checking's),
    on a grpc.aio server: what Kubernetes' ``grpc`` probes, grpc-health-probe, Envoy's and most
    gRPC load balancers' health checks call. ``Check`` / ``Watch`` for the server (``""``) and for
    each of ``services``; another name is NOT_FOUND. Answered without a token, as ServerLive.
    The hosting layer says when the server serves (:meth:`serving`) and when it stops
    (:meth:`stopping`: NOT_SERVING for good, sent to every ``Watch`` before the drain)."""

    def __init__(self, grpc_server: grpc.aio.Server, services: list[str]) -> None:
        self.servicer = health.aio.HealthServicer()
        self.names = ["", *services]
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, Lenient(grpc_server, _refusing))

    async def serving(self) -> None:
        for name in self.names:
            await self.servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stopping(self) -> None:
        await self.servicer.enter_graceful_shutdown()


def _refusing(handler: Any) -> Any:
    """``handler`` (grpc's RpcMethodHandler) answering INVALID_ARGUMENT for an
    :class:`Undecodable` request before its servicer sees it: for servicers that are not ours (the
    health service), which would fail on it with UNKNOWN. A coroutine (``Check``; ``Watch``,
    which writes through its context), an async generator, or a plain function (the health
    service's ``List``, then called on the event loop); a sync generator is left as it is."""
    kind = ("stream_" if handler.request_streaming else "unary_") + (
        "stream" if handler.response_streaming else "unary"
    )
    behaviour = getattr(handler, kind)
    if inspect.isasyncgenfunction(behaviour):

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error.message)
            async with contextlib.aclosing(behaviour(request, context)) as replies:
                async for reply in replies:
                    yield reply

        return handler._replace(**{kind: streaming})
    if inspect.isgeneratorfunction(behaviour):
        return handler
    waits = inspect.iscoroutinefunction(behaviour)

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error.message)
        return await behaviour(request, context) if waits else behaviour(request, context)

    return handler._replace(**{kind: call})


def _aio_unary(impl: Callable[..., Any]) -> Callable[..., Any]:
    async def call(_: object, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, Undecodable):
                raise request.error
            return await impl(request, context)
        except ServiceError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.grpc_code), exc.message)

    return call


def _aio_streaming(
    impl: Callable[..., AsyncGenerator[Any, None]], write_timeout_s: float
) -> Callable[..., Awaitable[None]]:
    """A streaming RPC that writes each response itself, each write within ``write_timeout_s``
    (``limits.stream_write_timeout_s``, as REST's streams): a client that keeps its connection
    open but stops reading fills its HTTP/2 window, and a yielded response then waited for good —
    holding the request (its rows decoding, its place among the calls) and the replica's drain.
    Past the timeout the stream is cut (its request recorded as a client that left, 499)."""

    async def call(_: object, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
        try:
            if isinstance(requests, Undecodable):  # the one request of a server-streaming RPC
                raise requests.error
            # closed with us, and when the client stops reading (the request ends as one that left)
            async with contextlib.aclosing(impl(requests, context)) as responses:
                async for response in responses:
                    try:
                        async with asyncio.timeout(write_timeout_s):
                            await context.write(response)
                    except TimeoutError:
                        break
                else:
                    return
        except ServiceError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.grpc_code), exc.message)
        except Exception as exc:
            error = unexpected(exc, f"gRPC {impl.__name__}")
            await context.abort(grpc.StatusCode.INTERNAL, error.message)
        else:  # broke off
            log.warning(
                "gRPC %s: the client stopped reading for %s s; stream cut", impl.__name__, write_timeout_s
            )
            await context.abort(grpc.StatusCode.CANCELLED, "the client stopped reading")

    return call
