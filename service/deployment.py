"""The Ray-ingress topology's model deployments: one per model, each a :class:`ModelWorker`.

Used by the ``ray-proxy`` and ``ray-direct`` frontends, where an ingress deployment
(``service/ingress.py``) routes to these through deployment handles. Why a deployment per model
rather than one multiplexed per family: each model gets its own replica count, batch size, GPU
share, queue and autoscaling. The price is a second hop per request; the default ``in-replica``
frontend (``service/replica_server.py``) avoids it by holding every model in each replica.
"""

from __future__ import annotations

from typing import Any

import ray
from ray import serve

from service.errors import ServiceError
from service.model_worker import ModelWorker, max_ongoing_requests
from service.repository import ModelEntry
from service.settings import Settings


@serve.deployment
class ModelDeployment:
    def __init__(self, entry: ModelEntry, settings: Settings) -> None:
        replica = serve.get_replica_context().replica_id.unique_id
        self.worker = ModelWorker(entry, settings, replica, ray.get_runtime_context().get_node_id()[:12])

    def check_health(self) -> None:
        """Called by Ray Serve every few seconds; a raise here restarts the replica."""
        self.worker.metrics.refresh()

    async def info(self) -> dict[str, Any]:
        return await self.worker.info()

    async def predict(self, request: Any) -> dict[str, Any] | ServiceError:
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
