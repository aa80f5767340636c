"""KServe v2 HTTP routes on the shared FastAPI app (same port as the REST API).

GET  /v2/health/live | /v2/health/ready | /v2
GET  /v2/models/{name}[/versions/{version}][/ready]
POST /v2/models/{name}[/versions/{version}]/infer      JSON or binary tensor data extension
"""

from enum import Enum
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from service import kserve, kserve_http
from service.errors import NotReady
from service.http_app import Router, app, current_router, direct_post, error_response
from service.repository import ModelEntry

V2_TAGS: list[str | Enum] = ["KServe v2"]


@app.get("/v2/health/live", tags=V2_TAGS)
async def v2_live() -> dict[str, bool]:
    return {"live": True}


@app.get("/v2/health/ready", tags=V2_TAGS)
async def v2_ready(router: Router) -> JSONResponse:
    if not await router.is_ready():
        raise NotReady("not ready: models are still loading")
    return JSONResponse({"ready": True})


@app.get("/v2", tags=V2_TAGS)
async def v2_server() -> dict[str, Any]:
    return {"name": kserve.SERVER_NAME, "version": kserve.SERVER_VERSION, "extensions": kserve.EXTENSIONS}


@app.get("/v2/models/{name}", tags=V2_TAGS)
@app.get("/v2/models/{name}/versions/{version}", tags=V2_TAGS)
async def v2_model(router: Router, name: str, version: str | None = None) -> dict[str, Any]:
    return kserve.metadata(router.resolve(name, None, version).manifest)


@app.get("/v2/models/{name}/ready", tags=V2_TAGS)
@app.get("/v2/models/{name}/versions/{version}/ready", tags=V2_TAGS)
async def v2_model_ready(router: Router, name: str, version: str | None = None) -> JSONResponse:
    entry = router.resolve(name, None, version)
    if not await router.is_ready():
        return error_response(400, f"model {name!r} is not ready")
    return JSONResponse({"name": entry.name, "ready": True})


@direct_post("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer", tags=V2_TAGS)
async def v2_infer(request: Request, name: str, version: str | None = None) -> Response:
    router = await current_router()
    entry: ModelEntry = router.resolve(name, None, version)
    body = await router.read_body(request)
    parsed = kserve_http.parse_request(body, request.headers.get(kserve_http.HEADER_LENGTH))
    outputs = kserve.requested_outputs(entry.manifest, parsed.outputs, parsed.parameters)
    requests = kserve.to_requests(entry.manifest, parsed.inputs, parsed.parameters, outputs)
    _, answers, _ = await router.predict_many(name, None, "v2_infer", requests, version)
    tensors = kserve.to_outputs(entry.manifest, answers, outputs)
    content, headers = kserve_http.encode_response(entry.name, entry.version, parsed, tensors)
    return Response(content=content, headers=headers)
