"""A py-spy profile of a serving replica while it is under load, summarised for the report.

py-spy samples the replica's Python stacks from outside (no change to the service); the summary
lists the frames that hold the most busy samples (inclusive), so the report shows where the CPU
of the tiny path goes. Waiting threads (idle pools, condition waits) are left out.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
from pathlib import Path

IDLE = ("Condition.wait", "Queue.get", "Event.wait", "select (", "epoll", "_worker (concurrent")


def py_spy() -> str | None:
    return shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))


def start(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """Begin sampling ``pid`` for ``seconds`` into ``out`` (raw collapsed stacks)."""
    binary = py_spy()
    if binary is None:
        return None
    cmd = [binary, "record", "-p", str(pid), "-d", str(max(1, int(seconds))), "-r", "200",
           "-f", "raw", "-o", str(out), "--nonblocking"]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarise(raw: Path, top: int = 20) -> list[tuple[float, str]]:
    """(share of busy samples, frame) for the ``top`` frames by inclusive samples."""
    inclusive: collections.Counter[str] = collections.Counter()
    busy = 0
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        frames = [re.sub(r":\d+\)", ")", f) for f in stack.split(";")]
        if any(marker in frame for frame in frames for marker in IDLE):
            continue
        busy += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    skip = ("threading.py", "default_worker.py", "worker.py)", "_run_user_code_event_loop")
    rows = [(n / busy, f) for f, n in inclusive.most_common() if not any(s in f for s in skip)]
    return rows[:top] if busy else []
