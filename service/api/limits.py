"""The request limits, applied at the API edge: one ``Settings.limits`` object.

Every protocol's jobs pass :func:`check` in ``Server.predict_many`` before any model sees them,
and the same object is what the OpenAPI document (:func:`write_openapi`) and the KServe model
metadata (:func:`request_limits`) show. Only what needs the model is checked below, with the same
object: the answer-size bound (it needs the source token counts and the decoder's layers and
heads) and the decoded pixel count (it needs the image's header) — ``service/inference/runners.py``.
The pydantic ``Field`` bounds in ``schemas.py`` are ceilings that ``Settings.limits`` cannot exceed
(``beam_size`` has none there: its ceiling is the setting's, so any size over the served limit is
refused naming that limit; a list of texts over its ceiling is refused as one over the served
limit, :func:`over_ceiling`).
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import ValidationError

from service.errors import InvalidInput, PayloadTooLarge
from service.inference.jobs import ClassifyJob, TranslateJob
from service.inference.repository import ModelEntry
from service.inference.runners import check_answer_size, image_answer_values
from service.settings import Limits


def over_ceiling(exc: ValidationError, limits: Limits) -> PayloadTooLarge | None:
    """A REST list of texts longer than the schema's ceiling (``schemas.MAX_TEXTS``) as :func:`check`
    refuses one longer than the served limit: 413 with its count (None for other errors)."""
    for err in exc.errors(include_url=False):
        if err["type"] == "too_long" and err["loc"][:1] == ("text",):
            count = err["ctx"]["actual_length"]
            return PayloadTooLarge(f"text: {count} texts exceed the limit of {limits.max_texts}")
    return None


def check(job: Any, limits: Limits) -> None:
    """Refuse a job over a limit, naming the field (413 for sizes, 422 for values)."""
    if isinstance(job, TranslateJob):
        if len(job.texts) > limits.max_texts:  # named as the request's protocol names the field
            raise PayloadTooLarge(
                f"{job.field}: {len(job.texts)} texts exceed the limit of {limits.max_texts}"
            )
        for i, text in enumerate(job.texts):
            if len(text) > limits.max_text_chars:
                raise PayloadTooLarge(
                    f"{job.field}[{i}]: {len(text)} characters exceed the limit of {limits.max_text_chars}"
                )
        if job.beam_size > limits.max_beam_size:
            raise InvalidInput(f"beam_size: {job.beam_size} exceeds the limit of {limits.max_beam_size}")
    elif isinstance(job, ClassifyJob):
        if job.top_k > limits.max_top_k:
            raise InvalidInput(f"top_k: {job.top_k} exceeds the limit of {limits.max_top_k}")
        if job.image is not None and len(job.image) > limits.max_image_bytes:
            raise PayloadTooLarge(
                f"{job.field}: {len(job.image)} bytes exceed the limit of {limits.max_image_bytes}"
            )
        if job.pixels is not None:
            _check_pixels(job.pixels.shape, job.field, limits.max_image_pixels)


def _check_pixels(shape: tuple[int, ...], field: str, max_pixels: int) -> None:
    """An array of pixels (H, W[, C]) within ``max_pixels`` (H × W, as an encoded image's), and
    within four values a pixel whatever its shape (RGBA at most)."""
    values = math.prod(shape)
    if len(shape) >= 2 and shape[0] * shape[1] > max_pixels:
        size = f"{shape[0]}×{shape[1]} = {shape[0] * shape[1]} pixels"
        raise PayloadTooLarge(f"{field}: {size}, over the limit of {max_pixels}")
    if values > max_pixels * 4:
        raise PayloadTooLarge(f"{field}: {values} values exceed the limit of {max_pixels * 4}")


def check_count(jobs: list[Any], limits: Limits) -> None:
    """Refuse a request of more images than ``limits.max_images`` (413): the jobs of one request
    (a KServe v2 batch of images; a translation request is one job, its texts bounded above)."""
    if len(jobs) > limits.max_images and isinstance(jobs[0], ClassifyJob):
        count, limit = len(jobs), limits.max_images
        raise PayloadTooLarge(f"inputs: {count} images exceed the limit of {limit} per request")


def check_answer_total(entry: ModelEntry, jobs: list[Any], limits: Limits) -> None:
    """Refuse a request of several images (a KServe v2 batch) whose attention maps could exceed
    ``limits.max_response_bytes`` together (422, as one image over it), before any work: each
    image's alone is checked where it is preprocessed, and a translation request adds its texts
    up there."""
    spec = entry.manifest.image
    if len(jobs) < 2 or spec is None or not isinstance(jobs[0], ClassifyJob):
        return
    values = sum(image_answer_values(spec, job.attention) for job in jobs)
    smaller = f"fewer images, or {jobs[0].fewer_layers}"
    check_answer_size(values, limits.max_response_bytes, smaller, jobs[0].value_bytes)


def tensor_items(limits: Limits) -> int:
    """The most elements a KServe v2 BYTES input of a request may hold: one per text or per
    encoded image, whichever limit is larger (the request's own is checked on its jobs)."""
    return max(limits.max_texts, limits.max_images)


def request_limits(task: str, limits: Limits) -> dict[str, int]:
    """The limits on a request to a model of ``task``, as KServe model metadata shows them."""
    names: tuple[str, ...]
    if task == "translation":
        names = ("max_texts", "max_text_chars", "max_beam_size", "max_response_bytes")
    else:
        names = ("max_images", "max_image_bytes", "max_image_pixels", "max_top_k", "max_response_bytes")
    return {name: int(getattr(limits, name)) for name in names}


def write_openapi(node: Any, limits: Limits) -> None:
    """Write ``limits`` into every request schema of an OpenAPI document (components and inline
    bodies), in place of the schemas' ceilings."""
    if isinstance(node, list):
        for item in node:
            write_openapi(item, limits)
        return
    if not isinstance(node, dict):
        return
    props = node.get("properties")
    if isinstance(props, dict):
        if "text" in props and "beam_size" in props:  # TranslateRequest
            text = props["text"]
            text["description"] = (
                f"One text or a list of texts (each at most {limits.max_text_chars} characters; "
                f"at most {limits.max_texts} texts)."
            )
            for variant in text.get("anyOf", []):
                if variant.get("type") == "string":
                    variant["maxLength"] = limits.max_text_chars
                elif variant.get("type") == "array":
                    variant["maxItems"] = limits.max_texts
                    variant.setdefault("items", {})["maxLength"] = limits.max_text_chars
            props["beam_size"]["maximum"] = limits.max_beam_size
        if "top_k" in props:  # ClassifyOptions / ClassifyRequest
            props["top_k"]["maximum"] = limits.max_top_k
        if "image" in props and "pixels" in props:  # base64 of the largest image accepted
            for variant in props["image"].get("anyOf", [props["image"]]):
                if variant.get("type") == "string":
                    variant["maxLength"] = -(-limits.max_image_bytes // 3) * 4
    for value in node.values():
        write_openapi(value, limits)
