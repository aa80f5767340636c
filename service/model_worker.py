"""One model, in process: its runner behind ``@serve.batch``, with its metrics and its queue limit.

Both topologies use it. In the default ``in-replica`` frontend every serving replica holds a
worker per model and calls it directly; in the Ray-ingress frontends each model deployment
(``service/deployment.py``) wraps one worker and the ingress reaches it through a handle.

Batching: ``@serve.batch`` collects requests for up to ``batch_wait_timeout_s`` or
``max_batch_size`` sequences (a multi-text translation counts each text); the batch runs in a
worker thread so the event loop keeps accepting the next batch meanwhile. A caller cancelled
while waiting (a client gone, a deadline passed) leaves the batch before it runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from ray import serve

from service.errors import InferenceFailed, Overloaded, ServiceError
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


class ModelWorker:
    def __init__(self, entry: ModelEntry, settings: Settings, replica: str, node: str) -> None:
        self.entry = entry
        providers = choose_providers(list(settings.providers))
        self.runner = make_runner(entry, providers, settings.intra_op_threads, settings.limits)
        start = time.perf_counter()
        self.runner.warmup()  # a replica takes traffic only once constructed, so only after this
        self.warmup_ms = round((time.perf_counter() - start) * 1000, 3)
        batching = settings.batching_for(entry.name)
        self._batch.set_max_batch_size(batching.max_batch_size)  # type: ignore[attr-defined]
        self._batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)  # type: ignore[attr-defined]
        self.max_batch_size = batching.max_batch_size
        #: requests this worker holds at once (batching + waiting) before it sheds new ones
        self.capacity = max_ongoing_requests(settings, entry.name) + settings.limits.max_queued_requests
        self.in_flight = 0
        self.metrics = ModelMetrics(entry.name, settings.latency_buckets_s)
        provider = self.runner.providers[0]
        self.metrics.loaded(entry.version, entry.manifest.task, entry.manifest.family, provider)
        self.replica, self.node = replica, node
        log.info(
            "%s v%s ready on %s, batch ≤ %d", entry.name, entry.version, provider, batching.max_batch_size
        )

    async def info(self) -> dict[str, Any]:
        return {
            "providers": list(self.runner.providers),
            "max_batch_size": self.max_batch_size,
            "warmup_ms": self.warmup_ms,
        }

    async def predict(self, request: Any) -> dict[str, Any]:
        """Preprocess here (per request), infer in a batch, postprocess here."""
        if self.in_flight >= self.capacity:
            raise Overloaded(f"model {self.entry.name!r} is overloaded; retry later")
        self.in_flight += 1
        try:
            arrived = time.perf_counter()
            work = self.runner.preprocess(request)
            done: _Done = await self._batch(_Pending(work, self.runner.size(work), arrived))
        finally:
            self.in_flight -= 1
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


def max_ongoing_requests(settings: Settings, model: str) -> int:
    """Requests a model works on at once: 4 × its batch size, so batches can actually fill
    (Ray's default of 5 would starve ``@serve.batch``)."""
    return max(4 * settings.batching_for(model).max_batch_size, 16)
