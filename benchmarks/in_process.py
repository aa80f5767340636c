"""The HTTP app in process, without sockets: where a request's CPU goes on the serving side.

``python -m benchmarks.in_process MODEL KIND`` builds the service as a replica holds it — the real
``create_app``, ``Server``, model workers, batcher and scheduler, ONNX Runtime on one thread — and
calls the ASGI app directly from concurrent callers, with one request body per call and the
answer checked (200). No sockets, no uvicorn, no Ray: what is left is the app, the inference core
and the model, so small changes to them show here where a served benchmark's noise (this 2-core
machine's speed drifts ±25 % between minutes) would hide them.

It prints requests/s, the CPU per request of the process and its children (every thread: the event
loop, the scheduler's stepping thread, ONNX Runtime; a translation model's decode process) and the
event loop thread's alone. ``--profile`` adds a cProfile of
the event loop thread (calls and time per request, by function); ``--dump FILE`` keeps it for a
comparison with ``pstats``. To compare two commits, run this module of each checkout in turn
(``git worktree add /tmp/before HEAD~1``, then ``PYTHONPATH=/tmp/before python -m
benchmarks.in_process ...``), a few times each, interleaved.

Kinds: ``stream`` and ``plain`` (REST translations, streamed or not), ``json``, ``multipart``,
``v2`` and ``rollout`` (REST and KServe v2 image requests, as ``benchmarks.image_peers`` sends them).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import json
import pstats
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.decoding_load import TEXTS
from benchmarks.image_peers import MODEL as PEERS_MODEL
from benchmarks.image_peers import ours
from benchmarks.loadgen import Request
from benchmarks.peers.smoke import test_images
from benchmarks.profiling import own_tree_cpu_s
from service.api.http import create_app
from service.api.server import Server
from service.inference.model_set import ModelSet
from service.inference.worker import NoMetrics
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
IMAGE_KINDS = {"json": "json", "multipart": "multipart", "v2": "v2-binary", "rollout": "json+rollout"}


class NoRecord:
    def record(self, model: str, route: str, status: int, seconds: float) -> None:
        pass


def requests_for(model: str, kind: str) -> list[Request]:
    if kind in ("stream", "plain"):
        path = f"/v1/models/{model}/translate"
        return [Request.json(path, {"text": t, "stream": kind == "stream"}) for t in TEXTS]
    payloads = {p.name: p for p in ours(test_images(32))}
    # the payloads name the peers' model (fashion-vit); any image model takes the same bodies
    return [
        dataclasses.replace(r, path=r.path.replace(f"/models/{PEERS_MODEL}/", f"/models/{model}/"))
        for r in payloads[IMAGE_KINDS[kind]].requests
    ]


def scope(request: Request) -> dict[str, Any]:
    headers = [
        (b"content-type", request.content_type.encode()),
        (b"content-length", b"%d" % len(request.body)),
    ]
    headers += [(k.lower().encode(), v.encode()) for k, v in request.headers]
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "path": request.path, "raw_path": request.path.encode(), "root_path": "", "scheme": "http",
        "query_string": b"", "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000),
    }  # fmt: skip


async def call(app: Any, request: Request) -> None:
    """One request through the ASGI app, as a server would make it: the body, then (once the
    answer is out) the disconnect the app's watchers wait for."""
    body_sent = False
    over = asyncio.Event()
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await over.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope(request), receive, send)
    over.set()
    if status != 200:
        raise RuntimeError(f"{request.path}: status {status}")


async def run(args: argparse.Namespace) -> dict[str, float]:
    settings = Settings(
        repository=args.repository, intra_op_threads=1, stream_interval_ms=args.stream_interval_ms
    )
    server = Server(settings, NoRecord())
    models = ModelSet(
        settings, "in-process", "local", lambda _: NoMetrics(),
        lambda workers, rejected: server.serve(workers, models.entries, rejected),
    )  # fmt: skip
    await models.serve({args.model: args.version})
    app = create_app(server)
    requests = requests_for(args.model, args.kind)
    answered = 0

    async def caller(first: int, until: float) -> None:
        nonlocal answered
        i = first
        while time.perf_counter() < until:
            await call(app, requests[i % len(requests)])
            i, answered = i + 1, answered + 1

    async def load(seconds: float) -> None:
        until = time.perf_counter() + seconds
        await asyncio.gather(*(caller(k, until) for k in range(args.callers)))

    await load(args.warmup)
    answered = 0
    profile = cProfile.Profile() if args.profile or args.dump else None
    # this process and its children: a translation model's decode process is one
    cpu, wall, loop_cpu = own_tree_cpu_s(), time.perf_counter(), time.thread_time()
    if profile is not None:
        profile.enable()
    await load(args.seconds)
    if profile is not None:
        profile.disable()
    cpu, wall = own_tree_cpu_s() - cpu, time.perf_counter() - wall
    loop_cpu = time.thread_time() - loop_cpu
    if profile is not None:
        if args.dump:
            profile.dump_stats(args.dump)
        stats = pstats.Stats(profile)
        print(f"per request: {stats.total_calls / answered:.0f} Python calls")  # type: ignore[attr-defined]
        stats.sort_stats("tottime").print_stats(25)
    return {
        "requests_per_s": answered / wall,
        "cpu_us_per_request": cpu / answered * 1e6,
        "loop_cpu_us_per_request": loop_cpu / answered * 1e6,
    }


def parser() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(
        prog="python -m benchmarks.in_process", description=__doc__.split("\n")[0]
    )
    options.add_argument("model")
    options.add_argument("kind", choices=["stream", "plain", *IMAGE_KINDS])
    options.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    options.add_argument("--version", type=int, default=1)
    options.add_argument("--callers", type=int, default=16)
    options.add_argument("--seconds", type=float, default=5.0)
    options.add_argument("--warmup", type=float, default=2.0)
    options.add_argument(
        "--stream-interval-ms", type=float, default=Settings.model_fields["stream_interval_ms"].default
    )
    options.add_argument("--profile", action="store_true", help="cProfile the event loop thread")
    options.add_argument("--dump", type=Path, help="keep the profile (pstats) in this file")
    return options


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    result = asyncio.run(run(args))
    print(json.dumps({"model": args.model, "kind": args.kind, "callers": args.callers, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
