"""Routing to the models: the state and the calls every protocol's ingress shares.

REST (``service/rest_routes.py``), KServe v2 HTTP (``service/kserve_routes.py``) and gRPC
(``service/grpc_ingress.py``) resolve a model with :meth:`ModelRouter.resolve` and send requests
with :meth:`ModelRouter.predict_many`, so deadlines, overload and metrics are the same whatever
the protocol and whatever the frontend: a model is a :class:`Model` — a worker in this process
(in-replica frontend) or a :class:`RemoteModel` deployment handle (Ray-ingress frontends).
"""

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, Protocol

from fastapi import Request
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from service.errors import (
    BodyTooLarge,
    DeadlineExceeded,
    ModelNotFound,
    Overloaded,
    ServiceError,
    WrongTask,
)
from service.metrics import IngressMetrics
from service.repository import ModelEntry
from service.settings import Settings

#: the status recorded for a request whose client disconnected before its answer
CLIENT_CLOSED = 499


class Model(Protocol):
    def predict(self, request: Any) -> Awaitable[dict[str, Any]]: ...

    def info(self) -> Awaitable[dict[str, Any]]: ...


class RemoteModel:
    """A model deployment reached through its handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def predict(self, request: Any) -> dict[str, Any]:
        answer = await self.handle.predict.remote(request)
        if isinstance(answer, ServiceError):  # a refusal travels as a value (ModelDeployment.predict)
            raise answer
        return answer

    def info(self) -> Awaitable[dict[str, Any]]:
        return self.handle.info.remote()


class ModelRouter:
    def __init__(
        self,
        models: dict[str, Model],
        entries: dict[str, ModelEntry],
        rejected: dict[str, str],
        settings: Settings,
    ) -> None:
        self.models = models
        self.entries = entries
        self.rejected = rejected
        self.settings = settings
        self.metrics = IngressMetrics(settings.latency_buckets_s)
        self.model_info: dict[str, dict[str, Any]] = {}
        # the body limit: the largest image, base64-encoded, plus room for the JSON around it
        self.max_body = settings.limits.max_image_bytes * 4 // 3 + 64 * 1024

    def check_declared_length(self, request: Request) -> None:
        """Refuse a body whose Content-Length is over the limit before reading any of it."""
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_body:
            raise BodyTooLarge(f"body: {length} bytes exceed the limit of {self.max_body}")

    async def read_body(self, request: Request) -> bytes:
        """The whole body, under the limit whether or not its length was declared: a chunked
        body is read as it streams and cut with 413 at the limit, never held whole beyond it.
        Kept on the request (as Starlette's ``body()`` keeps it) for whoever reads it next."""
        self.check_declared_length(request)
        if hasattr(request, "_body"):
            return await request.body()
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise BodyTooLarge(f"body: more than the limit of {self.max_body} bytes")
            chunks.append(chunk)
        request._body = body = b"".join(chunks)
        return body

    async def is_ready(self) -> bool:
        try:
            await asyncio.wait_for(self._load_info(), timeout=5)
        except Exception:  # a model that does not answer its info call is not ready
            return False
        return True

    async def _load_info(self) -> None:
        missing = [n for n in self.models if n not in self.model_info]
        infos = await asyncio.gather(*(self.models[n].info() for n in missing))
        self.model_info.update(zip(missing, infos, strict=True))

    def resolve(self, name: str, task: str | None = None, version: str | None = None) -> ModelEntry:
        """The served model ``name`` (at ``version``, when given) — a dictionary lookup, so no
        name a client sends can reach the file system."""
        entry = self.entries.get(name)
        if entry is None:
            raise ModelNotFound(f"model {name!r} not found; available: {sorted(self.entries)}")
        if version not in (None, "", str(entry.version)):
            raise ModelNotFound(f"model {name!r} has no version {version!r}; serving version {entry.version}")
        if task and entry.manifest.task != task:
            raise WrongTask(f"model {name!r} is a {entry.manifest.task} model, not {task}")
        return entry

    async def predict_many(
        self, name: str, task: str | None, route: str, requests: list[Any], version: str | None = None
    ) -> tuple[ModelEntry, list[dict[str, Any]], float]:
        """Send requests to a model's deployment concurrently (they batch there), with the
        deadline and overload mapping every protocol shares; record the request metrics."""
        start = time.perf_counter()
        status = 500
        try:
            entry = self.resolve(name, task, version)
            timeout = self.settings.limits.request_timeout_s
            model = self.models[name]
            try:
                async with asyncio.timeout(timeout):  # on expiry the calls are cancelled
                    if len(requests) == 1:  # the common case, without gather's extra tasks
                        answers = [await model.predict(requests[0])]
                    else:
                        answers = list(await asyncio.gather(*(model.predict(r) for r in requests)))
            except BackPressureError as exc:
                raise Overloaded(f"model {name!r} is overloaded; retry later") from exc
            except TimeoutError as exc:  # the cancelled calls free their places in the batch
                raise DeadlineExceeded(f"model {name!r} did not answer within {timeout} s") from exc
            status = 200
        except ServiceError as exc:
            status = exc.http_status
            raise
        except asyncio.CancelledError:  # the client went away (nginx's 499): not a server error
            status = CLIENT_CLOSED
            raise
        finally:
            label = name if name in self.entries else "_unknown"
            self.metrics.record(label, route, status, time.perf_counter() - start)
        return entry, answers, round((time.perf_counter() - start) * 1000, 3)
