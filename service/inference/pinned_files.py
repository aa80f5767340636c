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
from collections.abc import Iterator
from pathlib import Path

#: a view's directory in the temporary directory: the prefix, then the pid of the process it is for
VIEW_PREFIX = "attention-decode-"


def remove_left_views() -> None:
    """Remove the views that processes no longer running left behind (killed while a child
    started): named by their pid, each holds nothing but links."""
    root = Path(tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for path in root.glob(f"{VIEW_PREFIX}*-*"):
            pid = path.name.removeprefix(VIEW_PREFIX).split("-", 1)[0]
            if pid.isdigit() and not running(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def running(pid: int) -> bool:
    """Whether process ``pid`` is running (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: running
        return True
    return True


class PinnedFiles:
    """The regular files of a directory, each held open (read-only; inherited only by the decode
    processes they are passed to): their contents outlive their names, whatever is done to the
    directory. A child sees them through :meth:`view`. ``PinnedFiles(None)``: no files."""

    def __init__(self, directory: Path | None) -> None:
        self.fds: dict[str, int] = {}
        self.has_files = directory is not None
        self.closed = False
        self.lock = threading.Lock()
        if directory is None:
            return
        try:
            for path in sorted(directory.iterdir()):
                if path.is_file():
                    self.fds[path.name] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            self.close()
            raise

    @contextlib.contextmanager
    def view(self) -> Iterator[str | None]:
        """A private directory of links named as the files, each to ``/proc/self/fd/<its
        descriptor>`` — in a process that has the descriptors (one :meth:`popen` started), the
        file itself (Linux's ``/proc``). Removed on leaving: a child needs it only while it opens
        the files, and a process that is killed runs no clean-up (Ray ends a stopped replica so):
        only one killed while a child starts leaves its view behind, and the next view made on
        this machine removes it (:func:`remove_left_views`). None without files."""
        with self.lock:
            if self.closed:
                raise RuntimeError("the model's files were let go: nothing may start on them")
            fds = dict(self.fds)
        if not self.has_files:
            yield None
            return
        remove_left_views()
        view = tempfile.mkdtemp(prefix=f"{VIEW_PREFIX}{os.getpid()}-")
        try:
            for name, fd in fds.items():
                os.symlink(f"/proc/self/fd/{fd}", os.path.join(view, name))
            yield view
        finally:
            shutil.rmtree(view, ignore_errors=True)

    def popen(self, command: list[str], *fds: int) -> subprocess.Popen[bytes]:
        """``command`` started with these files' descriptors and ``fds`` passed to it, none of
        them closed meanwhile (:meth:`close` waits)."""
        with self.lock:
            if self.closed:
                raise RuntimeError("the model's files were let go: nothing may start on them")
            return subprocess.Popen(command, pass_fds=(*fds, *self.fds.values()))

    def close(self) -> None:
        with self.lock:
            fds, self.fds, self.closed = self.fds, {}, True
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
