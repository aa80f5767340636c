"""A version's files held open (``service/inference/pinned_files.py``): a process started on them
later reads what they held when they were pinned, whatever became of their directory, through
links that are there only while it starts; closing lets the descriptors go. Real files, a real
child process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.inference.pinned_files import PinnedFiles

#: a child's view of the files: their names and contents, into the file argv[2]
READ = (
    "import pathlib, sys; view = pathlib.Path(sys.argv[1]); "
    "pathlib.Path(sys.argv[2]).write_text(repr(sorted((p.name, p.read_text()) for p in view.iterdir())))"
)


def test_a_process_started_later_reads_the_files_after_their_directory_was_removed(tmp_path: Path) -> None:
    version = tmp_path / "1"
    (version / "sub").mkdir(parents=True)
    (version / "model.onnx").write_text("graph")
    (version / "tokenizer.json").write_text("vocabulary")
    (version / "sub" / "other.txt").write_text("not a file of the version's own")
    out = tmp_path / "seen"
    pinned = PinnedFiles(version)
    try:
        assert sorted(pinned.fds) == ["model.onnx", "tokenizer.json"]
        shutil.rmtree(version)
        with pinned.view() as view:
            assert view is not None
            assert pinned.popen([sys.executable, "-c", READ, view, str(out)]).wait(60) == 0
            assert out.read_text() == repr([("model.onnx", "graph"), ("tokenizer.json", "vocabulary")])
            # a process not given the descriptors finds nothing behind the links
            alone = subprocess.run([sys.executable, "-c", READ, view, str(out)], capture_output=True)
            assert alone.returncode != 0 and b"No such file" in alone.stderr
        assert not os.path.exists(view)  # only while a child opens the files
    finally:
        pinned.close()


def test_a_view_goes_when_its_child_has_started_or_failed_to(tmp_path: Path) -> None:
    """A replica that Ray stops is killed, and runs no clean-up: no view may outlive a start."""
    (tmp_path / "model.onnx").write_text("graph")
    pinned = PinnedFiles(tmp_path)
    try:
        with pytest.raises(ZeroDivisionError), pinned.view() as view:
            assert view is not None and os.path.islink(os.path.join(view, "model.onnx"))
            raise ZeroDivisionError  # the child failed to load
        assert not os.path.exists(view)
        with pinned.view() as again:  # a restart gets a view of its own
            assert again is not None and os.listdir(again) == ["model.onnx"]
        assert not os.path.exists(again)
    finally:
        pinned.close()
    with PinnedFiles(None).view() as none:
        assert none is None


def test_closing_lets_the_descriptors_go(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_text("graph")
    pinned = PinnedFiles(tmp_path)
    fds = list(pinned.fds.values())
    pinned.close()
    pinned.close()  # twice: nothing more
    assert pinned.closed and not pinned.fds
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    with pytest.raises(RuntimeError, match="let go"):
        pinned.popen([sys.executable, "-c", "pass"])
    with pytest.raises(RuntimeError, match="let go"), pinned.view():
        pass


def test_a_view_left_by_a_process_no_longer_running_is_removed_by_the_next(tmp_path: Path) -> None:
    """A replica killed while its decode child started left its view of links in the temporary
    directory (14 from one day of test runs): the next view made removes those of processes gone,
    and keeps a running one's."""
    import tempfile

    from service.inference.pinned_files import VIEW_PREFIX

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait(60)
    root = Path(tempfile.gettempdir())
    left = Path(tempfile.mkdtemp(prefix=f"{VIEW_PREFIX}{ended.pid}-", dir=root))
    os.symlink("/proc/self/fd/99", left / "model.onnx")
    running = Path(tempfile.mkdtemp(prefix=f"{VIEW_PREFIX}{os.getppid()}-", dir=root))
    (tmp_path / "model.onnx").write_text("graph")
    pinned = PinnedFiles(tmp_path)
    try:
        with pinned.view() as view:
            assert view is not None and Path(view).name.startswith(f"{VIEW_PREFIX}{os.getpid()}-")
        assert not left.exists() and running.exists()
    finally:
        pinned.close()
        shutil.rmtree(running, ignore_errors=True)
