"""The REST routes (``/healthz``, ``/readyz``, ``/v1/...``): an APIRouter that ``create_app`` includes.

They translate HTTP into the runners' request types and back and compute nothing themselves.
Plain functions that receive the serving :class:`~service.api.server.Server` as a dependency,
so the same app runs under Ray Serve's ingress and under a replica's own HTTP server. Errors from
anywhere below arrive as :mod:`service.errors` types and leave as ``{"error": "..."}``.
"""

import asyncio
import json

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from service.api import forms, json_body, limits
from service.api.rest_codec import answer_json, classify_job, classify_json_job, heavy, translate_job
from service.api.rest_stream import translate_stream, wants_stream
from service.api.routes import ServerDep, direct_post, server_from
from service.api.schemas import (
    ClassifyOptions,
    ClassifyRequest,
    ClassifyResponse,
    ModelInfo,
    ModelList,
    TranslateRequest,
    TranslateResponse,
)
from service.api.server import Server
from service.errors import InvalidInput, NotReady, validation_message
from service.inference.jobs import ClassifyJob

router = APIRouter()

# -- health -------------------------------------------------------------------------------------


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "live"}


@router.get("/readyz", summary="Readiness: every model loaded and warmed up")
async def readyz(server: ServerDep) -> JSONResponse:
    if not await server.is_ready():
        raise NotReady(server.unready)
    # .get: a Ray model deployment serving nothing yet answers its info without it
    warmup = {name: info.get("warmup_ms") for name, info in sorted(server.model_info.items())}
    return JSONResponse({"status": "ready", "models": sorted(server.models), "warmup_ms": warmup})


# -- models -------------------------------------------------------------------------------------


@router.get("/v1/models", response_model=ModelList, summary="The served models")
async def list_models(server: ServerDep) -> ModelList:
    await server.is_ready()  # fills model_info (a model still loading leaves its fields null)
    return ModelList(
        models=[_model_info(server, n) for n in sorted(server.entries)], rejected=server.rejected
    )


@router.get("/v1/models/{name}", response_model=ModelInfo, summary="One model")
async def get_model(server: ServerDep, name: str) -> ModelInfo:
    server.resolve(name)
    await server.is_ready()
    return _model_info(server, name)


def _model_info(server: Server, name: str) -> ModelInfo:
    m = server.entries[name].manifest
    info = server.model_info.get(name, {})
    languages = (
        {"source": m.translation.source_language, "target": m.translation.target_language}
        if m.translation
        else None
    )
    return ModelInfo(
        name=m.name, version=m.version, task=m.task, family=m.family, description=m.description,
        labels=m.image.labels if m.image else None, languages=languages, eval=m.eval,
        max_source_tokens=m.translation.max_source_tokens if m.translation else None,
        max_target_tokens=m.translation.max_target_tokens if m.translation else None,
        providers=info.get("providers"), max_batch_size=info.get("max_batch_size"),
    )  # fmt: skip


# -- inference ----------------------------------------------------------------------------------


@direct_post(
    router,
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
    server = server_from(request)
    with server.refusals(name, "translate"):
        server.resolve(name, "translation")  # an unknown model is 404 whatever its body, as classify's
        if not json_media(ctype := request.headers.get("content-type", "")):
            raise InvalidInput(f"content-type: expected application/json, got {ctype!r}")
        raw = await server.read_body(request)
        try:
            body = await json_body.off_loop(
                json_body.heavy(len(raw)),
                lambda: translate_request(raw, server.settings.limits.max_json_values),
            )
        except ValidationError as exc:
            refusal = limits.over_ceiling(exc, server.settings.limits)
            raise refusal or InvalidInput(validation_message(exc)) from exc
        job = translate_job(body)
    if wants_stream(body, request.headers.get("accept", "")):
        return await translate_stream(server, name, body, job)
    _, [answer], elapsed_ms = await server.predict_many(name, "translation", "translate", [job])
    if heavy(answer, body):  # PNGs drawn, or many values written, in a thread: the loop free meanwhile
        content = await asyncio.to_thread(answer_json, answer, body, elapsed_ms)
    else:
        content = answer_json(answer, body, elapsed_ms)
    return Response(content, media_type="application/json")


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


@direct_post(
    router, "/v1/models/{name}/classify", response_model=ClassifyResponse, openapi_extra=_CLASSIFY_BODY
)
async def classify(request: Request, name: str) -> Response:
    server = server_from(request)
    with server.refusals(name, "classify"):
        server.resolve(name, "image-classification")
        options, job = await _classify_body(server, request)
    _, [answer], elapsed_ms = await server.predict_many(name, "image-classification", "classify", [job])
    if heavy(answer, options):  # PNGs drawn, or many values written, in a thread: the loop free meanwhile
        content = await asyncio.to_thread(answer_json, answer, options, elapsed_ms)
    else:
        content = answer_json(answer, options, elapsed_ms)
    return Response(content, media_type="application/json")


def translate_request(raw: bytes, max_values: int) -> TranslateRequest:
    """A translate body, parsed (:mod:`service.api.json_body`: on the loop or in a thread)."""
    json_body.check_values(raw, max_values)
    return TranslateRequest.model_validate_json(raw)


def classify_request(raw: bytes, max_values: int) -> tuple[ClassifyRequest, ClassifyJob]:
    """A JSON classify body and its job, parsed as :func:`translate_request` is."""
    json_body.check_values(raw, max_values)
    body = ClassifyRequest.model_validate_json(raw)
    return body, classify_json_job(body)


def json_media(ctype: str) -> bool:
    """Whether a body of Content-Type ``ctype`` is read as JSON, by FastAPI's rule: none given,
    ``application/json`` or any ``application/*+json``, in any case (RFC 9110 §8.3.1). Not
    ``text/plain`` nor a form: a web page can send those to a local service without a CORS
    preflight, which FastAPI's body parsing refuses for that reason (0.65.2) and the direct routes,
    reading their bodies themselves, had let through."""
    media = media_type(ctype)
    return (
        not ctype
        or media == "application/json"
        or (media.startswith("application/") and media.endswith("+json"))
    )


def media_type(ctype: str) -> str:
    """A Content-Type's media type, without parameters, in lower case: media types are
    case-insensitive (RFC 9110 §8.3.1)."""
    return ctype.partition(";")[0].strip().lower()


async def _classify_body(server: Server, request: Request) -> tuple[ClassifyOptions, ClassifyJob]:
    ctype = request.headers.get("content-type", "")
    try:
        if media_type(ctype) == "multipart/form-data":
            form = forms.parse(await server.read_body(request), ctype, max_fields=16, max_files=1)
            image = form.files.get("file")
            if image is None:
                raise InvalidInput("file: a multipart upload named 'file' is required")
            options = ClassifyOptions.model_validate(form.fields)
            return options, classify_job(options, image=image, field="file")
        if json_media(ctype):
            raw = await server.read_body(request)
            return await json_body.off_loop(
                json_body.heavy(len(raw)),
                lambda: classify_request(raw, server.settings.limits.max_json_values),
            )
    except ValidationError as exc:
        raise InvalidInput(validation_message(exc)) from exc
    except (json.JSONDecodeError, UnicodeDecodeError, AssertionError) as exc:
        raise InvalidInput(f"body: {type(exc).__name__}") from exc
    raise InvalidInput(f"content-type: expected application/json or multipart/form-data, got {ctype!r}")
