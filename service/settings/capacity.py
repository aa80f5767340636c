"""How many requests a model takes at once and queues beyond them: the bounds a model's worker
sheds at (``service/inference/worker.py``) and the Ray frontends give its deployment."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.settings import Settings


def max_ongoing_requests(settings: Settings, model: str) -> int:
    """Requests a model works on at once: 4 × its batch size, so batches can actually fill
    (Ray's default of 5 would starve a model deployment's batches)."""
    return max(4 * settings.batching_for(model).max_batch_size, 16)


def max_queued_requests(settings: Settings, model: str, task: str | None) -> int:
    """Requests a model queues beyond those it works on: ``limits.max_queued_requests``; for an
    image model, at least what a KServe v2 request of ``limits.max_images`` images needs on an
    idle model — each image is one of the model's requests, and a smaller queue refused such a
    request with 503 however often it was retried."""
    queued = settings.limits.max_queued_requests
    if task == "image-classification":
        return max(queued, settings.limits.max_images - max_ongoing_requests(settings, model))
    return queued
