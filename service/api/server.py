"""The one server object every protocol adapter calls: the served models and the calls they share.

REST (``service/api/rest.py``), KServe v2 HTTP (``service/api/kserve_routes.py``) and gRPC
(``service/api/grpc_servicer.py``) resolve a model with :meth:`Server.resolve` and send requests
with :meth:`Server.predict_many`, so deadlines, overload and request metrics are the same
whatever the protocol and whatever the hosting: a model is anything with ``predict`` and
``info`` — a worker in this process (``service/hosting/in_replica.py``) or a deployment handle
(``service/hosting/ray_ingress.py``). The hosting layer builds the server and hands it to
``create_app(server)`` and to the gRPC servicer; it swaps the served set with :meth:`Server.serve`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import Any, Protocol

from fastapi import Request
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from service.api import content_coding, limits
from service.errors import (
    BodyTooLarge,
    DeadlineExceeded,
    ModelNotFound,
    NotReady,
    ServiceError,
    Stopping,
    WrongTask,
)
from service.inference.callers import all_or_none
from service.inference.jobs import Answer, Tokens
from service.inference.repository import ModelEntry
from service.inference.statistics import Snapshot
from service.settings import Settings

#: the status recorded for a request whose client disconnected before its answer
CLIENT_CLOSED = 499
#: the key in a request's ASGI ``scope["state"]`` where the hosting's listener puts the status it
#: refused the request with while its body was coming (a body too slow, not HTTP): the request
#: is counted with that status, not as a client gone
REFUSED_WITH = "attention.refused_with"


class Model(Protocol):
    def predict(self, job: Any) -> Awaitable[Answer]: ...

    def stream(self, job: Any) -> AsyncIterator[Tokens | Answer]: ...

    def info(self) -> Awaitable[dict[str, Any]]: ...

    def stats(self) -> Awaitable[Snapshot]: ...


class RequestMetrics(Protocol):
    """Where the server records each answered request (the hosting layer exports them)."""

    def record(self, model: str, route: str, status: int, seconds: float) -> None: ...


class Server:
    def __init__(self, settings: Settings, metrics: RequestMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, Model] = {}
        self.entries: dict[str, ModelEntry] = {}
        self.rejected: dict[str, str] = {}
        self.model_info: dict[str, dict[str, Any]] = {}
        #: requests begun and not yet answered: predictions and streams (every protocol), and
        #: HTTP exchanges until their answer is written (``App``)
        self.in_flight = 0
        self.stopping = False  # set by drain(): new predictions are refused with 503
        self.leaving = False  # about to stop: readiness says no, predictions are still answered
        # the body limit: the largest image, base64-encoded, plus room for the JSON around it
        self.max_body = settings.limits.max_image_bytes * 4 // 3 + 64 * 1024

    def check_declared_length(self, request: Request) -> None:
        """Refuse a body whose Content-Length is over the limit before reading any of it."""
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_body:
            raise BodyTooLarge(f"body: {length} bytes exceed the limit of {self.max_body}")

    async def read_body(self, request: Request) -> bytes:
        """The whole body, under the limit whether or not its length was declared: a chunked
        body is read as it streams and cut with 413 at the limit, never held whole beyond it; a
        compressed one (``Content-Encoding``) is inflated under the same limit. Kept on the
        request (as Starlette's ``body()`` keeps it) for whoever reads it next."""
        if hasattr(request, "_body"):  # read already (and checked, by the first call)
            return await request.body()
        self.check_declared_length(request)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise BodyTooLarge(f"body: more than the limit of {self.max_body} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        coding = request.headers.get("content-encoding")
        if coding is not None:  # sent compressed: inflated under the same limit
            body = await content_coding.decode(body, coding, self.max_body)
        request._body = body
        return body

    def serve(
        self, models: Mapping[str, Model], entries: Mapping[str, ModelEntry], rejected: dict[str, str]
    ) -> None:
        """Serve this set from now on, in one synchronous step: a request sees either the old set
        or the new one, never a mix."""
        self.models, self.entries, self.rejected, self.model_info = dict(models), dict(entries), rejected, {}

    async def is_ready(self) -> bool:
        if self.stopping or self.leaving or not self.models:  # none: every model refused to load
            return False
        try:
            await asyncio.wait_for(self.load_info(), timeout=5)
        except Exception:  # a model that does not answer its info call is not ready
            return False
        return True

    @property
    def unready(self) -> str:
        """Why :meth:`is_ready` said no, for the readiness routes' 503."""
        if self.stopping:
            return "not ready: the service is stopping"
        if self.leaving:
            return "not ready: this replica is stopping (it answers for a few seconds more)"
        if not self.models:
            return "not ready: no model loads (see rejected)"
        return "not ready: models are still loading"

    async def drain(self, timeout_s: float, settle_s: float = 0.25) -> int:
        """Stop taking predictions — each new one is answered 503 ``Stopping`` (gRPC UNAVAILABLE)
        with Retry-After, and readiness says no — and wait up to ``timeout_s`` for those in flight
        to be answered, then ``settle_s`` more for the hosting to carry the last answers out
        (Ray ships a replica's reply to its proxy after the method returns). Returns how many
        were still in flight. For the Ray-ingress frontends, whose proxy would otherwise answer
        404 for the app's routes once it is deleted."""
        self.stopping = True
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(settle_s)
        return self.in_flight

    async def load_info(self) -> None:
        """Each model's runtime info (providers, batch size, warm-up time) in ``model_info``:
        asked of each model once per served set (a swap starts a new set)."""
        # this set's: a swap during the calls starts a new set, whose info these are not (the
        # Ray ingress left out a model that had not loaded while it was asked, and its info
        # stayed in the new set's for good)
        models, known = self.models, self.model_info
        missing = [n for n in models if n not in known]
        infos = await asyncio.gather(*(models[n].info() for n in missing))
        known.update(zip(missing, infos, strict=True))

    def resolve(self, name: str, task: str | None = None, version: str | None = None) -> ModelEntry:
        """The served model ``name`` (at ``version``, when given) — a dictionary lookup, so no
        name a client sends can reach the file system."""
        entry = self.entries.get(name)
        if entry is None:
            raise ModelNotFound(f"model {shown(name)} not found; available: {sorted(self.entries)}")
        # a version is a number, as Triton parses it: "01" is 1 (Python refuses to parse more
        # than 4,300 digits: a 500 before the length was looked at)
        if version and not (
            len(version) <= 20 and version.isascii() and version.isdigit() and int(version) == entry.version
        ):
            serving = entry.version
            raise ModelNotFound(f"model {name!r} has no version {shown(version)}; serving version {serving}")
        if task and entry.manifest.task != task:
            kind = entry.manifest.task
            article = "an" if kind[0] in "aeiou" else "a"
            raise WrongTask(f"model {name!r} is {article} {kind} model, not {task}")
        return entry

    async def statistics(self, name: str | None = None, version: str | None = None) -> list[Snapshot]:
        """Each served model's statistics (``name``: that model's, at ``version`` when given)."""
        names = [self.resolve(name, None, version).name] if name else sorted(self.entries)
        return list(await asyncio.gather(*(self.models[n].stats() for n in names)))

    async def predict_many(
        self, name: str, task: str | None, route: str, requests: list[Any], version: str | None = None
    ) -> tuple[ModelEntry, list[Answer], float]:
        """Send requests to a model's deployment concurrently (they batch there), with the
        deadline and overload mapping every protocol shares; record the request metrics."""
        with self._recorded(name, route) as start:
            entry = self.resolve(name, task, version)
            limits.check_count(requests, self.settings.limits)
            for request in requests:
                limits.check(request, self.settings.limits)
            limits.check_answer_total(entry, requests, self.settings.limits)
            timeout = self.settings.limits.request_timeout_s
            model = self.models[name]
            try:
                async with asyncio.timeout(timeout):  # on expiry the calls are cancelled
                    if len(requests) == 1:  # the common case, without gather's extra tasks
                        answers = [await model.predict(requests[0])]
                    else:
                        answers = await all_or_none([model.predict(r) for r in requests])
            except TimeoutError as exc:  # the cancelled calls free their places in the batch
                raise DeadlineExceeded(f"model {name!r} did not answer within {timeout} s") from exc
            if len(versions := sorted({a.version for a in answers})) > 1:
                # one answer names one version: jobs a swap split between two are refused, to be retried
                raise NotReady(f"model {name!r} moved from version {versions[0]} to {versions[-1]} while "
                               "this request was computed; retry it")  # fmt: skip
        return entry, answers, round((time.perf_counter() - start) * 1000, 3)

    async def stream(
        self, name: str, task: str | None, route: str, request: Any, version: str | None = None
    ) -> AsyncIterator[tuple[ModelEntry, Tokens | Answer, float]]:
        """One request's events — a translation's tokens as they are chosen, then its answer
        (``ModelWorker.stream``) — each with the model and the milliseconds since the request
        began, under the limits, deadline and request metrics of :meth:`predict_many`. The deadline
        covers the whole stream. Closing the iterator early (the client left) cancels the request;
        closing it once the answer was yielded (a writer that stops after the last event) is
        recorded as answered (200)."""
        with self._recorded(name, route) as start:
            events: AsyncIterator[Tokens | Answer] | None = None
            deadline = _Deadline(self.settings.limits.request_timeout_s)
            try:
                entry = self.resolve(name, task, version)
                limits.check(request, self.settings.limits)
                events = self.models[name].stream(request)
                while True:
                    try:
                        async with deadline:  # around each wait alone: never around a yield
                            event = await anext(events)
                    except StopAsyncIteration:
                        break
                    except TimeoutError as exc:  # the cancelled wait ended the model's stream
                        raise DeadlineExceeded(
                            f"model {name!r} did not answer within {deadline.timeout_s} s"
                        ) from exc
                    try:
                        yield entry, event, round((time.perf_counter() - start) * 1000, 3)
                    except GeneratorExit:
                        if isinstance(event, Answer):  # closed once its answer is out: answered
                            return
                        raise  # closed before its answer: the client left (499)
            finally:
                deadline.close()
                if events is not None:
                    await events.aclose()  # type: ignore[attr-defined]

    def refusals(self, name: str, route: str, scope: Mapping[str, Any] | None = None) -> _Refusals:
        """Around what a protocol does before :meth:`predict_many` or :meth:`stream` — reading
        the body, finding the model, decoding the request: a request refused there (a body too
        large, a malformed body or tensor, a schema error, an unknown model) is counted in the
        request metrics like one refused later (422 for a schema's ``ValidationError``, which the
        protocol then maps itself), and one whose client left while sending it as 499 — or as
        the status the listener refused it with (``scope["state"][REFUSED_WITH]``)."""
        return _Refusals(self, name, route, scope)

    def _recorded(self, name: str, route: str) -> _Recorded:
        """One request's status and time in the request metrics, whichever way it ends: 200, the
        service error's status, 499 for a client gone (nginx's code: not a server error; a stream
        closed early too), else 500. Gives when the request began (``time.perf_counter()``)."""
        return _Recorded(self, name, route)

    def _record(self, name: str, route: str, status: int, start: float) -> None:
        """One request in the request metrics: a name that is not served counts as ``_unknown``
        (a client cannot create series)."""
        label = name if name in self.entries else "_unknown"
        self.metrics.record(label, route, status, time.perf_counter() - start)


class _Refusals:
    """:meth:`Server.refusals`. Context managers on every request's path are objects, not
    generators: a generator-based one cost ≈ 1.2 µs more per use, and a request uses several."""

    __slots__ = ("name", "route", "scope", "server", "start")

    def __init__(self, server: Server, name: str, route: str, scope: Mapping[str, Any] | None) -> None:
        self.server, self.name, self.route, self.scope = server, name, route, scope
        self.start = time.perf_counter()

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, ServiceError | ValidationError):
            status = exc.http_status if isinstance(exc, ServiceError) else 422
            self.server._record(self.name, self.route, status, self.start)
        elif isinstance(exc, ClientDisconnect):
            refused = (self.scope or {}).get("state", {}).get(REFUSED_WITH)
            self.server._record(self.name, self.route, refused or CLIENT_CLOSED, self.start)


class _Recorded:
    """:meth:`Server._recorded` (an object, as :class:`_Refusals`)."""

    __slots__ = ("name", "route", "server", "start")

    def __init__(self, server: Server, name: str, route: str) -> None:
        self.server, self.name, self.route = server, name, route
        self.start = time.perf_counter()

    def __enter__(self) -> float:
        if self.server.stopping:
            refused = Stopping("the service is stopping; retry (another instance answers)")
            self.server._record(self.name, self.route, refused.http_status, self.start)
            raise refused
        self.server.in_flight += 1
        return self.start

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.server.in_flight -= 1
        if exc is None:
            status = 200
        elif isinstance(exc, ServiceError):
            status = exc.http_status
        elif isinstance(exc, asyncio.CancelledError | GeneratorExit):
            status = CLIENT_CLOSED
        else:
            status = 500
        self.server._record(self.name, self.route, status, self.start)


def shown(text: str, limit: int = 80) -> str:
    """A client's string as an error message repeats it: quoted, cut after ``limit`` characters
    (a model name in a URL may be 64 KiB long; a gRPC status message over 16 KiB reached the
    client as RESOURCE_EXHAUSTED instead of the error)."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}… ({len(text)} characters)"


class _Deadline:
    """One deadline for a whole stream, entered around each wait for the model (never around a
    yield to the stream's reader): a wait still pending when it passes is cancelled and leaves
    as ``TimeoutError``, a wait entered after it fails at once. ``asyncio.timeout`` does the same
    around one wait; a stream has one wait per event, and one timer for all of them costs less
    than a timer scheduled and cancelled per event (``asyncio.timeout_at`` each time).

    A cancellation from anyone else (the client left) passes through unchanged, even when it
    coincides with the deadline — the rule ``asyncio.timeout`` follows (``Task.uncancel``)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = loop.call_at(loop.time() + timeout_s, self._expire)
        self._expired = False
        self._waiting: asyncio.Task[Any] | None = None  # the task inside a wait, if any
        self._cancelled_it = False

    def _expire(self) -> None:
        self._expired, self._timer = True, None
        if self._waiting is not None:
            self._waiting.cancel()
            self._cancelled_it = True

    async def __aenter__(self) -> None:
        if self._expired:
            raise TimeoutError
        self._waiting = asyncio.current_task()

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        task, self._waiting = self._waiting, None
        if self._cancelled_it:
            self._cancelled_it = False
            assert task is not None
            if task.uncancel() == 0 and kind is asyncio.CancelledError:
                raise TimeoutError from exc  # ours alone: the deadline, not a client gone

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
