"""The ``in-replica`` frontend: each serving replica holds every model and answers HTTP and gRPC
itself, on the configured host and ports.

Why: on small and medium attention models Ray Serve's default path (proxy actor → ingress
replica → model replica) costs several times the model's own CPU per request
(``benchmarks/results/``). Here a request crosses no process boundary: the replica's own
uvicorn (the same FastAPI app as every frontend) and gRPC server call the model workers in
process, each model batching on its own scheduler (``service/inference/worker.py``). Ray Serve still places,
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
import logging
from typing import Any

import ray
from ray import serve

from service.api.grpc_aio import GrpcHealth, add_reflection, add_to_grpc_server, interceptors
from service.api.grpc_servicer import GrpcServicer
from service.api.http import create_app
from service.api.server import Server
from service.hosting.autoscaling import METRIC
from service.hosting.listening import (
    QuietServer,
    descriptor_room,
    grpc_server,
    http_config,
    shared_socket,
)
from service.hosting.metrics import IngressMetrics, ModelMetrics
from service.inference.model_set import ModelSet
from service.inference.repository import ModelEntry
from service.settings import Settings

log = logging.getLogger("ray.serve")


@serve.deployment
class ServingReplica:
    """Holds a worker per model (a :class:`ModelSet`) and serves them over HTTP and gRPC. Which
    version of each model: the deployment's ``user_config`` (``{"models": {name: version},
    "rejected": {...}}``) at start and on a config-only redeploy (:meth:`reconfigure`), then the
    newest version directory the repository poll finds — swapped in place, without restarting."""

    # Ray Serve awaits an async constructor, then calls reconfigure with the user_config; the
    # replica takes traffic (and joins the port) only once both returned
    async def __init__(self, settings: Settings) -> None:  # type: ignore[misc]
        self.settings = settings
        self.metrics = IngressMetrics(settings.latency_buckets_s)
        self.server = Server(settings, self.metrics)
        self.models = ModelSet(
            settings,
            replica=serve.get_replica_context().replica_id.unique_id,
            node=ray.get_runtime_context().get_node_id()[:12],
            metrics_for=lambda name: ModelMetrics(name, settings.latency_buckets_s),
            on_change=lambda workers, rejected: self.server.serve(workers, self.models.entries, rejected),
            discover=settings.models is None,  # the whole repository: new model directories too
        )
        self.http_task: asyncio.Task[None] | None = None
        self.poll_task: asyncio.Task[None] | None = None
        self.health: GrpcHealth | None = None

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve ``config["models"]`` (name → version): Ray calls this after the constructor and
        whenever only the user_config changed (``serve deploy`` of a new version)."""
        self.models.configured_rejected = dict(config.get("rejected", {}))
        await self.models.serve({name: int(version) for name, version in config["models"].items()})
        if self.http_task is None:
            await self._listen()
            if self.settings.repository_poll_s > 0:
                self.poll_task = asyncio.create_task(self.models.poll())

    async def _listen(self) -> None:
        settings = self.settings
        if shortfall := descriptor_room(settings.limits.max_connections):
            log.warning(shortfall)
        config = http_config(
            create_app(self.server),
            settings.limits,
            self.metrics,
            access_log=settings.access_log,
            log_level=settings.log_level,
            keepalive_requests=settings.keepalive_requests,
            max_age_s=settings.connection_max_age_s,
        )
        self.http = QuietServer(config)
        self.http_task = asyncio.create_task(
            self.http.serve(sockets=[shared_socket(settings.host, settings.http_port)])
        )
        self.grpc = grpc_server(
            settings.limits,
            settings.grpc_max_message_bytes,
            settings.connection_max_age_s,
            interceptors(settings.api_token, settings.limits.max_grpc_calls, self.metrics.grpc_refused),
        )
        limits = settings.limits
        services = add_to_grpc_server(
            self.grpc, GrpcServicer(self.server), limits.max_grpc_value_bytes, limits.stream_write_timeout_s
        )
        self.health = GrpcHealth(self.grpc, services)
        add_reflection(self.grpc, services)
        await self.health.serving()  # every model is loaded and warm by now
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

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray's custom autoscaling metric (``service/hosting/autoscaling.py``): the requests this
        replica holds, queued or computing, over all its models."""
        return {METRIC: float(sum(w.held for w in self.models.workers.values()))}

    async def check_health(self) -> None:
        """Called by Ray Serve every few seconds; a raise here restarts the replica."""
        if self.http_task is not None and self.http_task.done():
            raise RuntimeError("the replica's HTTP server stopped")
        self.models.check_health()

    async def __del__(self) -> None:
        """Graceful stop: readiness 503 (gRPC health NOT_SERVING) while it serves on for
        ``unready_s``; then refuse new connections and let requests in flight finish, for at most
        ``drain_s`` (HTTP and gRPC together), then close what is left."""
        if self.poll_task is not None:
            self.poll_task.cancel()
        if self.http_task is None:
            return
        drain = self.settings.drain_s
        if self.health is not None:  # health watchers learn it before the drain begins
            await self.health.stopping()
        if self.settings.unready_s > 0:  # readiness says no while it serves on: probing load
            self.server.leaving = True  # balancers stop sending it connections before it closes
            await asyncio.sleep(self.settings.unready_s)
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
        "ray_actor_options": settings.actor_options(),  # on CUDA: a GPU share, every model on it
        "logging_config": settings.serve_logging,
        "health_check_period_s": 5,
        **settings.shutdown_options(),
    }
