"""The FastAPI application object and the error handlers every HTTP route shares.

Routes are attached by ``service/ingress.py`` (REST) and ``service/kserve_routes.py`` (KServe
v2); every error leaves as ``{"error": "..."}`` — the v2 protocol's shape, and tritonclient's
expectation — with the status from the table in ``service/errors.py``.
"""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service.errors import Overloaded, ServiceError, validation_message
from service.schemas import ErrorBody

app = FastAPI(
    title="attention-serve",
    description='Attention models with their attention maps. Errors are `{"error": "..."}`.',
    version="0.1.0",
    responses={code: {"model": ErrorBody} for code in (400, 404, 413, 422, 503, 504)},
)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@app.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, validation_message(exc))


@app.exception_handler(ServiceError)
async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, Overloaded) else None
    return error_response(exc.http_status, exc.message, headers)
