"""What comes back from a decode child (``service/inference/decode_process.py`` is its parent;
``child_sender.py`` is the other direction): the reader thread that hands each of the child's
messages to its owner, the end of a child's socket, the watchdog of a child told to end, and the
child's errors as its callers receive them."""

from __future__ import annotations

import functools
import logging
import subprocess
import threading
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Protocol

import numpy as np

from service.inference.callers import Decoded
from service.inference.child_sender import Sender

log = logging.getLogger("ray.serve")

# the parts of the child's "step" message (``decode_child`` sends it at most once per step):
#: per step, (rows, live rows, tokens in flight, seconds, steps so far)
Stats = list[tuple[int, int, int, float, int]]
#: per streamed request, (its id, its tokens: text index, token, logprob, attention or None)
Streamed = list[tuple[int, list[tuple[int, int, float, np.ndarray | None]]]]
#: per finished request, (its id, its answer)
Answers = list[tuple[int, Decoded]]
#: per failed request, (its id, the exception's type name, its text)
Failures = list[tuple[int, str, str]]


class Owner(Protocol):
    """The parent's object for one model's child (:class:`DecodeProcess`), as the reader sees it."""

    def deliver(self, stats: Stats, tokens: Streamed, answers: Answers, failures: Failures) -> None:
        """A message of the child's."""

    def ended(self, process: subprocess.Popen[bytes]) -> None:
        """The child's socket ended: fail what it held, start another unless closed."""


def read(
    ref: Callable[[], Owner | None],
    conn: Connection,
    process: subprocess.Popen[bytes],
    finalizer: weakref.finalize,
    ending: threading.Event,
) -> None:
    """The parent's reader thread: deliver each message of the child until its end; then close
    this child's socket and, unless the owner is gone or the interpreter exits, tell the owner.
    ``ref`` holds the owner weakly (dropped without a close, its ``finalizer`` shuts the socket)."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        except Exception:  # a message that cannot be read (unpickled, or too large): the stream is lost
            log.exception("decode process: a message from the child could not be read; it is restarted")
            process.kill()  # its requests fail (InferenceFailed) and another starts, as after a crash
            break
        owner = ref()
        if owner is None:
            break
        try:
            owner.deliver(*message[1:])
        except Exception:  # never lose the reader: log, and keep answering the others
            log.exception("decode process: a message could not be delivered")
        del owner
    conn.close()
    detached = finalizer.detach()  # this child's socket: closed now, not when the owner is collected
    if detached is not None:
        shut(detached[2][0])
    owner = ref()
    if owner is None or ending.is_set():
        process.wait()
    else:
        owner.ended(process)


def shut(sender: Sender, ending: threading.Event | None = None) -> None:
    """End both directions (the reader's recv returns, the child's too). Called by the finalizer
    when the owner is gone or the interpreter exits (``ending``: no restart), or by the reader."""
    if ending is not None:
        ending.set()
    sender.shut()


def kill_lingering(process: subprocess.Popen[bytes], after_s: float) -> None:
    """(A timer, ``after_s`` after the child was told to end.) A child still there is hung in a
    step: it would hold its model's memory for the replica's lifetime (its reader then reaps it)."""
    if process.poll() is None:
        log.error("decode process %d still there %.0f s after told to end: killed", process.pid, after_s)
        process.kill()


def same(answer: Decoded) -> Decoded:
    return answer


@functools.cache
def _error_type(name: str) -> type[Exception]:
    return type(name, (RuntimeError,), {})


def remote_error(name: str, text: str) -> Exception:
    """The child's exception, by its type's name (ONNX Runtime's own do not pickle)."""
    return _error_type(name)(text)
