"""The service's error tree and the one table mapping it to HTTP statuses and gRPC codes.

::

    ServiceError                       500  INTERNAL
    ├── InvalidInput                   422  INVALID_ARGUMENT   a field is wrong (named in the message)
    │   ├── PayloadTooLarge            413  INVALID_ARGUMENT   bytes / pixels / list length over a limit
    │   │   └── BodyTooLarge           413  —                  HTTP body cut at the limit, connection closed
    │   ├── ResponseTooLarge           422  INVALID_ARGUMENT   the answer asked for would exceed its limit
    │   └── UnsupportedEncoding        415  —                  a body's Content-Encoding is not gzip / deflate
    ├── ModelNotFound                  404  NOT_FOUND          unknown model or version
    ├── WrongTask                      400  INVALID_ARGUMENT   e.g. /translate on an image model
    ├── Unauthorized                   401  UNAUTHENTICATED    no or wrong bearer token (when one is set)
    ├── CrossOrigin                    403  —                  a browser's POST from another site's page
    ├── Overloaded                     503  RESOURCE_EXHAUSTED queue full; Retry-After is set
    ├── DeadlineExceeded               504  DEADLINE_EXCEEDED  the request's timeout passed
    ├── NotReady                       503  UNAVAILABLE        models still loading / warming up
    │   └── Stopping                   503  UNAVAILABLE        the service is stopping; Retry-After is set
    ├── InferenceFailed                500  INTERNAL           the runtime raised (for all callers of a batch)
    └── InternalError                  500  INTERNAL           anything unexpected, logged under a request id

Library errors are wrapped with ``raise … from exc`` at the boundary where they are understood;
nothing else is caught and turned into "carry on". What nobody expected reaches the protocol's
edge, where :func:`unexpected` turns it into an :class:`InternalError`: the client gets a JSON
500 (or gRPC INTERNAL) naming a request id, and the log has the traceback under that id.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Protocol

log = logging.getLogger("ray.serve")


class _HasErrors(Protocol):
    def errors(self) -> Any: ...


#: the problems of one validation error a message names (the rest counted)
MAX_PROBLEMS = 20


def validation_message(exc: _HasErrors) -> str:
    """A pydantic/FastAPI validation error as one line per problem, each naming its field
    (``beam_size: Input should be greater than or equal to 1``) — the same text for every protocol;
    past :data:`MAX_PROBLEMS` problems, how many more."""
    parts = []
    errors = exc.errors()
    for err in errors[:MAX_PROBLEMS]:
        loc = [str(p) for p in err["loc"] if p != "body"]
        if not loc and err["type"] == "value_error" and "error" in err.get("ctx", {}):
            # a model validator's own message, which names its field
            parts.append(str(err["ctx"]["error"]))
            continue
        parts.append(f"{'.'.join(loc or ['body'])}: {err['msg']}")
    if len(errors) > MAX_PROBLEMS:
        parts.append(f"{len(errors) - MAX_PROBLEMS} more problems")
    return "; ".join(parts)


#: the longest error message answered: a gRPC status message travels in a trailer, and one over
#: 16 KiB (a client's 20 KB tensor name, repeated) reached the client as RESOURCE_EXHAUSTED
MAX_MESSAGE_CHARS = 2000


class ServiceError(Exception):
    http_status = 500
    grpc_code = "INTERNAL"
    #: seconds a client should wait before retrying (HTTP's Retry-After), where a retry helps
    retry_after_s: int | None = None

    def __init__(self, message: str) -> None:
        if len(message) > MAX_MESSAGE_CHARS:  # it may repeat what a client sent (a tensor's name…)
            message = f"{message[:MAX_MESSAGE_CHARS]}… ({len(message)} characters)"
        super().__init__(message)
        self.message = message


class InvalidInput(ServiceError):
    http_status = 422
    grpc_code = "INVALID_ARGUMENT"


class PayloadTooLarge(InvalidInput):
    http_status = 413


class BodyTooLarge(PayloadTooLarge):
    pass


class ResponseTooLarge(InvalidInput):
    pass


class UnsupportedEncoding(InvalidInput):
    http_status = 415


class ModelNotFound(ServiceError):
    http_status = 404
    grpc_code = "NOT_FOUND"


class WrongTask(ServiceError):
    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class Unauthorized(ServiceError):
    http_status = 401
    grpc_code = "UNAUTHENTICATED"


class CrossOrigin(ServiceError):
    """HTTP only (``service/api/cross_origin.py``): browsers do not speak gRPC."""

    http_status = 403
    grpc_code = "PERMISSION_DENIED"


class Overloaded(ServiceError):
    http_status = 503
    grpc_code = "RESOURCE_EXHAUSTED"
    retry_after_s = 1


class DeadlineExceeded(ServiceError):
    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"


class NotReady(ServiceError):
    http_status = 503
    grpc_code = "UNAVAILABLE"
    retry_after_s = 1  # loading, or moved to a new version mid-request: retry


class Stopping(NotReady):
    retry_after_s = 1


class InferenceFailed(ServiceError):
    pass


class InternalError(ServiceError):
    def __init__(self, request_id: str) -> None:
        super().__init__(f"internal error (request id {request_id}; the service log has the details)")
        self.request_id = request_id


def unexpected(exc: BaseException, where: str) -> InternalError:
    """Log ``exc`` with its traceback under a new request id; the error to answer with."""
    request_id = uuid.uuid4().hex[:16]
    log.error("request %s failed unexpectedly (%s)", request_id, where, exc_info=exc)
    return InternalError(request_id)
