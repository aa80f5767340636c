"""The Ray-ingress hosting (``ray-proxy``, ``ray-direct``): an ingress deployment in front of one
deployment per model.

Ray Serve delivers HTTP (the API's app: REST and KServe v2 routes) and gRPC (the servicer's
methods) to the ingress, which routes each request to the model's own deployment, a
:class:`ModelWorker`, through a deployment handle. Why a deployment per model rather than one
multiplexed per family: each model gets its own replica count, batch size, GPU share, queue and
autoscaling. The price is a second hop per request; the default ``in-replica`` hosting
(``service/hosting/in_replica.py``) avoids it by holding every model in each replica.
"""

from __future__ import annotations

import inspect
from typing import Any

import ray
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from service.api.grpc_servicer import GrpcServicer
from service.api.http import create_app
from service.api.server import Server
from service.errors import Overloaded, ServiceError
from service.hosting.metrics import IngressMetrics, ModelMetrics
from service.inference.jobs import Answer
from service.inference.repository import ModelEntry
from service.inference.worker import ModelWorker, max_ongoing_requests
from service.settings import Settings


@serve.deployment
class ModelDeployment:
    def __init__(self, entry: ModelEntry, settings: Settings) -> None:
        replica = serve.get_replica_context().replica_id.unique_id
        node = ray.get_runtime_context().get_node_id()[:12]
        metrics = ModelMetrics(entry.name, settings.latency_buckets_s)
        self.worker = ModelWorker(entry, settings, replica, node, metrics)

    def check_health(self) -> None:
        """Called by Ray Serve every few seconds; a raise here restarts the replica."""
        self.worker.metrics.refresh()

    async def info(self) -> dict[str, Any]:
        return await self.worker.info()

    async def predict(self, request: Any) -> Answer | ServiceError:
        """The answer, or the service error to answer with: a refusal is an answer, not a failed
        call (Ray would log a traceback for every 4xx); the ingress raises it (``RemoteModel``)."""
        try:
            return await self.worker.predict(request)
        except ServiceError as exc:
            return exc


def model_deployment(entry: ModelEntry, settings: Settings) -> Any:
    """The bound deployment for one model, with its replica, queue and resource options."""
    return ModelDeployment.options(  # type: ignore[attr-defined]
        name=entry.name,
        **settings.scaling_for(entry.name),
        max_ongoing_requests=max_ongoing_requests(settings, entry.name),
        max_queued_requests=settings.limits.max_queued_requests,
        ray_actor_options=settings.actor_options(),
        logging_config=settings.serve_logging,
        health_check_period_s=5,
        **settings.shutdown_options(),
    ).bind(entry, settings)


class RemoteModel:
    """A model deployment reached through its handle, as the server's ``Model``."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def predict(self, request: Any) -> Answer:
        try:
            answer = await self.handle.predict.remote(request)
        except BackPressureError as exc:  # Ray's own queue limit for the model's replicas
            raise Overloaded("the model is overloaded; retry later") from exc
        if isinstance(answer, ServiceError):  # a refusal travels as a value (ModelDeployment.predict)
            raise answer
        return answer

    async def info(self) -> dict[str, Any]:
        return await self.handle.info.remote()


class IngressReplica:
    """The ingress: the API's server over remote models. Ray's HTTP proxy (or its direct ingress)
    serves the app ``__serve_build_asgi_app__`` builds, and its gRPC proxy calls the servicer's
    methods by name (added below)."""

    def __init__(
        self,
        handles: dict[str, DeploymentHandle],
        entries: dict[str, ModelEntry],
        rejected: dict[str, str],
        settings: Settings,
    ) -> None:
        self.server = Server(settings, IngressMetrics(settings.latency_buckets_s))
        self.server.serve({name: RemoteModel(h) for name, h in handles.items()}, entries, rejected)
        self.grpc = GrpcServicer(self.server)

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.server)


def _forward(name: str) -> Any:
    """An ingress method of the same name and signature as the servicer's: Ray's gRPC proxy
    routes by method name and passes ``grpc_context`` by keyword."""
    if inspect.isasyncgenfunction(getattr(GrpcServicer, name)):

        async def stream(self: IngressReplica, request_stream: Any, grpc_context: Any) -> Any:
            async for reply in getattr(self.grpc, name)(request_stream, grpc_context):
                yield reply

        forward: Any = stream
    else:

        async def unary(self: IngressReplica, request: Any, grpc_context: Any) -> Any:
            return await getattr(self.grpc, name)(request, grpc_context)

        forward = unary
    forward.__name__ = forward.__qualname__ = name
    return forward


for _name in GrpcServicer.METHODS:
    setattr(IngressReplica, _name, _forward(_name))
Ingress = serve.deployment(serve.ingress()(IngressReplica))


def ingress_options(settings: Settings) -> dict[str, Any]:
    return {
        "name": "ingress",
        "max_ongoing_requests": 1024,
        "ray_actor_options": {"num_cpus": 0},
        "logging_config": settings.serve_logging,
        **settings.shutdown_options(),
    }
