"""One Ray Serve deployment per model: a runner behind ``@serve.batch``.

Why a deployment per model rather than one multiplexed per family: the demo and typical user
repositories hold a handful of models with very different costs (a ViT forward pass vs. a beam
search), and each needs its own replica count, batch size and GPU share. Per-model deployments
give each its own queue, autoscaling and metrics; multiplexing pays off only for many rarely-used
variants of one architecture, which is not this product's case.

Batching: ``@serve.batch`` collects requests for up to ``batch_wait_timeout_s`` or
``max_batch_size`` sequences (a multi-text translation counts each text); the batch runs in a
worker thread so the replica's event loop keeps accepting the next batch meanwhile.
``max_ongoing_requests`` is 4 × the batch size so batches can actually fill.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve

from service.errors import InferenceFailed, ServiceError
from service.metrics import ModelMetrics
from service.repository import ModelEntry
from service.runner import make_runner
from service.runtime import choose_providers
from service.settings import Settings

log = logging.getLogger("ray.serve")


@dataclass
class _Pending:
    work: Any
    size: int
    arrived: float


@dataclass
class _Done:
    output: Any
    queue_wait_s: float
    compute_s: float
    batch_size: int


@serve.deployment
class ModelDeployment:
    def __init__(self, entry: ModelEntry, settings: Settings) -> None:
        self.entry = entry
        self.settings = settings
        providers = choose_providers(list(settings.providers))
        self.runner = make_runner(entry, providers, settings.intra_op_threads, settings.limits)
        start = time.perf_counter()
        self.runner.warmup()  # a replica takes traffic only once constructed, so only after this
        self.warmup_ms = round((time.perf_counter() - start) * 1000, 3)
        batching = settings.batching_for(entry.name)
        self._batch.set_max_batch_size(batching.max_batch_size)  # type: ignore[attr-defined]
        self._batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)  # type: ignore[attr-defined]
        self.max_batch_size = batching.max_batch_size
        self.metrics = ModelMetrics(entry.name, settings.latency_buckets_s)
        provider = self.runner.providers[0]
        self.metrics.loaded(entry.version, entry.manifest.task, entry.manifest.family, provider)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.node = ray.get_runtime_context().get_node_id()[:12]
        log.info(
            "%s v%s ready on %s, batch ≤ %d", entry.name, entry.version, provider, batching.max_batch_size
        )

    def check_health(self) -> None:
        """Called by Ray Serve every few seconds; a raise here restarts the replica."""
        self.metrics.refresh()

    def info(self) -> dict[str, Any]:
        return {
            "providers": list(self.runner.providers),
            "max_batch_size": self.max_batch_size,
            "warmup_ms": self.warmup_ms,
        }

    async def predict(self, request: Any) -> dict[str, Any]:
        """Preprocess here (per request), infer in a batch, postprocess here."""
        arrived = time.perf_counter()
        work = self.runner.preprocess(request)
        done: _Done = await self._batch(_Pending(work, self.runner.size(work), arrived))
        answer = self.runner.postprocess(work, done.output)
        self.metrics.generated(answer.get("tokens_generated", 0))
        answer["metrics"] = {
            "queue_wait_ms": round(done.queue_wait_s * 1000, 3),
            "compute_ms": round(done.compute_s * 1000, 3),
            "batch_size": done.batch_size,
            "tokens_generated": answer.pop("tokens_generated", None),
            "replica": self.replica,
            "node": self.node,
        }
        return answer

    @serve.batch(
        max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=lambda items: sum(i.size for i in items)
    )
    async def _batch(self, items: list[_Pending]) -> list[_Done]:
        start = time.perf_counter()
        try:
            outputs = await asyncio.to_thread(self.runner.infer, [i.work for i in items])
        except ServiceError:
            raise
        except Exception as exc:  # the runtime failed: every caller in this batch gets the error
            log.exception("%s: batch of %d failed", self.entry.name, len(items))
            raise InferenceFailed(f"inference failed: {type(exc).__name__}") from exc
        compute = time.perf_counter() - start
        size = sum(i.size for i in items)
        waits = [start - i.arrived for i in items]
        self.metrics.batch(size, compute, waits)
        return [_Done(out, wait, compute, size) for out, wait in zip(outputs, waits, strict=True)]


def model_deployment(entry: ModelEntry, settings: Settings) -> Any:
    """The bound deployment for one model, with its replica, queue and resource options."""
    batching = settings.batching_for(entry.name)
    actor: dict[str, Any] = {"num_cpus": settings.replica_num_cpus}
    if settings.use_gpu:
        actor["num_gpus"] = settings.num_gpus_per_replica
    scaling: dict[str, Any] = {"num_replicas": settings.replicas_for(entry.name)}
    if settings.autoscaling is not None:
        scaling = {"autoscaling_config": settings.autoscaling.model_dump()}
    if settings.max_replicas_per_node is not None:
        scaling["max_replicas_per_node"] = settings.max_replicas_per_node
    return ModelDeployment.options(  # type: ignore[attr-defined]
        name=entry.name,
        **scaling,
        max_ongoing_requests=max(4 * batching.max_batch_size, 16),
        max_queued_requests=settings.limits.max_queued_requests,
        ray_actor_options=actor,
        logging_config=settings.serve_logging,
        health_check_period_s=5,
    ).bind(entry, settings)
