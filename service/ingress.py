"""The HTTP ingress: a FastAPI app that validates, routes to the model deployments, and answers.

It translates HTTP into the runners' request types and back; it computes nothing itself. Errors
from anywhere below arrive as :mod:`service.errors` types and leave as ``{"error": "..."}`` with
the status from the error table.
"""

import asyncio
import json
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from service.errors import (
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    WrongTask,
)
from service.metrics import IngressMetrics
from service.repository import ModelEntry
from service.schemas import (
    ClassifyOptions,
    ClassifyRequest,
    ClassifyResponse,
    ErrorBody,
    ModelInfo,
    ModelList,
    TranslateRequest,
    TranslateResponse,
)
from service.settings import Settings

app = FastAPI(
    title="attention-serve",
    description='Attention models with their attention maps. Errors are `{"error": "..."}`.',
    version="0.1.0",
    responses={code: {"model": ErrorBody} for code in (400, 404, 413, 422, 503, 504)},
)


def validation_message(exc: RequestValidationError | ValidationError) -> str:
    """One line per problem, each naming its field: ``body.beam_size: Input should be ≤ 64``."""
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if p not in ("body",)] or ["body"]
        parts.append(f"{'.'.join(loc)}: {err['msg']}")
    return "; ".join(parts)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@app.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, validation_message(exc))


@app.exception_handler(ServiceError)
async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, Overloaded) else None
    return error_response(exc.http_status, exc.message, headers)


@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(self, handles: dict[str, DeploymentHandle], entries: dict[str, ModelEntry],
                 rejected: dict[str, str], settings: Settings) -> None:  # fmt: skip
        self.handles = handles
        self.entries = entries
        self.rejected = rejected
        self.settings = settings
        self.metrics = IngressMetrics(settings.latency_buckets_s)
        self._info: dict[str, dict[str, Any]] = {}
        # the body limit: the largest image, base64-encoded, plus room for the JSON around it
        self.max_body = settings.limits.max_image_bytes * 4 // 3 + 64 * 1024

    # -- health -------------------------------------------------------------------------------

    @app.get("/healthz", summary="Liveness")
    async def healthz(self) -> dict[str, str]:
        return {"status": "live"}

    @app.get("/readyz", summary="Readiness: every model loaded and warmed up")
    async def readyz(self) -> JSONResponse:
        try:
            await asyncio.wait_for(self._load_info(), timeout=5)
        except (TimeoutError, Exception) as exc:  # any model not answering means not ready
            return error_response(503, f"not ready: {type(exc).__name__}")
        warmup = {name: info["warmup_ms"] for name, info in sorted(self._info.items())}
        return JSONResponse({"status": "ready", "models": sorted(self.handles), "warmup_ms": warmup})

    async def _load_info(self) -> None:
        missing = [n for n in self.handles if n not in self._info]
        infos = await asyncio.gather(*(self.handles[n].info.remote() for n in missing))
        self._info.update(zip(missing, infos, strict=True))

    # -- models -------------------------------------------------------------------------------

    @app.get("/v1/models", response_model=ModelList, summary="The served models")
    async def list_models(self) -> ModelList:
        return ModelList(models=[self._model_info(n) for n in sorted(self.entries)], rejected=self.rejected)

    @app.get("/v1/models/{name}", response_model=ModelInfo, summary="One model")
    async def get_model(self, name: str) -> ModelInfo:
        self._entry(name)
        return self._model_info(name)

    def _model_info(self, name: str) -> ModelInfo:
        m = self.entries[name].manifest
        info = self._info.get(name, {})
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

    def _entry(self, name: str, task: str | None = None) -> ModelEntry:
        entry = self.entries.get(name)
        if entry is None:
            raise ModelNotFound(f"model {name!r} not found; available: {sorted(self.entries)}")
        if task and entry.manifest.task != task:
            raise WrongTask(f"model {name!r} is a {entry.manifest.task} model, not {task}")
        return entry

    # -- inference ----------------------------------------------------------------------------

    @app.post(
        "/v1/models/{name}/translate", response_model=TranslateResponse, response_model_exclude_none=True
    )
    async def translate(self, name: str, body: TranslateRequest) -> dict[str, Any]:
        return await self._predict(name, "translation", "translate", body)

    @app.post(
        "/v1/models/{name}/classify",
        response_model=ClassifyResponse,
        response_model_exclude_none=True,
        openapi_extra={
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
        },
    )
    async def classify(self, name: str, request: Request) -> dict[str, Any]:
        self._entry(name, "image-classification")
        return await self._predict(
            name, "image-classification", "classify", await self._classify_body(request)
        )

    async def _classify_body(self, request: Request) -> ClassifyRequest | tuple[ClassifyOptions, bytes]:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_body:
            raise PayloadTooLarge(f"body: {length} bytes exceed the limit of {self.max_body}")
        ctype = request.headers.get("content-type", "")
        try:
            if ctype.startswith("multipart/form-data"):
                form = await request.form(max_files=1, max_fields=16, max_part_size=self.max_body)
                upload = form.get("file")
                if upload is None or isinstance(upload, str):
                    raise InvalidInput("file: a multipart upload named 'file' is required")
                options = ClassifyOptions.model_validate({k: v for k, v in form.items() if k != "file"})
                return options, await upload.read()
            if ctype.startswith("application/json") or not ctype:
                body = await request.body()
                if len(body) > self.max_body:
                    raise PayloadTooLarge(f"body: {len(body)} bytes exceed the limit of {self.max_body}")
                return ClassifyRequest.model_validate_json(body)
        except ValidationError as exc:
            raise InvalidInput(validation_message(exc)) from exc
        except (json.JSONDecodeError, UnicodeDecodeError, AssertionError) as exc:
            raise InvalidInput(f"body: {type(exc).__name__}") from exc
        raise InvalidInput(f"content-type: expected application/json or multipart/form-data, got {ctype!r}")

    async def _predict(self, name: str, task: str, route: str, request: Any) -> dict[str, Any]:
        start = time.perf_counter()
        status = 500
        try:
            entry = self._entry(name, task)
            timeout = self.settings.limits.request_timeout_s
            try:
                answer = await asyncio.wait_for(self.handles[name].predict.remote(request), timeout)
            except BackPressureError as exc:
                raise Overloaded(f"model {name!r} is overloaded; retry later") from exc
            except TimeoutError as exc:  # the cancelled call frees its place in the replica's batch
                raise DeadlineExceeded(f"model {name!r} did not answer within {timeout} s") from exc
            status = 200
        except ServiceError as exc:
            status = exc.http_status
            raise
        finally:
            self.metrics.record(
                name if name in self.entries else "_unknown", route, status, time.perf_counter() - start
            )
        answer["metrics"]["total_ms"] = round((time.perf_counter() - start) * 1000, 3)
        return {"model": entry.name, "version": entry.version, **answer}
