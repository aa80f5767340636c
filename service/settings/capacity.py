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


def max_queued_requests(settings: Settings, task: str | None) -> int:
    """Requests a model queues beyond those it works on: ``limits.max_queued_requests``; for an
    image model, at least ``limits.max_images`` — each image of a KServe v2 request is one of the
    model's requests, and a smaller queue refused a whole request with 503 on an idle model, every
    retry too. All of them, not the tight ``max_images`` minus those it works on: Ray's router
    counts a call as queued until it has picked a replica, so calls made together (an image
    request's) could be refused before the replica's places were filled."""
    queued = settings.limits.max_queued_requests
    if task == "image-classification":
        return max(queued, settings.limits.max_images)
    return queued
