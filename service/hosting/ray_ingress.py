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

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from service.api.grpc_servicer import GrpcServicer
from service.api.http import create_app
from service.api.protos import attention_pb2, grpc_service_pb2
from service.api.server import Server
from service.errors import NotReady, Overloaded, ServiceError
from service.hosting.metrics import IngressMetrics, ModelMetrics
from service.inference.jobs import Answer, Tokens
from service.inference.model_set import ModelSet, NoModelLoaded
from service.inference.repository import ModelEntry, load_entry
from service.inference.statistics import Snapshot
from service.inference.worker import ModelWorker
from service.settings import Settings, max_ongoing_requests, max_queued_requests

log = logging.getLogger("ray.serve")


@serve.deployment
class ModelDeployment:
    """One model's replica: a :class:`ModelSet` of that model, polling the repository and
    swapping a newer version in place as the in-replica frontend does."""

    async def __init__(self, entry: ModelEntry, settings: Settings) -> None:  # type: ignore[misc]
        self.name = entry.name
        self.models = ModelSet(
            settings,
            replica=serve.get_replica_context().replica_id.unique_id,
            node=ray.get_runtime_context().get_node_id()[:12],
            metrics_for=lambda name: ModelMetrics(name, settings.latency_buckets_s),
            on_change=lambda workers, rejected: None,
        )
        try:
            await self.models.serve({entry.name: entry.version})
        except NoModelLoaded:  # no version of it loads: the replica stays up, serving nothing,
            # and says so (info's version None), so the ingress leaves the model out and serves
            # the others, as an in-replica replica does. Raised here, Ray failed the whole deploy.
            # Each poll tries the versions again (ModelSet.poll_once).
            log.error("model %s: no version loads; the replica serves nothing until one does", self.name)
        self.poll_task = asyncio.create_task(self.models.poll()) if settings.repository_poll_s > 0 else None

    def check_health(self) -> None:
        """Called by Ray Serve every few seconds; a raise here restarts the replica."""
        self.models.check_health()

    def _worker(self) -> ModelWorker:
        worker = self.models.workers.get(self.name)
        if worker is None:  # asked before the ingress left the model out, or this replica's load
            # failed where others' did not: it tries again at each poll
            why = f"no version of it loads on this replica yet ({self.models.rejected})"
            raise NotReady(f"model {self.name!r} is not ready: {why}; retry")
        return worker

    async def info(self) -> dict[str, Any]:
        """The worker's info, the version served (None: no version of the model loads) and the
        versions this replica refused to load (the ingress lists them, as in-replica replicas
        list theirs)."""
        rejected = dict(self.models.rejected)
        worker = self.models.workers.get(self.name)
        if worker is None:
            return {"version": None, "rejected": rejected}
        return {**await worker.info(), "version": worker.entry.version, "rejected": rejected}

    async def stats(self) -> Snapshot:
        return await self._worker().stats()

    async def predict(self, request: Any) -> Answer | ServiceError:
        """The answer, or the service error to answer with: a refusal is an answer, not a failed
        call (Ray would log a traceback for every 4xx); the ingress raises it (``RemoteModel``)."""
        try:
            return await self._worker().predict(request)
        except ServiceError as exc:
            return exc

    async def stream(self, request: Any) -> AsyncIterator[Tokens | Answer | ServiceError]:
        """The worker's stream (tokens, then the answer); a refusal is the last item, as in
        :meth:`predict`. Ray cancels this generator when the ingress stops reading it."""
        try:
            async for event in self._worker().stream(request):
                yield event
        except ServiceError as exc:
            yield exc


def model_deployment(entry: ModelEntry, settings: Settings) -> Any:
    """The bound deployment for one model."""
    options = model_options(entry.name, settings, entry.manifest.task)
    return ModelDeployment.options(**options).bind(entry, settings)  # type: ignore[attr-defined]


def model_options(name: str, settings: Settings, task: str | None = None) -> dict[str, Any]:
    """One model deployment's replica, queue and resource options (``task``: the model's, whose
    queue an image model's whole request must fit). On CUDA each replica reserves the model's GPU
    share, not a GPU: the models' deployments share GPUs as their shares allow."""
    return {
        "name": name,
        **settings.scaling_for(name),
        "max_ongoing_requests": max_ongoing_requests(settings, name),
        "max_queued_requests": max_queued_requests(settings, task),
        "ray_actor_options": settings.actor_options(name),
        "logging_config": settings.serve_logging,
        "health_check_period_s": 5,
        **settings.shutdown_options(),
    }


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

    async def stream(self, request: Any) -> AsyncIterator[Tokens | Answer]:
        events: Any = self.handle.options(stream=True).stream.remote(request)
        try:
            async for event in events:
                if isinstance(event, ServiceError):
                    raise event
                yield event
        except BackPressureError as exc:
            raise Overloaded("the model is overloaded; retry later") from exc
        finally:
            # the ingress stopped reading: the replica's generator ends too. Ray's cancel raises
            # the call's own error again (a shed call's BackPressureError), which replaced the
            # 503 above with a 500
            with contextlib.suppress(Exception):
                events.cancel()

    async def info(self) -> dict[str, Any]:
        return await self.handle.info.remote()

    async def stats(self) -> Snapshot:
        """One replica's (the one Ray routes this call to), as each in-replica replica answers
        its own."""
        return await self.handle.stats.remote()


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
        self.settings = settings
        self.server = Server(settings, IngressMetrics(settings.latency_buckets_s))
        self.remote = {name: RemoteModel(h) for name, h in handles.items()}
        self.server.serve(self.remote, entries, rejected)
        self.refused_at_start = dict(rejected)  # models with no deployment: refused before it
        self.grpc = GrpcServicer(self.server)
        self.poll_task: asyncio.Task[None] | None = None
        self._follow_failed: dict[str, str] = {}  # model → why following it failed (logged once)
        self._served_once: set[str] = set()  # models a replica was seen serving

    async def _follow_versions(self) -> None:
        """At start, then every ``repository_poll_s`` (when > 0): the version each model's
        replicas now serve (they swap on their own), so ``/v1/models``, version lookups and KServe
        metadata name it too, and the versions they refused to load, listed under ``rejected`` and
        in the repository index. A model none of whose versions loads is left out until one does."""
        while True:
            await self._follow_once()
            if self.settings.repository_poll_s <= 0:
                return
            await asyncio.sleep(self.settings.repository_poll_s)

    async def served(self) -> tuple[list[str], dict[str, str]]:
        """The models served after a pass of the follower, and the versions refused: asked by
        ``python -m service`` once the app is up, which refuses a start that serves no model."""
        await self._follow_once()
        return sorted(self.server.entries), dict(self.server.rejected)

    async def _follow_once(self) -> None:
        """One pass, model by model: one whose deployment cannot be asked, or whose served
        version cannot be read here (its directory removed, or not on this node), keeps what was
        known of it — it held up every other model's, every poll. Its failure is logged once,
        until it changes."""
        entries, rejected = dict(self.server.entries), dict(self.refused_at_start)
        for name, model in self.remote.items():
            try:
                info = await model.info()
                if info["version"] is None:  # the replica asked serves nothing (ModelDeployment)
                    if name not in self._served_once:  # none ever did: no version of it loads
                        entries.pop(name, None)
                    # else one replica of several is loading again (its answers: 503, retry);
                    # the model stays, as the others serve it
                else:
                    self._served_once.add(name)
                    if name not in entries or int(info["version"]) != entries[name].version:
                        entries[name] = await asyncio.to_thread(
                            load_entry, self.settings.repository, name, int(info["version"])
                        )
                rejected.update(info.get("rejected", {}))
                self._follow_failed.pop(name, None)
                continue
            except DeploymentUnavailableError:  # its replicas are gone: the app stopping (a stop
                pass  # tears the deployments down together), or all of them restarting
            except Exception as exc:  # asked again at the next poll
                why = f"{type(exc).__name__}: {exc}"
                if self._follow_failed.get(name) != why:
                    log.exception("following the versions of %s failed", name)
                self._follow_failed[name] = why
            rejected.update({k: v for k, v in self.server.rejected.items() if k.split("/")[0] == name})
        if entries != self.server.entries or rejected != self.server.rejected:
            self.server.serve({n: m for n, m in self.remote.items() if n in entries}, entries, rejected)

    async def drain(self) -> int:
        """The first step of a stop (``python -m service``): refuse new predictions with 503 and
        let those in flight finish, within ``drain_s``; how many were left. Ray's proxy answers a
        deleted app's routes with a plain-text 404 until the proxy itself stops, so the stop
        drains here first, while the routes still lead to this replica."""
        left = await self.server.drain(self.settings.drain_s)
        if left:
            log.warning("stopping with %d requests still in flight after %s s", left, self.settings.drain_s)
        return left

    async def __serve_build_asgi_app__(self) -> Any:
        """Called by Ray once the replica is constructed, on its event loop."""
        if self.poll_task is None:
            self.poll_task = asyncio.create_task(self._follow_versions())
        # Ray's proxy dying under a request (a stop, a node lost) reaches the request's body read
        # as RayActorError, which Ray's own wrapper lets through: it is a client gone
        return create_app(self.server, client_gone=(RayActorError,))


def _forward(name: str) -> Any:
    """An ingress method of the same name and signature as the servicer's: Ray's gRPC proxy
    routes by method name and passes ``grpc_context`` by keyword. A unary RPC's refusal (an
    unknown model, a bad field, overload) leaves as a code set on the context and an empty answer:
    Ray logs every exception a replica's method raises as "Request failed." with its traceback,
    which under overload was a traceback per shed request. A stream still raises: Ray's proxy
    passes a context's code on only with a message."""
    if inspect.isasyncgenfunction(getattr(GrpcServicer, name)):

        async def stream(self: IngressReplica, request_stream: Any, grpc_context: Any) -> Any:
            async for reply in getattr(self.grpc, name)(request_stream, grpc_context):
                yield reply

        forward: Any = stream
    else:
        empty = _reply_class(name)

        async def unary(self: IngressReplica, request: Any, grpc_context: Any) -> Any:
            try:
                return await getattr(self.grpc, name)(request, grpc_context)
            except ServiceError:  # its code and details are on grpc_context, which Ray sends
                return empty()  # with an answer; raised, Ray logged a traceback per refusal

        forward = unary
    forward.__name__ = forward.__qualname__ = name
    return forward


def _reply_class(method: str) -> Any:
    """The answer message of the unary RPC ``method`` of the gRPC services."""
    for module in (grpc_service_pb2, attention_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            if method in service.methods_by_name:
                return getattr(module, service.methods_by_name[method].output_type.name)
    raise KeyError(method)


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
