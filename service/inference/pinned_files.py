"""A model version's files held open, so a process started later loads them whatever was done to
their directory meanwhile: a translation model's decode process restarted after a crash
(``service/inference/decode_process.py``) once its version's directory was removed."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path


class PinnedFiles:
    """The regular files of a directory, each held open (read-only; inherited only by the decode
    processes they are passed to): their contents outlive their names, whatever is done to the
    directory. ``view``: a private directory of links named as the files, each to
    ``/proc/self/fd/<its descriptor>`` — in a process that has the descriptors (a decode
    process), the file itself. Linux's ``/proc``; built once here and removed by :meth:`close`,
    so a child killed while it loads leaves nothing behind. ``PinnedFiles(None)``: no files."""

    def __init__(self, directory: Path | None) -> None:
        self.fds: dict[str, int] = {}
        self.view: str | None = None
        self.closed = False
        self.lock = threading.Lock()
        if directory is None:
            return
        try:
            for path in sorted(directory.iterdir()):
                if path.is_file():
                    self.fds[path.name] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self.view = tempfile.mkdtemp(prefix="attention-decode-")
            for name, fd in self.fds.items():
                os.symlink(f"/proc/self/fd/{fd}", os.path.join(self.view, name))
        except BaseException:
            self.close()
            raise

    def popen(self, command: list[str], *fds: int) -> subprocess.Popen[bytes]:
        """``command`` started with these files' descriptors and ``fds`` passed to it, none of
        them closed meanwhile (:meth:`close` waits)."""
        with self.lock:
            if self.closed:
                raise RuntimeError("the model's files were let go: nothing may start on them")
            return subprocess.Popen(command, pass_fds=(*fds, *self.fds.values()))

    def close(self) -> None:
        with self.lock:
            fds, view, self.fds, self.view, self.closed = self.fds, self.view, {}, None, True
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        if view is not None:
            shutil.rmtree(view, ignore_errors=True)
