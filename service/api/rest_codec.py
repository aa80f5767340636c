"""The REST API's codec: its request bodies (``service/api/schemas.py``) into the core's jobs, and
the core's answers into its JSON — once each way.

Attention maps are rounded to 6 decimals in JSON, or drawn as PNG heatmaps
(``service/inference/attention.py``) when the request asks for ``attention_format: "png"``.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
import orjson

from service.api import json_body
from service.api.schemas import ClassifyOptions, ClassifyRequest, TranslateRequest
from service.errors import InvalidInput
from service.inference import attention as maps
from service.inference.jobs import Answer, Classified, ClassifyJob, Translated, TranslateJob
from service.inference.translation import Translation


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON, as every REST answer and event carries it: orjson, with numpy arrays
    written directly — an answer with every layer's attention (fashion-vit: 21,904 values) took
    9.1 ms through ``json`` and ``tolist()``, 0.7 ms so; a small answer 15 µs, 1 µs. Non-finite
    floats are written ``null`` (JSON has no NaN or Infinity)."""
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)


# -- requests → jobs -----------------------------------------------------------------------------


def translate_job(request: TranslateRequest, field: str = "text") -> TranslateJob:
    """``field``: the protocol's name for the texts, as error messages name them."""
    attention = request.attention_layers if request.return_attention else "none"
    return TranslateJob(
        texts=request.texts,
        beam_size=request.beam_size,
        max_length=request.max_length,
        length_penalty=request.length_penalty,
        attention=attention,
        truncate=request.truncate,
        field=field,
    )


def classify_job(
    options: ClassifyOptions,
    image: bytes | None = None,
    pixels: np.ndarray | None = None,
    field: str | None = None,
    fewer_layers: str | None = None,
) -> ClassifyJob:
    """The core's job; ``field`` (default ``image`` or ``pixels``) and ``fewer_layers`` name the
    request's parts as its protocol spells them, for error messages."""
    attention = options.attention_layers if options.return_attention else "none"
    return ClassifyJob(
        image=image,
        pixels=pixels,
        top_k=options.top_k,
        attention=attention,
        head_fusion=options.head_fusion,
        discard_ratio=options.discard_ratio,
        field=field or "",
        fewer_layers=fewer_layers or ClassifyJob.fewer_layers,
    )


def classify_json_job(request: ClassifyRequest) -> ClassifyJob:
    """A JSON body: base64 ``image`` bytes, or ``pixels`` as nested lists."""
    if request.image is not None:
        try:
            data = base64.b64decode(request.image, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidInput("image: not valid base64") from exc
        return classify_job(request, image=data)
    try:
        pixels = json_body.array(request.pixels, np.float64)
    except (ValueError, TypeError, OverflowError) as exc:  # OverflowError: an integer past float's range
        raise InvalidInput("pixels: must be a rectangular array of numbers") from exc
    return classify_job(request, pixels=pixels)


# -- answers → JSON ------------------------------------------------------------------------------


def draws(options: TranslateRequest | ClassifyOptions) -> bool:
    """Whether the answer holds PNGs, which :func:`answer_json` draws: a translation's heat map
    takes ≈ 16 ms, 64 of them a second, so the routes build such an answer in a thread and the
    event loop goes on serving every other request meanwhile."""
    return options.return_attention and options.attention_format == "png"


def heavy(answer: Answer, options: TranslateRequest | ClassifyOptions) -> bool:
    """Whether :func:`answer_json` runs in a worker thread: it draws PNGs (:func:`draws`), or
    writes :data:`json_body.SLICE` values or more (in slices there: :func:`rounded`)."""
    return draws(options) or json_body.answer_values([answer]) >= json_body.SLICE


def answer_json(answer: Answer, options: TranslateRequest | ClassifyOptions, total_ms: float) -> bytes:
    """The answer body, None fields left out, built directly: the hot path skips FastAPI's
    response-model round trip (validate → dump → encode), which cost more CPU than the model on
    small inputs. The ``response_model`` of each route still documents the shape, and the tests
    check answers against it."""
    m = answer.metrics
    metrics: dict[str, Any] = {
        "queue_wait_ms": m.queue_wait_ms,
        "compute_ms": m.compute_ms,
        "batch_size": m.batch_size,
    }
    if m.tokens_generated is not None:
        metrics["tokens_generated"] = m.tokens_generated
    if m.time_to_first_token_ms is not None:
        metrics["time_to_first_token_ms"] = m.time_to_first_token_ms
    if m.time_per_output_token_ms is not None:
        metrics["time_per_output_token_ms"] = m.time_per_output_token_ms
    metrics.update(replica=m.replica, node=m.node, total_ms=total_ms)
    body = {"model": answer.model, "version": answer.version, **result_json(answer.result, options)}
    body["metrics"] = metrics
    return dumps(body)


def result_json(
    result: Translated | Classified, options: TranslateRequest | ClassifyOptions
) -> dict[str, Any]:
    """The result's part of the answer body, as the request's options ask for it."""
    if isinstance(result, Translated):
        assert isinstance(options, TranslateRequest)
        return {"translations": [_translation(t, options) for t in result.translations]}
    assert isinstance(options, ClassifyOptions)
    return _classification(result, options)


def _translation(t: Translation, request: TranslateRequest) -> dict[str, Any]:
    item: dict[str, Any] = {
        "text": t.text, "source_tokens": t.source_tokens, "target_tokens": t.target_tokens,
        "score": t.score, "finished": t.finished,
    }  # fmt: skip
    if request.return_attention:
        grid = maps.alignment(t.attention)
        amap: dict[str, Any] = {"kind": "alignment", "shape": list(grid.shape)}
        if request.attention_format == "png":
            png = maps.alignment_png(grid, t.source_tokens, t.target_tokens)
            amap["png_base64"] = base64.b64encode(png).decode()
        else:
            amap["values"] = rounded(grid)
        if request.attention_layers == "all" and t.attention.ndim == 4:
            amap["layers"] = rounded(t.attention.transpose(1, 2, 0, 3))  # (T, L, H, S) → (L, H, T, S)
        item["attention"] = amap
    return item


def _classification(result: Classified, options: ClassifyOptions) -> dict[str, Any]:
    out: dict[str, Any] = {
        "predictions": [
            {"label": label, "index": int(i), "probability": float(p)}
            for label, i, p in zip(result.labels, result.indices, result.probabilities, strict=True)
        ]
    }
    if result.rollout is not None:
        amap: dict[str, Any] = {"kind": result.rollout_kind, "shape": list(result.rollout.shape)}
        if options.attention_format == "png":
            png = maps.image_overlay_png(result.image, result.rollout, options.overlay_opacity)
            amap["png_base64"] = base64.b64encode(png).decode()
        else:
            amap["values"] = rounded(result.rollout)
        if result.attentions is not None:
            amap["layers"] = rounded(result.attentions)
        out["attention"] = amap
    return out


def rounded(array: np.ndarray) -> np.ndarray | orjson.Fragment:
    """Attention values as JSON answers carry them: floats rounded to 6 decimals, as nested lists of
    the array's layout — an array, which :func:`dumps` writes so, or, past
    :data:`json_body.SLICE` values, its JSON written in slices (:func:`json_body.numbers`)."""
    values = np.ascontiguousarray(np.round(array.astype(np.float64), 6))
    return json_body.numbers(values) if values.size > json_body.SLICE else values
