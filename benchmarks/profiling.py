"""A py-spy profile of a serving replica while it is under load, summarised for the report.

py-spy samples the replica's Python stacks from outside (no change to the service); the summary
lists the frames that hold the most busy samples (self time: the innermost frame), so the report
shows where the CPU of the tiny path goes. Waiting threads (idle pools, condition waits) are left out.
``own_tree_cpu_s``: the CPU of a benchmark that holds the worker itself, its children included.
"""

from __future__ import annotations

import collections
import contextlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psutil

IDLE = ("Condition.wait", "Queue.get", "Event.wait", "select (", "epoll")


def own_tree_cpu_s() -> float:
    """CPU seconds of this process and its children alive now (the worker's decode process)."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += sum(child.cpu_times()[:2])
    return total


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


def summarise(raw: Path, top: int = 12) -> dict[str, list[tuple[float, str]]]:
    """Where the busy samples were, by their innermost frame (self time): per component (the
    package the code belongs to: starlette, uvicorn, onnxruntime, service, …) and per frame."""
    components: collections.Counter[str] = collections.Counter()
    frames: collections.Counter[str] = collections.Counter()
    busy = 0
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        chain = [re.sub(r":\d+\)", ")", f) for f in stack.split(";")]
        if any(marker in frame for frame in chain for marker in IDLE):
            continue
        busy += int(count)
        frames[chain[-1]] += int(count)
        components[component(chain[-1])] += int(count)
    if not busy:
        return {"components": [], "frames": []}
    return {
        "components": [(n / busy, c) for c, n in components.most_common(top)],
        "frames": [(n / busy, f) for f, n in frames.most_common(top)],
    }


def component(frame: str) -> str:
    """``handle (starlette/routing.py)`` → ``starlette``; Ray Serve is told apart from Ray."""
    match = re.search(r"\(([^)]*)\)\s*$", frame)
    path = match.group(1) if match else ""
    parts = [p for p in path.split("/") if p]
    if not parts:
        return "other"
    if parts[0] == "ray" and len(parts) > 1 and parts[1] == "serve":
        return "ray.serve"
    return parts[0].removesuffix(".py")
