"""``make bench-peers``: the image path against its peers on the same graph and payloads (issue #19).

The demo ``fashion-vit`` graph behind four servers, each with one worker / one replica and ONNX
Runtime on one thread, on this machine's cores shared with the load generator:

- **attention-serve**: ``python -m service`` on its defaults (in-replica frontend, one replica);
- **fastapi-ort**: the plain FastAPI + ONNX Runtime baseline, no batching
  (``benchmarks/baseline_server.py``);
- **torchserve**: TorchServe with a custom ONNX Runtime handler and its batching (batchSize 32,
  maxBatchDelay 5 ms), from pinned PyPI packages in its own venv (``benchmarks/peers/``);
- **pytriton**: Triton's core through ``nvidia-pytriton``, a Python-backend model with its dynamic
  batcher (32, 2 ms queue delay), in its own venv.

The peers do what a user writes around the graph (``benchmarks/peers/peer_vision.py``): Pillow
decode, grey 48×48 bilinear resize, normalise, one ``run`` on the batch, softmax, top 5. Payloads:
JSON with a base64 PNG (every server), a multipart upload (attention-serve, TorchServe) and KServe
v2 binary tensors (attention-serve, Triton); attention-serve also with the attention rollout asked
for as an array. The images are Fashion-MNIST test items as PNGs (``benchmarks/peers/smoke.py``'s
mix: 48×48 canvases, bare 28×28 items that go through the resize, RGB ones).

Closed-loop clients on raw asyncio connections at 32 and 64, ``--rounds`` rounds; each round
starts every server in turn (order rotated), warms it up, measures each payload and client count
for ``--duration`` s, and stops it, so no idle server shares the cores with a measured one. The
answers are checked first (every image's top 5 equal to ONNX Runtime's in this process); the
report gives medians over rounds: images/s, p50/p99, server CPU per image (the whole process
tree's CPU time over the answers), RSS; the goals of issue #19 judged in the same run.

Writes ``benchmarks/results/<date>-peers.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import json
import shutil
import statistics
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from benchmarks import ceilings, outputs
from benchmarks.image_peers_report import goals, plot, write_report
from benchmarks.loadgen import Connection, Request, closed_loop, percentile
from benchmarks.peers import servers as peers
from benchmarks.peers.smoke import reference, test_images
from benchmarks.peers.versions import PINS, venv
from benchmarks.run import Server, configurations, cpu_seconds, rss_bytes, start

ROOT = Path(__file__).resolve().parents[1]
MODEL = "fashion-vit"


@dataclass(frozen=True)
class Payload:
    name: str
    requests: list[Request]


def ours(images: list[bytes]) -> list[Payload]:
    """attention-serve's requests: REST JSON, multipart, KServe v2 binary; REST with the rollout."""
    path = f"/v1/models/{MODEL}/classify"

    def v2(png: bytes) -> Request:
        tensor = len(png).to_bytes(4, "little") + png
        head = json.dumps({
            "inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES",
                        "parameters": {"binary_data_size": len(tensor)}}],
            "outputs": [{"name": "LABELS"}, {"name": "INDICES"}, {"name": "PROBABILITIES"}],
            "parameters": {"top_k": 5},
        }).encode()  # fmt: skip
        return Request(f"/v2/models/{MODEL}/infer", head + tensor, "application/octet-stream",
                       (("Inference-Header-Content-Length", str(len(head))),))  # fmt: skip

    def multipart(png: bytes) -> Request:
        boundary = "bench-boundary-7d2e"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"i.png\"\r\n"
                "Content-Type: image/png\r\n\r\n")  # fmt: skip
        body = head.encode() + png + f"\r\n--{boundary}--\r\n".encode()
        return Request(path, body, f"multipart/form-data; boundary={boundary}")

    def rest(png: bytes, **options: Any) -> Request:
        return Request.json(path, {"image": base64.b64encode(png).decode(), "top_k": 5, **options})

    return [
        Payload("json", [rest(p) for p in images]),
        Payload("multipart", [multipart(p) for p in images]),
        Payload("v2-binary", [v2(p) for p in images]),
        Payload("json+rollout", [rest(p, return_attention=True) for p in images]),
    ]


class Measured:
    """A started server, whatever it is: its port, its process tree's CPU and memory, and stop."""

    def __init__(self, port: int, tree: Callable[[], list[psutil.Process]], stop: Callable[[], None]) -> None:
        self.port, self.tree, self.stop = port, tree, stop

    def cpu_s(self) -> float:
        return cpu_seconds(self.tree())

    def rss_bytes(self) -> int:
        return rss_bytes(self.tree())


@contextlib.contextmanager
def running(name: str, logs: Path, repository: Path) -> Iterator[Measured]:
    if name in ("attention-serve", "fastapi-ort"):
        configs = configurations(repository, ROOT / "build" / "checkpoints")
        config = configs["in-replica" if name == "attention-serve" else "fastapi-baseline"]
        server: Server = start(name, config, logs)
        try:
            yield Measured(server.port, server.tree, server.stop)
        finally:
            server.stop()
        return
    peer = peers.start(name, model_dir=repository / MODEL / "1")
    try:
        yield Measured(peer.port, peer.processes, peer.stop)
    finally:
        peer.stop()


def payloads(name: str, images: list[bytes]) -> list[Payload]:
    if name == "attention-serve":
        return ours(images)
    if name == "fastapi-ort":
        return [ours(images)[0]]
    return [
        Payload(kind, [peers.request(name, kind, p).loadgen() for p in images]) for kind in peers.KINDS[name]
    ]


def top_indices(body: bytes) -> list[int]:
    """The top-5 class indices of any server's answer: REST (attention-serve, TorchServe) or
    KServe v2 JSON outputs (attention-serve's ``INDICES``, the Triton model's ``indices``)."""
    answer = json.loads(body)
    if "predictions" in answer:
        return [int(p["index"]) for p in answer["predictions"]]
    outputs = {o["name"].lower(): o["data"] for o in answer["outputs"]}
    return [int(i) for i in outputs["indices"]]


async def check(port: int, payload: Payload, expected: list[list[int]]) -> None:
    """Every image of the payload, once: the answer's top 5 must be ONNX Runtime's in-process."""
    conn = await Connection.open("127.0.0.1", port)
    try:
        for request, want in zip(payload.requests, expected, strict=True):
            status, body = await conn.send(request)
            if status != 200 or top_indices(body) != want:
                raise RuntimeError(f"{payload.name}: status {status}, {body[:200]!r}; expected top 5 {want}")
            conn = await conn.renewed()
    finally:
        conn.close()


def measure(server: Measured, payload: Payload, clients: int, seconds: float) -> dict[str, Any]:
    before = server.cpu_s()
    result = asyncio.run(closed_loop("127.0.0.1", server.port, payload.requests, clients, seconds))
    cpu = server.cpu_s() - before
    ok = result.ok
    if not ok:
        raise RuntimeError(f"{payload.name}: no answer ({result.statuses}, {result.errors} errors)")
    return {
        "images_per_s": ok / result.elapsed_s,
        "p50_ms": percentile(result.latencies_s, 50) * 1000,
        "p99_ms": percentile(result.latencies_s, 99) * 1000,
        "cpu_ms_per_image": cpu / ok * 1000,
        "errors": result.errors,
        "rss_mib": server.rss_bytes() / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.image_peers", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--rounds", type=int, default=3, choices=range(1, 100), metavar="N")
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32, 64])
    parser.add_argument(
        "--servers", nargs="+", default=["attention-serve", "fastapi-ort", "torchserve", "pytriton"]
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository",
                        help=f"the model repository whose {MODEL} version 1 every server serves")  # fmt: skip
    args = parser.parse_args(argv)
    # absolute: the peers run from their own folders under build/peers/ (make passes REPO as given)
    args.repository = args.repository.resolve()
    vit = args.repository / MODEL / "1"
    if not (vit / "manifest.json").is_file():
        hint = f"make models REPO={args.repository}"
        print(f"error: no {MODEL}/1 in {args.repository} ({hint})", file=sys.stderr)
        return 2
    outputs.stop_on_sigterm()
    args.out.mkdir(parents=True, exist_ok=True)
    if "torchserve" in args.servers and shutil.which("java") is None:  # before anything is measured
        print("error: TorchServe needs a Java runtime (`apt-get install -y default-jre-headless`), or "
              "leave it out: --servers attention-serve fastapi-ort pytriton", file=sys.stderr)  # fmt: skip
        return 2
    for name in args.servers:
        if name in PINS:
            venv(name, ROOT)  # created once, from the pins
    images = test_images(32)
    expected = [list(map(int, row)) for row in reference(images, vit)[0]]
    rows: dict[str, dict[str, dict[int, list[dict[str, Any]]]]] = {}
    ceiling_rounds: list[dict[str, Any]] = []
    # our servers' logs stay in --out (*.log, not committed): a failed start names one
    for r in range(args.rounds):
        order = args.servers[r % len(args.servers) :] + args.servers[: r % len(args.servers)]
        # the ceiling in every round, right before attention-serve (else the round's first server):
        # this machine's speed drifts ±20 % within minutes; a figure is judged against its minutes'
        beside = "attention-serve" if "attention-serve" in order else order[0]
        for name in order:
            if name == beside:
                print(f"round {r + 1}: the ceiling, decode + preprocess + ONNX Runtime here", flush=True)
                ceiling = ceilings.vit_pipeline_images_per_s(vit, images)
                ceiling_rounds.append(ceiling)
            with running(name, args.out, args.repository) as server:
                for payload in payloads(name, images):
                    asyncio.run(check(server.port, payload, expected))
                    asyncio.run(closed_loop("127.0.0.1", server.port, payload.requests, 8, 1.5))  # warm
                    for clients in args.concurrency:
                        print(f"round {r + 1}: {name} {payload.name}, {clients} clients", flush=True)
                        point = measure(server, payload, clients, args.duration)
                        rows.setdefault(name, {}).setdefault(payload.name, {}).setdefault(clients, []).append(
                            point
                        )
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
        "rounds": args.rounds,
        "duration_s": args.duration,
        "concurrency": args.concurrency,
        "pins": {name: list(PINS[name]) for name in args.servers if name in PINS},
        # the round of the median ceiling (the lower one of two), its by-batch figures with it
        "ceiling": sorted(ceiling_rounds, key=lambda c: c["images_per_s"])[(len(ceiling_rounds) - 1) // 2],
        "ceiling_rounds": ceiling_rounds,
        "results": {
            name: {
                kind: {str(c): median(points) | {"rounds": points} for c, points in by_clients.items()}
                for kind, by_clients in by_kind.items()
            }
            for name, by_kind in rows.items()
        },
    }
    results["goals"] = goals(results)
    path = args.out / f"{outputs.free_stem(args.out, results['date'] + '-peers')}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    report = write_report(results, path.with_suffix(".md"))
    print(f"wrote {path}, {report} and {plot(results, path.with_suffix('.png'))}")
    return 0


def median(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the rounds; errors, the most any round had (a median hid them)."""
    return {k: (max if k == "errors" else statistics.median)(p[k] for p in points) for k in points[0]}


if __name__ == "__main__":
    sys.exit(main())
