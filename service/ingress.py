"""The HTTP ingress: a FastAPI app that validates, routes to the model deployments, and answers.

It translates HTTP into the runners' request types and back; it computes nothing itself. Errors
from anywhere below arrive as :mod:`service.errors` types and leave as ``{"error": "..."}`` with
the status from the error table.
"""

import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve

from service import kserve_routes  # noqa: F401  (registers the /v2 routes on the app)
from service.errors import InvalidInput, NotReady, validation_message
from service.grpc_ingress import GRPCMethods
from service.http_app import app
from service.schemas import (
    ClassifyOptions,
    ClassifyRequest,
    ClassifyResponse,
    ModelInfo,
    ModelList,
    TranslateRequest,
    TranslateResponse,
)


@serve.deployment
@serve.ingress(app)
class Ingress(GRPCMethods):
    """REST routes here; gRPC methods from the mixin; KServe v2 HTTP routes in kserve_routes."""

    # -- health -------------------------------------------------------------------------------

    @app.get("/healthz", summary="Liveness")
    async def healthz(self) -> dict[str, str]:
        return {"status": "live"}

    @app.get("/readyz", summary="Readiness: every model loaded and warmed up")
    async def readyz(self) -> JSONResponse:
        if not await self.is_ready():
            raise NotReady("not ready: models are still loading")
        warmup = {name: info["warmup_ms"] for name, info in sorted(self._info.items())}
        return JSONResponse({"status": "ready", "models": sorted(self.handles), "warmup_ms": warmup})

    # -- models -------------------------------------------------------------------------------

    @app.get("/v1/models", response_model=ModelList, summary="The served models")
    async def list_models(self) -> ModelList:
        return ModelList(models=[self._model_info(n) for n in sorted(self.entries)], rejected=self.rejected)

    @app.get("/v1/models/{name}", response_model=ModelInfo, summary="One model")
    async def get_model(self, name: str) -> ModelInfo:
        self.resolve(name)
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
        self.resolve(name, "image-classification")
        return await self._predict(
            name, "image-classification", "classify", await self._classify_body(request)
        )

    async def _classify_body(self, request: Request) -> ClassifyRequest | tuple[ClassifyOptions, bytes]:
        self.check_declared_length(request)
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
                return ClassifyRequest.model_validate_json(await self.read_body(request))
        except ValidationError as exc:
            raise InvalidInput(validation_message(exc)) from exc
        except (json.JSONDecodeError, UnicodeDecodeError, AssertionError) as exc:
            raise InvalidInput(f"body: {type(exc).__name__}") from exc
        raise InvalidInput(f"content-type: expected application/json or multipart/form-data, got {ctype!r}")

    async def _predict(self, name: str, task: str, route: str, request: Any) -> dict[str, Any]:
        entry, [answer], elapsed_ms = await self.predict_many(name, task, route, [request])
        answer["metrics"]["total_ms"] = elapsed_ms
        return {"model": entry.name, "version": entry.version, **answer}
