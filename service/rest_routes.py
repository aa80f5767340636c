"""The REST routes (``/healthz``, ``/readyz``, ``/v1/...``) on the shared FastAPI app.

They translate HTTP into the runners' request types and back and compute nothing themselves.
Plain functions that receive the serving :class:`~service.routing.ModelRouter` as a dependency,
so the same app runs under Ray Serve's ingress and under a replica's own HTTP server. Errors from
anywhere below arrive as :mod:`service.errors` types and leave as ``{"error": "..."}``.
"""

import json
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from service.errors import InvalidInput, NotReady, validation_message
from service.http_app import Router, app, current_router, direct_post
from service.routing import ModelRouter
from service.schemas import (
    ClassifyOptions,
    ClassifyRequest,
    ClassifyResponse,
    ModelInfo,
    ModelList,
    TranslateRequest,
    TranslateResponse,
)

# -- health -------------------------------------------------------------------------------------


@app.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "live"}


@app.get("/readyz", summary="Readiness: every model loaded and warmed up")
async def readyz(router: Router) -> JSONResponse:
    if not await router.is_ready():
        raise NotReady("not ready: models are still loading")
    warmup = {name: info["warmup_ms"] for name, info in sorted(router.model_info.items())}
    return JSONResponse({"status": "ready", "models": sorted(router.models), "warmup_ms": warmup})


# -- models -------------------------------------------------------------------------------------


@app.get("/v1/models", response_model=ModelList, summary="The served models")
async def list_models(router: Router) -> ModelList:
    return ModelList(
        models=[_model_info(router, n) for n in sorted(router.entries)], rejected=router.rejected
    )


@app.get("/v1/models/{name}", response_model=ModelInfo, summary="One model")
async def get_model(router: Router, name: str) -> ModelInfo:
    router.resolve(name)
    return _model_info(router, name)


def _model_info(router: ModelRouter, name: str) -> ModelInfo:
    m = router.entries[name].manifest
    info = router.model_info.get(name, {})
    languages = (
        {"source": m.translation.source_language, "target": m.translation.target_language}
        if m.translation
        else None
    )
    return ModelInfo(
        name=m.name, version=m.version, task=m.task, family=m.family, description=m.description,
        labels=m.image.labels if m.image else None, languages=languages, eval=m.eval,
        providers=info.get("providers"), max_batch_size=info.get("max_batch_size"),
    )  # fmt: skip


# -- inference ----------------------------------------------------------------------------------


@direct_post(
    "/v1/models/{name}/translate",
    response_model=TranslateResponse,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": TranslateRequest.model_json_schema()}},
        }
    },
)
async def translate(request: Request, name: str) -> Response:
    router = await current_router()
    try:
        body = TranslateRequest.model_validate_json(await router.read_body(request))
    except ValidationError as exc:
        raise InvalidInput(validation_message(exc)) from exc
    return await _predict(router, name, "translation", "translate", body)


_CLASSIFY_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": ClassifyRequest.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        **ClassifyOptions.model_json_schema()["properties"],
                    },
                }
            },
        },
    }
}


@direct_post("/v1/models/{name}/classify", response_model=ClassifyResponse, openapi_extra=_CLASSIFY_BODY)
async def classify(request: Request, name: str) -> Response:
    router = await current_router()
    router.resolve(name, "image-classification")
    body = await _classify_body(router, request)
    return await _predict(router, name, "image-classification", "classify", body)


async def _classify_body(
    router: ModelRouter, request: Request
) -> ClassifyRequest | tuple[ClassifyOptions, bytes]:
    router.check_declared_length(request)
    ctype = request.headers.get("content-type", "")
    try:
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=16, max_part_size=router.max_body)
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise InvalidInput("file: a multipart upload named 'file' is required")
            options = ClassifyOptions.model_validate({k: v for k, v in form.items() if k != "file"})
            return options, await upload.read()
        if ctype.startswith("application/json") or not ctype:
            return ClassifyRequest.model_validate_json(await router.read_body(request))
    except ValidationError as exc:
        raise InvalidInput(validation_message(exc)) from exc
    except (json.JSONDecodeError, UnicodeDecodeError, AssertionError) as exc:
        raise InvalidInput(f"body: {type(exc).__name__}") from exc
    raise InvalidInput(f"content-type: expected application/json or multipart/form-data, got {ctype!r}")


async def _predict(router: ModelRouter, name: str, task: str, route: str, request: Any) -> Response:
    entry, [answer], elapsed_ms = await router.predict_many(name, task, route, [request])
    answer["metrics"]["total_ms"] = elapsed_ms
    return json_answer({"model": entry.name, "version": entry.version, **answer})


def json_answer(answer: dict[str, Any]) -> Response:
    """The answer as JSON, None fields left out, built directly: the hot path skips FastAPI's
    response-model round trip (validate → dump → encode), which cost more CPU than the model on
    small inputs. The ``response_model`` of each route still documents the shape, and the
    tests check answers against it."""
    body = json.dumps(_without_none(answer), ensure_ascii=False, separators=(",", ":"))
    return Response(body.encode(), media_type="application/json")


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return [_without_none(v) for v in value]
    return value
