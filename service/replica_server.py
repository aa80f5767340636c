"""The ``in-replica`` frontend: each serving replica holds every model and answers HTTP and gRPC
itself, on the configured host and ports.

Why: on small and medium attention models Ray Serve's default path (proxy actor → ingress
replica → model replica) costs several times the model's own CPU per request
(``benchmarks/results/``). Here a request crosses no process boundary: the replica's own
uvicorn (the same FastAPI app as every frontend) and gRPC server call the model workers in
process, each model batching in its own queue (``service/batcher.py``). Ray Serve still places,
health-checks, restarts and scales the replicas.

One stable port for many replicas: every replica binds ``host:http_port`` (and ``grpc_port``)
with ``SO_REUSEPORT``, so the replicas on a node share the port and the kernel spreads new
connections over them; a replacement replica joins the port the moment it is ready, and one
that stops leaves it. Across nodes, each node's replicas listen on that node's address (put a
load balancer in front, as with Ray's per-node proxies). Shed requests (a model's queue full)
are answered here and counted in ``attention_requests_total`` like every other answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import socket
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import ray
import uvicorn
from ray import serve
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import explorer, kserve_routes, rest_routes  # noqa: F401  (they register the routes on the app)
from service.errors import ServiceError, unexpected
from service.grpc_ingress import GRPCMethods
from service.http_app import app, attach
from service.manifest import list_versions
from service.model_worker import ModelWorker
from service.protos import attention_pb2_grpc, grpc_service_pb2_grpc
from service.repository import ModelEntry, load_entry
from service.settings import Settings

log = logging.getLogger("ray.serve")


class ConnectionRecycler:
    """Close a keep-alive connection after ``limit`` requests (``Connection: close``), as nginx's
    ``keepalive_requests`` does: replicas share the port per *connection*, so without this a
    replica that restarts or joins would get no share of long-lived client connections."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit
        self.served: OrderedDict[Any, int] = OrderedDict()  # client address → requests so far

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.limit:
            return await self.app(scope, receive, send)
        client = scope.get("client")
        count = self.served.pop(client, 0) + 1
        last = count >= self.limit
        if not last:
            self.served[client] = count
            while len(self.served) > 65536:  # addresses of connections that went away
                self.served.popitem(last=False)

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_closing if last else send)


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the replica's process belongs to Ray."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def shared_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket other replicas on this node may bind too (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _unary(impl: Callable[..., Any]) -> Callable[..., Any]:
    takes_context = len(inspect.signature(impl).parameters) == 2

    async def call(_: object, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await (impl(request, context) if takes_context else impl(request))
        except ServiceError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.grpc_code), exc.message)
        except Exception as exc:  # what the methods' own mapping did not expect
            error = unexpected(exc, f"gRPC {impl.__name__}")
            await context.abort(grpc.StatusCode.INTERNAL, error.message)

    return call


def _streaming(impl: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def call(_: object, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        try:
            async for response in impl(requests, context):
                yield response
        except ServiceError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.grpc_code), exc.message)
        except Exception as exc:
            error = unexpected(exc, f"gRPC {impl.__name__}")
            await context.abort(grpc.StatusCode.INTERNAL, error.message)

    return call


def servicer(base: type, methods: GRPCMethods) -> object:
    """An instance of the generated servicer ``base`` whose RPCs call ``methods``' methods of the
    same name (the ones we do not implement keep the base's UNIMPLEMENTED answer)."""
    overrides = {}
    for name, _ in inspect.getmembers(base, inspect.isfunction):
        impl = getattr(methods, name, None)
        if name.startswith("_") or impl is None:
            continue
        overrides[name] = _streaming(impl) if inspect.isasyncgenfunction(impl) else _unary(impl)
    return type(base.__name__, (base,), overrides)()


@serve.deployment
class ServingReplica(GRPCMethods):
    """Holds a worker per model and serves them. Which version of each model: the deployment's
    ``user_config`` (``{"models": {name: version}, "rejected": {...}}``) at start and on a
    config-only redeploy (:meth:`reconfigure`), then the newest version directory the
    repository poll finds — swapped in place, without restarting the replica."""

    # Ray Serve awaits an async constructor, then calls reconfigure with the user_config; the
    # replica takes traffic (and joins the port) only once both returned
    async def __init__(self, settings: Settings) -> None:  # type: ignore[misc]
        super().__init__({}, {}, {}, settings)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.node = ray.get_runtime_context().get_node_id()[:12]
        self.workers: dict[str, ModelWorker] = {}
        self.configured_rejected: dict[str, str] = {}
        self.http_task: asyncio.Task[None] | None = None
        self.poll_task: asyncio.Task[None] | None = None
        attach(self)

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve ``config["models"]`` (name → version): Ray calls this after the constructor and
        whenever only the user_config changed (``serve deploy`` of a new version)."""
        self.configured_rejected = dict(config.get("rejected", {}))
        await self._serve({name: int(version) for name, version in config["models"].items()})
        if self.http_task is None:
            await self._listen()
            if self.settings.repository_poll_s > 0:
                self.poll_task = asyncio.create_task(self._poll())

    async def _serve(self, wanted: dict[str, int]) -> None:
        """Load what is new (off the event loop, while the current versions keep answering), then
        swap atomically. Requests already inside a worker finish on it; every answer names the
        version that produced it. A version that fails to load is listed as rejected and the
        previous one keeps serving."""
        workers = {n: w for n, w in self.workers.items() if n in wanted}
        failed: dict[str, str] = {}
        for name, version in wanted.items():
            if name in workers and workers[name].entry.version == version:
                continue
            try:
                entry = load_entry(self.settings.repository, name, version)
                workers[name] = await asyncio.to_thread(
                    ModelWorker, entry, self.settings, self.replica, self.node
                )
                log.info("serving %s v%s", name, version)
            except Exception as exc:
                reason = f"failed to load: {type(exc).__name__}: {str(exc)[:300]}"
                if self.rejected.get(f"{name}/{version}") != reason:  # log a failure once
                    log.error("not serving %s v%s: %s", name, version, reason)
                failed[f"{name}/{version}"] = reason
        if not workers:
            raise RuntimeError(f"no model could be loaded: {failed}")
        # one synchronous step: a request sees either the old set or the new one, never a mix
        replaced = [w for w in self.workers.values() if all(w is not v for v in workers.values())]
        self.workers, self.models = workers, dict(workers)
        self.entries = {name: worker.entry for name, worker in workers.items()}
        self.rejected = {**self.configured_rejected, **failed}
        self.model_info = {}
        for worker in replaced:  # each version has its own queue: the old one drains, then ends
            worker.close()

    async def _poll(self) -> None:
        """Every ``repository_poll_s``: serve the newest version directory of each served model
        (as TensorFlow Serving does). Export writes a version atomically and the manifest's
        checksums refuse a half-copied one, which is tried again at the next poll."""
        while True:
            await asyncio.sleep(self.settings.repository_poll_s)
            try:
                newest = {name: max(list_versions(self.settings.repository, name), default=0)
                          for name in self.workers}  # fmt: skip
                wanted = {n: max(v, self.workers[n].entry.version) for n, v in newest.items()}
                if any(self.workers[n].entry.version != v for n, v in wanted.items()):
                    await self._serve(wanted)
            except Exception:  # a repository that cannot be read now may be readable next time
                log.exception("polling the repository failed")

    async def _listen(self) -> None:
        settings = self.settings
        recycled = ConnectionRecycler(app, settings.keepalive_requests)
        self.http = _Server(
            uvicorn.Config(
                recycled, lifespan="off", log_level="warning", access_log=settings.access_log,
                timeout_keep_alive=30, proxy_headers=False,
            )
        )  # fmt: skip
        self.http_task = asyncio.create_task(
            self.http.serve(sockets=[shared_socket(settings.host, settings.http_port)])
        )
        self.grpc = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 1),
                ("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
                ("grpc.max_send_message_length", settings.grpc_max_message_bytes),
            ]
        )
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            servicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer, self), self.grpc
        )
        attention_pb2_grpc.add_AttentionServiceServicer_to_server(
            servicer(attention_pb2_grpc.AttentionServiceServicer, self), self.grpc
        )
        address = f"[{settings.host}]" if ":" in settings.host else settings.host
        if not self.grpc.add_insecure_port(f"{address}:{settings.grpc_port}"):
            raise RuntimeError(f"gRPC: cannot listen on {address}:{settings.grpc_port}")
        await self.grpc.start()
        while not self.http.started:  # the socket is bound already; this is uvicorn's start-up
            if self.http_task.done():
                self.http_task.result()  # raises why it stopped
                raise RuntimeError(f"HTTP server on {settings.host}:{settings.http_port} stopped")
            await asyncio.sleep(0.01)
        log.info("serving HTTP on %s:%d, gRPC on :%d", settings.host, settings.http_port, settings.grpc_port)

    async def check_health(self) -> None:
        """Called by Ray Serve every few seconds; a raise here restarts the replica."""
        if self.http_task is not None and self.http_task.done():
            raise RuntimeError("the replica's HTTP server stopped")
        for worker in self.workers.values():
            worker.metrics.refresh()

    async def __del__(self) -> None:
        """Graceful stop: refuse new connections and let requests in flight finish, for at most
        ``drain_s`` (HTTP and gRPC together), then close what is left."""
        if self.poll_task is not None:
            self.poll_task.cancel()
        if self.http_task is None:
            return
        drain = self.settings.drain_s
        self.http.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                asyncio.gather(self.grpc.stop(grace=drain), asyncio.shield(self.http_task)), drain + 0.5
            )
        self.http.force_exit = True  # connections still open after the drain are closed


def user_config(models: dict[str, ModelEntry], rejected: dict[str, str]) -> dict[str, Any]:
    """What the serving replicas serve: the deployment's user_config (see ServingReplica)."""
    return {"models": {name: entry.version for name, entry in models.items()}, "rejected": rejected}


def replica_options(settings: Settings) -> dict[str, Any]:
    return {
        "name": "replica",
        **settings.scaling_for(None),
        # HTTP and gRPC reach the replica directly, so Ray's request limits do not apply:
        # each model's worker sheds beyond its capacity (ModelWorker.capacity)
        "ray_actor_options": settings.actor_options(),
        "logging_config": settings.serve_logging,
        "health_check_period_s": 5,
        **settings.shutdown_options(),
    }
