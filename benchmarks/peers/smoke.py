"""Smoke check of the peer servers (issue #19): do they answer what ONNX Runtime says in-process?

``python -m benchmarks.peers.smoke [--peers torchserve pytriton] [--images 20]`` in the main venv.
The images are Fashion-MNIST test items from Debian's ``dataset-fashion-mnist`` as PNGs: 48×48
canvases (the model's size), bare 28×28 items (so the peers' bilinear resize runs) and a few
canvases saved as RGB (so the grey conversion runs). The reference is the service's own
preprocessing (``service.inference.vision``) and one in-process ONNX Runtime run of the graph.

Each peer in turn is started (``servers.start``), sent every image in every payload kind it
speaks, all images at once on their own keep-alive connections (so its batcher forms batches),
each twice on its connection; then stopped, and checked gone. The top-5 indices must equal the
reference's and the probabilities lie within 1e-5. Prints one table row per peer and kind, and
exits non-zero on any mismatch, error or leftover process. A few dozen requests: no load test.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psutil
from PIL import Image

from benchmarks.loadgen import check_host
from benchmarks.peers import servers
from export.data import fashion
from service.inference.manifest import Manifest
from service.inference.vision import decode_image, mode_of, normalise, resize

HOST = "127.0.0.1"
TOLERANCE = 1e-5
ROUNDS = 2  # requests per connection: the second one rides the kept-alive connection


def png(pixels: np.ndarray, mode: str = "L") -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, format="PNG")
    return out.getvalue()


def test_images(n: int) -> list[bytes]:
    """``n`` PNGs: 2 in 5 bare 28×28 items, 1 in 5 RGB canvases, the rest grey 48×48 canvases."""
    items, labels = fashion.load_split("t10k")
    canvases = fashion.make_canvases(items[:n], labels[:n], canvas=48, seed=19)
    out = []
    for i in range(n):
        if i % 5 in (1, 3):
            out.append(png(items[i]))
        else:
            out.append(png(canvases.images[i], "RGB" if i % 5 == 4 else "L"))
    return out


def reference(images: list[bytes], model_dir: Path = servers.MODEL_DIR) -> tuple[np.ndarray, np.ndarray]:
    """The service's preprocessing, one ORT run (one thread), softmax, top 5 → (indices, probs),
    with the ViT version in ``model_dir``."""
    manifest = Manifest.load(model_dir)
    assert manifest.image is not None
    spec = manifest.image
    resized = [resize(decode_image(data, 1 << 24, mode_of(spec)), spec) for data in images]
    pixels = normalise(resized, spec)  # as the service: resized per image, normalised per batch
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    graph = model_dir / manifest.graphs["model"].file
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"pixels": pixels})
    logits = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :5]
    return top, np.take_along_axis(probs, top, axis=1)


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 answer: status and body (Content-Length or chunked)."""
    status = int((await reader.readline()).split()[1])
    length, chunked = 0, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
        elif name.lower() == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if not chunked:
        return status, await reader.readexactly(length)
    body = b""
    while size := int((await reader.readline()).strip(), 16):
        body += (await reader.readexactly(size + 2))[:-2]
    await reader.readline()
    return status, body


async def exchange(port: int, raw: list[bytes]) -> list[list[tuple[int, bytes]]]:
    """Every request on its own connection, all at once, ``ROUNDS`` times each → answers per request."""
    check_host(HOST)

    async def one(request: bytes) -> list[tuple[int, bytes]]:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            answers = []
            for _ in range(ROUNDS):
                writer.write(request)
                answers.append(await read_answer(reader))
            return answers
        finally:
            writer.close()

    return await asyncio.gather(*(one(r) for r in raw))


@dataclass
class Row:
    peer: str
    kind: str
    ok: int
    matched: int
    max_dp: float
    wall_s: float
    problem: str = ""


def check_kind(
    server: servers.PeerServer, kind: str, images: list[bytes], ref: tuple[np.ndarray, np.ndarray]
) -> Row:
    raw = [servers.request(server.name, kind, data).raw() for data in images]
    start = time.perf_counter()
    answers = asyncio.run(exchange(server.port, raw))
    wall = time.perf_counter() - start
    ok = matched = 0
    max_dp = 0.0
    problems = []
    for i, rounds in enumerate(answers):
        for status, body in rounds:
            if status != 200:
                problems.append(f"image {i}: HTTP {status} {body[:120]!r}")
                continue
            ok += 1
            rows = servers.parse_answer(server.name, body)
            indices = [r[0] for r in rows]
            probs = np.array([r[2] for r in rows])
            dp = float(np.abs(probs - ref[1][i]).max())
            max_dp = max(max_dp, dp)
            if indices == ref[0][i].tolist() and dp <= TOLERANCE:
                matched += 1
            else:
                problems.append(f"image {i}: {indices} vs {ref[0][i].tolist()}, |Δp| {dp:.2e}")
    return Row(server.name, kind, ok, matched, max_dp, wall, "; ".join(problems[:3]))


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def tree_rss_mb(processes: list[psutil.Process]) -> float:
    total = 0
    for p in processes:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", nargs="+", default=list(servers.KINDS), choices=list(servers.KINDS))
    parser.add_argument("--images", type=int, default=20)
    args = parser.parse_args()
    images = test_images(args.images)
    ref = reference(images)
    rows: list[Row] = []
    notes: list[str] = []
    for name in args.peers:
        start = time.perf_counter()
        server = servers.start(name)
        ready_s = time.perf_counter() - start
        try:
            rows.extend(check_kind(server, kind, images, ref) for kind in servers.KINDS[name])
            processes = server.processes()
            rss = tree_rss_mb(processes)
            tree = ", ".join(f"{p.pid} {p.name()}" for p in processes)
        finally:
            start = time.perf_counter()
            server.stop()
            stop_s = time.perf_counter() - start
        left = [p.pid for p in processes if alive(p)]
        notes.append(f"{name}: ready in {ready_s:.1f} s, stopped in {stop_s:.1f} s, RSS {rss:.0f} MiB "
                     f"after the requests; tree: {tree}; left after stop: {left or 'none'}")  # fmt: skip
        if left:
            rows.append(Row(name, "stop", 0, 0, 0.0, 0.0, f"processes left: {left}"))
    requests = args.images * ROUNDS
    print(
        f"\n{args.images} images × {ROUNDS} requests each; reference: service preprocessing + in-process ORT"
    )
    print(f"{'peer':<11} {'kind':<10} {'2xx':>7} {'top-5 ok':>9} {'max |Δp|':>9} {'wall s':>7}  problems")
    for r in rows:
        print(f"{r.peer:<11} {r.kind:<10} {r.ok:>3}/{requests:<3} {r.matched:>5}/{requests:<3} "
              f"{r.max_dp:>9.1e} {r.wall_s:>7.2f}  {r.problem or '-'}")  # fmt: skip
    for note in notes:
        print(note)
    return 0 if all(not r.problem and r.matched == requests for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
