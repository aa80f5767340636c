"""Messages from the serving process to a decode process's child (``decode_process.py``), over
its socket, framed as ``multiprocessing.connection.Connection`` frames them, without ever blocking
the sender."""

from __future__ import annotations

import collections
import contextlib
import socket
import struct
import threading
from multiprocessing.reduction import ForkingPickler
from typing import Any


class Sender:
    """Messages to the child, never blocking the caller (the serving event loop): each goes
    straight into the socket while it has room, else — and after it, every later one, to keep the
    order — to a writer thread that waits for room and ends when nothing is left. A child reads
    only between decoder steps, so a request of many long texts sent during a long step fills the
    socket's buffer alone; a blocking send would stop the event loop, and with it every model of
    the replica, until the step ended. The framing is ``multiprocessing.connection.Connection``'s,
    which the child reads with.

    The sender owns the socket: :meth:`shut` ends both directions at once (the reader's and the
    child's receives return) and closes it only once no writer is sending on it — a descriptor
    closed under a send could be reused by another file and take the rest of a frame."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._pending: collections.deque[bytes | memoryview] = collections.deque()
        self._wake = threading.Lock()
        self._writer: threading.Thread | None = None
        self._broken: OSError | None = None  # every later send raises this
        self._shut = False
        self.waiting_bytes = 0  # in _pending

    def send(self, message: Any) -> None:
        """Queue ``message``; raises OSError when the connection has ended."""
        data = ForkingPickler.dumps(message)
        n = len(data)  # Connection._send_bytes's header
        head = struct.pack("!i", n) if n <= 0x7FFFFFFF else struct.pack("!iQ", -1, n)
        frame: bytes | memoryview = b"".join((head, data))
        with self._wake:
            if self._broken is not None:
                raise self._broken
            if not self._pending:
                try:
                    sent = self._sock.send(frame, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    self._broken = exc
                    raise
                if sent == len(frame):
                    return
                frame = memoryview(frame)[sent:]
            self._pending.append(frame)
            self.waiting_bytes += len(frame)
            if self._writer is None:
                self._writer = threading.Thread(target=self._write, name="decode-process-writer", daemon=True)
                self._writer.start()

    def _write(self) -> None:
        while True:
            with self._wake:
                if not self._pending or self._broken is not None:  # done: a later send starts another
                    self._writer = None
                    if self._shut:
                        self._sock.close()
                    return
                frame = self._pending[0]  # stays queued while it is written: later sends queue behind it
            try:
                self._sock.sendall(frame)
            except OSError as exc:
                with self._wake:
                    self._broken = exc
                    self._pending.clear()
                    self.waiting_bytes = 0
                # the child's end, or anything else (no buffer space…): either way end the
                # connection, so that the reader fails what the child held and starts another
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)
                continue
            with self._wake:
                self._pending.popleft()
                self.waiting_bytes -= len(frame)

    @property
    def waiting(self) -> int:
        """Messages not yet in the socket."""
        return len(self._pending)

    def shut(self) -> None:
        """End both directions now; close the socket now, or when the writer sending on it ends."""
        with self._wake:
            self._shut = True
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            if self._writer is None:
                self._sock.close()
