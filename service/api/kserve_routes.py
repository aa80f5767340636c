"""KServe v2 HTTP routes (same port as the REST API): an APIRouter that ``create_app`` includes.

GET  /v2/health/live | /v2/health/ready | /v2
GET  /v2/models/{name}[/versions/{version}][/ready]
POST /v2/models/{name}[/versions/{version}]/infer      JSON or binary tensor data extension
Triton's extensions (``service/api/triton_extensions.py``):
GET  /v2/models/{name}[/versions/{version}]/config     model configuration
GET  /v2/models[/{name}[/versions/{version}]]/stats    statistics
POST /v2/repository/index                              repository index
"""

from enum import Enum
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service.api import json_body, kserve, kserve_http, triton_extensions
from service.api.limits import tensor_items
from service.api.routes import ServerDep, direct_post, error_response, server_from
from service.errors import NotReady
from service.inference.repository import ModelEntry

V2_TAGS: list[str | Enum] = ["KServe v2"]
router = APIRouter(tags=V2_TAGS)


@router.get("/v2/health/live")
async def v2_live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready")
async def v2_ready(server: ServerDep) -> JSONResponse:
    if not await server.is_ready():
        raise NotReady(server.unready)
    return JSONResponse({"ready": True})


@router.get("/v2")
async def v2_server() -> dict[str, Any]:
    return {"name": kserve.SERVER_NAME, "version": kserve.SERVER_VERSION, "extensions": kserve.EXTENSIONS}


@router.get("/v2/models/stats")  # before /v2/models/{name}, which would take "stats" for a name
@router.get("/v2/models/{name}/stats")
@router.get("/v2/models/{name}/versions/{version}/stats")
async def v2_stats(server: ServerDep, name: str | None = None, version: str | None = None) -> dict[str, Any]:
    return await triton_extensions.served_statistics(server, name, version)


@router.get("/v2/models/{name}/config")
@router.get("/v2/models/{name}/versions/{version}/config")
async def v2_config(server: ServerDep, name: str, version: str | None = None) -> dict[str, Any]:
    return await triton_extensions.served_config(server, name, version)


@router.post("/v2/repository/index")
async def v2_repository_index(server: ServerDep, request: Request) -> list[dict[str, Any]]:
    """Triton's index; the body may be empty or ``{"ready": true}`` (served models only)."""
    ready_only = kserve_http.ready_flag(
        await server.read_body(request), server.settings.limits.max_json_values
    )
    return await triton_extensions.served_index(server, ready_only)


@router.get("/v2/models/{name}")
@router.get("/v2/models/{name}/versions/{version}")
async def v2_model(server: ServerDep, name: str, version: str | None = None) -> dict[str, Any]:
    return kserve.metadata(server.resolve(name, None, version).manifest, server.settings.limits)


@router.get("/v2/models/{name}/ready")
@router.get("/v2/models/{name}/versions/{version}/ready")
async def v2_model_ready(server: ServerDep, name: str, version: str | None = None) -> JSONResponse:
    entry = server.resolve(name, None, version)
    if not await server.is_ready():
        return error_response(400, f"model {name!r} is not ready")
    return JSONResponse({"name": entry.name, "ready": True})


@direct_post(router, "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")
async def v2_infer(request: Request, name: str, version: str | None = None) -> Response:
    server = server_from(request)
    with server.refusals(name, "v2_infer"):
        entry: ModelEntry = server.resolve(name, None, version)
        body = await server.read_body(request)
        limits = server.settings.limits
        length = request.headers.get(kserve_http.HEADER_LENGTH)

        def parse() -> tuple[kserve_http.InferRequest, kserve.Prepared]:
            parsed = kserve_http.parse_request(body, length, tensor_items(limits), limits.max_json_values)
            inputs, outputs = parsed.inputs, parsed.outputs
            params, classes = parsed.parameters, parsed.classification
            prepared = kserve.prepare(entry.manifest, inputs, params, outputs, classes, limits, parsed.binary)
            return parsed, prepared

        # the JSON part decides: a binary request's tensors are not parsed value by value
        heavy = json_body.heavy(kserve_http.json_length(body, length))
        parsed, prepared = await json_body.off_loop(heavy, parse)
    _, answers, _ = await server.predict_many(name, None, "v2_infer", prepared.jobs, version)

    def encode() -> tuple[bytes, dict[str, str]]:
        tensors = kserve.to_outputs(answers, prepared)
        # the version that answered: a newer one may have been swapped in since the lookup above
        return kserve_http.encode_response(entry.name, answers[0].version, parsed, tensors)

    content, headers = await json_body.off_loop(json_body.answer_values(answers) >= json_body.SLICE, encode)
    return Response(content=content, headers=headers)
