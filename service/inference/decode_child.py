"""The decode process's side (``service/inference/decode_process.py`` starts it and is its parent).

One thread: a :class:`TranslationScheduler` whose passes (admit, step, answer) alternate with
reading what the parent sent — waiting for a message only while nothing decodes. What would reach
a caller's event loop in process is collected per pass and sent as one message.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from service.inference.callers import Request, StepToken, decoded, take_held
from service.inference.child_reader import Answers, Failures, Stats, Streamed
from service.inference.decoding import Options
from service.inference.scheduler import Decoder, TranslationScheduler

#: while only step counts would be sent, the child sends them at most this often (and always when
#: it goes idle): they feed the metrics, nobody waits for them
STATS_EVERY_S = 0.05


@dataclass(eq=False)
class _Remote(Request):
    """A request as the child tracks it (no event loop there: what it produces is sent)."""

    rid: int = 0
    attention: bool = True


class _ChildScheduler(TranslationScheduler):
    """The scheduler in the child: what would reach callers' loops is sent to the parent, one
    message per pass of the loop. Its loop runs on the child's only thread (:func:`_child`), which
    also reads the parent's messages between passes."""

    threaded = False

    def __init__(self, decoder: Decoder, token_budget: int, send: Callable[[Any], None]) -> None:
        super().__init__(decoder, token_budget, self._stepped)
        self._send = send
        self._stats: Stats = []
        self._tokens: Streamed = []
        self._answers: Answers = []
        self._sent_at = time.perf_counter()
        self.by_rid: dict[int, _Remote] = {}
        #: whether the parent was last told that nothing decodes here (it reads a silence then as
        #: idleness, not a hang)
        self.said_idle = True

    def add(
        self,
        rid: int,
        ids: list[list[int]],
        options: Options,
        arrived: float,
        interval_s: float | None,
        attention: bool,
    ) -> None:
        """``interval_s`` None: not streamed; else its tokens are sent at most once per interval
        (``TranslationScheduler.enqueue``)."""
        request = _Remote(None, None, arrived, [None] * len(ids), rid=rid, attention=attention)  # type: ignore[arg-type]
        self.said_idle = False
        self.by_rid[rid] = request
        streamed = interval_s is not None
        self._add(request, ids, options, _streams if streamed else None, interval_s or 0.0)

    def cancel(self, rid: int) -> None:
        request = self.by_rid.pop(rid, None)
        if request is None:  # answered meanwhile
            return
        self._withdraw(request)  # its rows leave at the next pass

    def _stream(self, streamed: dict[Request, list[StepToken]]) -> None:
        for request, tokens in streamed.items():
            assert isinstance(request, _Remote)
            keep = request.attention
            self._tokens.append(
                (request.rid, [(t.text, t.token, t.logprob, t.attention if keep else None) for t in tokens])
            )

    def _answer(self, finished: list[Request]) -> None:
        self._stream(take_held(finished))  # their last tokens, in the same message as the answers
        failures = []
        for request in finished:
            assert isinstance(request, _Remote)
            self._forget(request)
            try:
                answer = decoded(request)()
            except Exception as exc:  # fails this request, as on the caller's loop in process
                failures.append((request.rid, type(exc).__name__, str(exc)))
                continue
            if not request.attention:  # nobody reads them: not worth the copy
                empty = np.empty((0, 0), np.float32)
                answer.hypotheses = [dataclasses.replace(h, attention=empty) for h in answer.hypotheses]
            self._answers.append((request.rid, answer))
        if failures:
            self._flush(failures)

    def _failed(self, failed: set[Request], exc: BaseException) -> None:
        self._stream(take_held(failed))
        rids = [r.rid for r in failed if isinstance(r, _Remote)]
        for request in failed:
            self._forget(request)
        self._stats.append((0, 0, 0, 0.0, self.steps))  # the batch is gone with them
        self._flush([(rid, type(exc).__name__, str(exc)) for rid in rids])

    def _forget(self, request: Request) -> None:
        assert isinstance(request, _Remote)
        self.by_rid.pop(request.rid, None)
        self._requests.discard(request)

    def _stepped(self, rows: int, live: int, tokens: int, seconds: float) -> None:
        self._stats.append((rows, live, tokens, seconds, self.steps))
        now = time.perf_counter()
        if self._tokens or self._answers or live == 0 or now - self._sent_at >= STATS_EVERY_S:
            self._flush([])

    def say_idle(self) -> None:
        """Tell the parent that nothing decodes here, when no pass did: a request released before
        any pass leaves none to, and the parent would take the silence that follows for a hang
        once it hands over the next request."""
        self._stats.append((0, 0, 0, 0.0, self.steps))
        self._flush([])

    def _flush(self, failures: Failures) -> None:
        if self._stats:
            self.said_idle = self._stats[-1][1] == 0
        message = ("step", self._stats, self._tokens, self._answers, failures)
        self._stats, self._tokens, self._answers = [], [], []
        self._sent_at = time.perf_counter()
        self._send(message)


def _streams(tokens: list[StepToken]) -> None:  # marks a streaming request in the child
    raise AssertionError("never called: the child sends tokens")


def _child(fd: int) -> None:
    """The child's one thread: load the model, then between passes of the scheduler's loop take
    every message the parent sent (waiting for one while there is nothing to decode), until the
    parent closes its end — or sends close and what is running drains."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    conn = Connection(fd)
    try:
        kind, factory, budget, files = conn.recv()
        assert kind == "init"
        # files: the parent's view of the model's files (PinnedFiles), whose descriptors we have
        decoder, providers = factory() if files is None else factory(Path(files))
        scheduler = _ChildScheduler(decoder, budget, conn.send)
    except BaseException as exc:
        conn.send(("failed", type(exc).__name__, str(exc)))
        raise
    conn.send(("ready", providers))
    closing = False
    waiting = select.poll()  # registered once: Connection.poll builds a selector per call
    waiting.register(conn.fileno(), select.POLLIN)
    while True:
        idle = scheduler.idle
        if idle and closing:
            conn.close()
            return
        if idle or waiting.poll(0):
            try:
                if idle and not scheduler.said_idle and not waiting.poll(0):
                    scheduler.say_idle()
                message = conn.recv()  # waits while idle
            except (EOFError, OSError):  # the parent is gone: nobody to answer
                os._exit(0)
            kind = message[0]
            if kind == "submit":
                scheduler.add(*message[1:])
            elif kind == "release":
                scheduler.cancel(message[1])
            elif kind == "close":
                closing = True
            continue  # every message that is there before the next pass
        try:
            scheduler._pass()
        except (BrokenPipeError, ConnectionResetError):  # the parent went while we answered
            os._exit(0)


def translator_decoder(
    directory: Path, manifest: Any, providers: list[str], threads: int
) -> tuple[Decoder, list[str]]:
    """(In the child.) The model's :class:`Translator`, warmed up, and the providers it runs on."""
    from service.inference.runtime import choose_providers
    from service.inference.translation import Translator

    # again here: loading the CUDA libraries of the nvidia-* wheels counts per process
    translator = Translator(directory, manifest, choose_providers(providers), threads)
    translator.warmup()
    return translator, list(translator.decoder.providers)
