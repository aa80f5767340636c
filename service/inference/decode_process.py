"""A translation model's decode loop in a process of its own.

In the serving process the scheduler's stepping thread (``service/inference/scheduler.py``) shares
the interpreter lock with the event loop that parses requests, tokenises, detokenises and writes
answers and token streams: on the 2-core reference machine at 32 streaming clients the same 30
rows per step took 1.36 ms a step against 1.02 ms when nothing streamed, while neither thread used
a whole core. vLLM moved its engine loop into a process of its own for the same reason (its V1
"engine core"). Served A/B, both services up and loaded in turn: plain tokens/s +11 %, streamed
+28 % (``benchmarks/results/*-streaming.md``).

:class:`DecodeProcess` has the scheduler's interface (``enqueue`` / ``submit`` / ``release`` /
``close``, ``held`` / ``rows`` / ``tokens_in_flight`` / ``steps``); its child runs a
:class:`TranslationScheduler` on its one thread, loads the model's graphs itself and, between
decoder steps, takes whatever the parent sent. Pickled over a socket pair:

- to the child: a request's source ids, options and arrival time, its stream interval (None: not
  streamed) and whether it wants attention; a release (the caller left: its rows leave at the
  next step); close.
- to the parent, at most once per step: the tokens now due to streaming requests (the child
  holds them within each one's interval), the answers of the requests that finished (attention
  only when asked for), failures, and the step counts for the metrics (held back up to
  ``decode_child.STATS_EVERY_S`` while nothing else is sent).

Sends to the child never block the caller (``Sender``: into the socket while it has room, else
through a writer thread), and a reader thread in the parent hands each caller its tokens and
answer on its own event loop, as the in-process scheduler does. The child exits when the
parent's end of the socket closes (the parent ended, however) or when told to, once drained; a
child that dies fails the requests it held (InferenceFailed) and is started again.

A replaced version (:meth:`DecodeProcess.close`) keeps taking requests until it holds none, as
the in-process scheduler and the batcher serve a late caller: a request that found the old
version just before the swap (its texts tokenised in a thread meanwhile) is answered by it, not
refused. Only then is the child told to end; one that has not ended ``HUNG_S`` later (a step
that never returns) is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

from service.errors import InferenceFailed, Overloaded
from service.inference.callers import (
    OnTokens,
    Request,
    StepToken,
    Submitting,
    on_their_loops,
    settler,
)
from service.inference.child_reader import (
    Answers,
    Failures,
    Stats,
    Streamed,
    kill_lingering,
    read,
    remote_error,
    same,
    shut,
)
from service.inference.child_sender import Sender
from service.inference.decoding import Options
from service.inference.pinned_files import PinnedFiles
from service.inference.scheduler import Decoder, OnStep

log = logging.getLogger("ray.serve")

#: how long a child may take to load its model and warm up
START_TIMEOUT_S = 300.0
#: the replica's health check fails (Ray replaces the replica) when a restart of the child has
#: failed and none has succeeded for this long (a restart that is still loading counts only from
#: START_TIMEOUT_S, when it fails) — or when a busy child has sent nothing for HUNG_S: a decoding
#: child reports after every step (at most every 50 ms), so only a step that long, or a hang, does
DOWN_S = 30.0
HUNG_S = 120.0


#: bytes of messages not yet in the child's socket beyond which the model refuses new requests
#: (503): the child is in a long step, or hung (the health check's business)
MAX_WAITING_BYTES = 64 * 1024 * 1024


class DecodeProcess(Submitting):
    """:class:`TranslationScheduler`'s interface, its loop in a child process.

    ``factory`` runs in the child and returns ``(decoder, providers)``: it must pickle (a
    module-level function or a ``functools.partial`` of one). With ``files`` (a model version's
    directory) it is called with a directory that shows that directory's files as they were when
    this object was made: they are held open here (:class:`PinnedFiles`), so a child started
    again after a crash loads the same files although the version's directory was removed or
    renamed meanwhile (a newer version serving, the old one deleted) — not a file overwritten in
    place. That directory is there only until the factory returns: it opens what it needs then.
    Without, it is called with no argument."""

    def __init__(
        self,
        factory: Callable[..., tuple[Decoder, list[str]]],
        token_budget: int,
        on_step: OnStep | None = None,
        files: Path | None = None,
    ) -> None:
        if token_budget < 1:
            raise ValueError(f"token_budget must be ≥ 1, got {token_budget}")
        self.factory, self.token_budget = factory, token_budget
        self.pinned = PinnedFiles(files) if files is not None else None
        if self.pinned is not None:  # closed with the last child, or when this object is dropped
            weakref.finalize(self, self.pinned.close)
        self.on_step = on_step
        self._lock = threading.Lock()  # guards _live, _conn, _closed, _told and the sends
        self._live: dict[int, Request] = {}
        self._next = 0
        self._closed = False  # replaced: ends once it holds nothing
        self._told = False  # the child was told to end: nothing more is sent to it
        self.rows = self.tokens_in_flight = self.steps = 0
        self.restarts = 0
        #: for the health check: since when restarts fail (None: up, or restarting for the first
        #: time), why the last one failed, when the child last spoke and whether it then had
        #: nothing to decode (its silence is not a hang until it is given work)
        self.down_since: float | None = None
        self.start_error = ""
        self.heard = time.monotonic()
        self._idle = True
        self._conn: Sender | None = None  # to the current child; None while it restarts
        self._process: subprocess.Popen[bytes] | None = None
        try:
            self.providers = self._start()
        except BaseException:
            if self.pinned is not None:
                self.pinned.close()
            raise

    @property
    def on_step(self) -> OnStep | None:
        return self._on_step()

    @on_step.setter
    def on_step(self, on_step: OnStep | None) -> None:
        """A bound method (the worker's) is held weakly: the worker holds this object, and the
        cycle would keep a dropped worker and its child alive until a cyclic collection."""
        self._on_step: Callable[[], OnStep | None] = (
            weakref.WeakMethod(on_step) if inspect.ismethod(on_step) else lambda: on_step
        )

    # -- lifecycle -------------------------------------------------------------------------------

    def _start(self) -> list[str]:
        """Start a child, hand it the model, wait until it is ready; start the reader."""
        ours, theirs = socket.socketpair()
        # the child imports this package from where this process found it
        run = f"from service.inference.decode_child import _child; _child({theirs.fileno()})"
        boot = f"import sys; sys.path[:0] = {sys.path!r}; {run}"
        pinned = self.pinned if self.pinned is not None else PinnedFiles(None)
        try:
            with pinned.view() as view:  # the files, for as long as the child takes to open them
                try:
                    process = pinned.popen([sys.executable, "-c", boot], theirs.fileno())
                finally:
                    theirs.close()
                conn = Connection(os.dup(ours.fileno()))
                try:
                    providers = self._handshake(conn, process, view)
                except BaseException:
                    conn.close()
                    process.kill()
                    process.wait()
                    raise
        except BaseException:  # the files were let go (closed meanwhile), or no child started
            theirs.close()
            ours.close()
            raise
        sender = Sender(ours)
        with self._lock:
            self._conn, self._process = sender, process
            self.down_since, self.start_error = None, ""
            self.heard, self._idle = time.monotonic(), True
            if self._closed:  # closed while this one started (a restart): it holds nothing and ends
                self._tell_to_end()
        # the reader holds this object weakly: dropped without close, its finalizer shuts the
        # socket, the reader sees the end and the child exits (its end closed)
        ending = threading.Event()  # the owner is gone, or the interpreter exits: never restart
        finalizer = weakref.finalize(self, shut, sender, ending)
        reader = threading.Thread(
            target=read,
            args=(weakref.ref(self), conn, process, finalizer, ending),
            name="decode-process-reader",
            daemon=True,
        )
        reader.start()
        return providers

    def _handshake(self, conn: Connection, process: subprocess.Popen[bytes], view: str | None) -> list[str]:
        """Hand the new child the model (its files through ``view``); the providers it runs on."""
        conn.send(("init", self.factory, self.token_budget, view))
        if not conn.poll(START_TIMEOUT_S):
            raise RuntimeError(f"the decode process did not start within {START_TIMEOUT_S:.0f} s")
        try:
            message = conn.recv()
        except EOFError:  # it died before a word (killed, out of memory, a crash in a library)
            message = ("failed", "exit", f"it exited with code {process.wait()}")
        if message[0] != "ready":
            raise RuntimeError(f"the decode process failed to start: {message[1]}: {message[2]}")
        return list(message[1])

    @property
    def running(self) -> bool:
        """Whether the child is alive (it ends after :meth:`close`, once drained)."""
        process = self._process
        return process is not None and process.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def problem(self, now: float | None = None) -> str | None:
        """What makes this model unhealthy, for the replica's health check: restarts failing for
        ``DOWN_S``, or a busy child silent for ``HUNG_S`` while requests wait on it."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._closed:
                return None
            down, held = self.down_since, len(self._live)
        if down is not None and now - down >= DOWN_S:
            why = f": {self.start_error}" if self.start_error else ""
            return f"its decode process has failed to restart for {now - down:.0f} s{why}"
        silent = now - self.heard
        if down is None and held and silent >= HUNG_S:
            return f"its decode process has sent nothing for {silent:.0f} s while holding {held} requests"
        return None

    def close(self) -> None:
        """Stop once this object holds no request (a replaced version drains, then ends): the
        requests it holds, and any that come meanwhile, are answered first."""
        with self._lock:
            self._closed = True
            if not self._live:
                self._tell_to_end()

    def _tell_to_end(self) -> None:
        """(Under the lock, closed, holding nothing.) Tell the child to end once its released
        rows are gone, and kill it if it is still there ``HUNG_S`` later."""
        conn, process = self._conn, self._process
        if self._told or conn is None or process is None:
            return
        self._told = True
        with contextlib.suppress(OSError):
            conn.send(("close",))
        watchdog = threading.Timer(HUNG_S, kill_lingering, (process, HUNG_S))
        watchdog.daemon = True
        watchdog.start()

    # -- callers ---------------------------------------------------------------------------------

    @property
    def held(self) -> int:
        """Requests waiting or decoding: the places taken."""
        return len(self._live)

    def enqueue(
        self,
        ids: list[list[int]],
        options: Options,
        on_tokens: OnTokens | None = None,
        attention: bool = True,
        interval_s: float = 0.0,
    ) -> Request:
        """As :meth:`TranslationScheduler.enqueue` (the child holds tokens within ``interval_s``:
        they cross only when due); ``attention`` false: the answer's hypotheses and the streamed
        tokens come without their attention (nothing to copy across)."""
        if not ids:
            raise ValueError("give at least one text")
        loop = asyncio.get_running_loop()
        arrived = time.perf_counter()
        request = Request(loop, loop.create_future(), arrived, [])
        request.on_tokens = on_tokens
        with self._lock:
            conn = self._conn
            if self._told:  # a replaced version that drained: the current one serves
                raise Overloaded("the model's version was replaced while this request was prepared; retry it")
            if conn is None:
                raise Overloaded("the model's decoder is restarting; retry later")
            if conn.waiting_bytes > MAX_WAITING_BYTES:
                raise Overloaded(
                    f"the model's decoder has {conn.waiting_bytes:,} bytes of requests unread; retry later"
                )
            rid = self._next = self._next + 1
            request.rid = rid  # type: ignore[attr-defined]
            if self._idle:  # an idle child was silent with reason: its silence counts from now
                self.heard, self._idle = time.monotonic(), False
            # known before it is sent: the answer can arrive before this thread runs again
            self._live[rid] = request
            stream = interval_s if on_tokens is not None else None  # None: not streamed
            try:
                conn.send(("submit", rid, ids, options, arrived, stream, attention))
            except BaseException as exc:
                del self._live[rid]
                if isinstance(exc, OSError):  # the child just died: the reader restarts it
                    raise Overloaded("the model's decoder is restarting; retry later") from exc
                raise
        return request

    def release(self, request: Request) -> None:
        """The caller is done with ``request``: unanswered (it left), its rows leave the batch at the
        next step."""
        rid: int = request.rid  # type: ignore[attr-defined]
        with self._lock:
            if self._live.pop(rid, None) is None:
                return
            if not request.future.done() or request.future.cancelled():
                request.cancelled = True
                request.future.cancel()
                if self._conn is not None:
                    with contextlib.suppress(OSError):
                        self._conn.send(("release", rid))
            if self._closed and not self._live:
                self._tell_to_end()

    # -- the reader (its own thread: child_reader.read) ------------------------------------------

    def ended(self, process: subprocess.Popen[bytes]) -> None:
        """(The reader.) The child is gone: fail what it held; start another unless closed."""
        code = process.wait()
        with self._lock:
            closed = self._closed
            self._told = self._told or closed  # a replaced version does not start again
            self._conn = None  # the reader shut it
            orphans = [r for r in self._live.values() if not r.future.done()]  # answered: not ours
            self._live.clear()
        self.rows = self.tokens_in_flight = 0
        on_step = self._on_step()
        if on_step is not None:  # the gauges: nothing in flight any more
            with contextlib.suppress(Exception):
                on_step(0, 0, 0, 0.0)
        if closed and self.pinned is not None:  # no child will start again
            self.pinned.close()
        if closed and not orphans:
            return
        # killed while idle: most often the replica stopping (its process group goes at once)
        (log.error if orphans else log.warning)(
            "the decode process exited (code %s) holding %d requests", code, len(orphans)
        )
        error = InferenceFailed(f"inference failed: the decoder process exited (code {code})")
        on_their_loops((r.loop, settler(r, error)) for r in orphans)
        if closed:
            return
        self.restarts += 1
        delay = 1.0
        while True:  # until one starts or the owner closes: requests meanwhile get 503
            with self._lock:
                if self._closed:
                    if self.pinned is not None:  # no child will start again
                        self.pinned.close()
                    return
            try:
                providers = self._start()
            except Exception as exc:
                self.start_error = str(exc)
                if self.down_since is None:
                    self.down_since = time.monotonic()
                log.exception("the decode process could not be restarted; next try in %.0f s", delay)
                time.sleep(delay)
                delay = min(2 * delay, 30.0)
                continue
            if providers != self.providers:  # (a GPU gone meanwhile) in place: the runner shows this list
                log.warning("the decode process runs on %s now, no longer on %s", providers, self.providers)
                self.providers[:] = providers
            return

    def deliver(self, stats: Stats, tokens: Streamed, answers: Answers, failures: Failures) -> None:
        """(The reader.) A message of the child's: hand each caller its tokens, answer or failure."""
        self.heard = time.monotonic()
        for _, live, in_flight, _, steps in stats:  # before the answers: a caller answered sees them
            self.rows, self.tokens_in_flight, self.steps = live, in_flight, steps
        calls: list[tuple[asyncio.AbstractEventLoop, Callable[[], None]]] = []
        held = self._live
        for rid, chosen in tokens:
            request = held.get(rid)
            if request is not None and request.on_tokens is not None:
                step = [StepToken(*t) for t in chosen]  # type: ignore[arg-type]
                calls.append((request.loop, functools.partial(request.on_tokens, step)))
        for rid, answer in answers:  # settled from here on: not an orphan if the child dies now
            request = held.pop(rid, None)
            if request is not None:
                calls.append((request.loop, settler(request, functools.partial(same, answer))))
        for rid, name, text in failures:
            request = held.pop(rid, None)
            if request is not None:
                calls.append((request.loop, settler(request, remote_error(name, text))))
        if stats:  # (after the answers left _live) the child flushes whenever it runs out of rows
            self._idle = stats[-1][1] == 0 and not held
        if self._closed and (answers or failures):
            with self._lock:
                if not self._live:  # a replaced version's last answer
                    self._tell_to_end()
        if calls:
            on_their_loops(calls)
        on_step = self._on_step()  # after the answers: a failing metric must not lose one
        if on_step is not None:
            for rows, live, in_flight, seconds, _ in stats:
                on_step(rows, live, in_flight, seconds)
