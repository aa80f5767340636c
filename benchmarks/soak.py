"""``python -m benchmarks.soak`` (``make bench-soak``): does the service hold steady over a long run
of everything users send it at once — memory, descriptors, threads and processes?

``python -m service`` with its defaults (in-replica frontend, one replica, its own private Ray) on
a copy of the demo repository that it polls every second. The load, every stream at once:

* **REST** — ``--clients`` closed-loop clients on keep-alive connections, over every model:
  both translators greedy, at beam 3 with two texts and attention arrays, and with PNG attention;
  the ViT plain and with its rollout as a PNG overlay. Every answer must be 200.
* **refusals** — a client sending what must be refused, one request every 20 ms: a bad base64
  image, an unknown model, a negative beam. Every answer must be 4xx.
* **abandoned requests** — a client that sends an 8-text beam-4 translation and hangs up before
  the answer, then asks for a token stream (SSE) and hangs up after its first bytes, in a loop.
* **KServe v2 gRPC** — two clients of ``ModelInfer`` on one channel; one call in five is
  cancelled by the client right after it was sent. Every other call must succeed.
* **new versions** — every ``--swap-every`` seconds a new version of each translation model is
  published (copied under a temporary name, renamed into place) and, half a period later, the
  version before it deleted, as a deployment pipeline does: the replica swaps to it at its poll
  and lets the old one go (its decode process ends, its files are closed). Each swap is timed:
  from the rename until both translators answer with the new version, and until the replica is
  down to one decode process per translator (polled every 100 ms).

First ``--warmup`` seconds of that load (everything loaded lazily is loaded, the allocators have
their working sets), ``--cooldown`` seconds of quiet and a reading of every process of the
service's tree — RSS, open descriptors, threads, processes, grouped by name (Ray's actors by
title, the replica's decode processes together). Then ``--duration`` seconds of load, read
every ``--sample-every`` seconds, the same quiet and a last reading. Reported per process: RSS
idle before and after the load and its slope under load over the run's second half (MiB an
hour, least squares); descriptors and threads before, at their peak and after; the answers by
stream; the swaps' times; the readings over time as a plot. The verdict names any answer that was
not as it must be, any swap not done within half a period, and any serving process with more
descriptors or processes after the load than before it.

Writes ``benchmarks/results/<date>-soak.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import datetime as dt
import json
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import psutil

from benchmarks import outputs
from benchmarks.idle import process_name
from benchmarks.loadgen import Connection, Request, closed_loop
from benchmarks.run import ROOT, SAMPLE, TEXTS, Server, configurations, start
from benchmarks.soak_report import plot, write_report
from service.api.protos import grpc_service_pb2 as pb
from service.api.protos import grpc_service_pb2_grpc as pb_grpc

TRANSLATORS = ("dates-transformer", "dates-bahdanau")
VISION = "fashion-vit"


def answered() -> list[Request]:
    """What must be answered 200: every model, with and without attention, arrays and PNGs."""
    image = base64.b64encode(SAMPLE.read_bytes()).decode()
    out = []
    for model in TRANSLATORS:
        path = f"/v1/models/{model}/translate"
        for text in TEXTS[:4]:
            out += [
                Request.json(path, {"text": text}),
                Request.json(path, {"text": [text, TEXTS[-1]], "beam_size": 3, "return_attention": True}),
                Request.json(path, {"text": text, "return_attention": True, "attention_format": "png"}),
            ]
    path = f"/v1/models/{VISION}/classify"
    out += [
        Request.json(path, {"image": image, "top_k": 3}),
        Request.json(path, {"image": image, "return_attention": True, "attention_format": "png"}),
    ]
    return out


def refused() -> list[Request]:
    """What must be refused (4xx): a body that is not an image, a model that is not served, a
    beam below 1."""
    return [
        Request.json(f"/v1/models/{VISION}/classify", {"image": "!!not base64"}),
        Request.json("/v1/models/no-such-model/translate", {"text": TEXTS[0]}),
        Request.json(f"/v1/models/{TRANSLATORS[0]}/translate", {"text": TEXTS[0], "beam_size": -1}),
    ]


async def refuse(port: int, deadline: float, pause_s: float = 0.02) -> Counter[int]:
    """The refusals, one after another on a keep-alive connection, ``pause_s`` apart (so they
    are a share of the traffic, not most of it): their statuses."""
    statuses: Counter[int] = Counter()
    requests, n = refused(), 0
    conn = await Connection.open("127.0.0.1", port)
    try:
        while time.perf_counter() < deadline:
            conn = await conn.renewed()
            status, _ = await conn.send(requests[n % len(requests)])
            statuses[status] += 1
            n += 1
            await asyncio.sleep(pause_s)
    finally:
        conn.close()
    return statuses


async def abandon(port: int, deadline: float) -> int:
    """A request hung up on before its answer, then a stream after its first bytes; how many."""
    heavy = Request.json(f"/v1/models/{TRANSLATORS[0]}/translate", {"text": list(TEXTS), "beam_size": 4})
    stream = Request.json(f"/v1/models/{TRANSLATORS[1]}/translate", {"text": TEXTS[1], "stream": True})
    n = 0
    while time.perf_counter() < deadline:
        for request, read in ((heavy, 0), (stream, 64)):
            conn = await Connection.open("127.0.0.1", port)
            conn.writer.write(request.encode(conn.host))
            await conn.writer.drain()
            if read:
                await conn.reader.read(read)
            else:
                await asyncio.sleep(0.02)
            conn.close()
            n += 1
        await asyncio.sleep(0.05)
    return n


async def kserve_grpc(port: int, deadline: float, clients: int = 2) -> Counter[str]:
    """``ModelInfer`` calls; one in five cancelled once sent. Outcomes: ok, cancelled, or the
    status code of a call that failed."""
    outcomes: Counter[str] = Counter()

    async def client(stub: pb_grpc.GRPCInferenceServiceStub, i: int) -> None:
        n = i
        while time.perf_counter() < deadline:
            request = pb.ModelInferRequest(model_name=TRANSLATORS[n % 2])
            text = request.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
            text.contents.bytes_contents.append(TEXTS[n % len(TEXTS)].encode())
            call = stub.ModelInfer(request, timeout=30)
            if n % 5 == 0:
                await asyncio.sleep(0.002)
                call.cancel()
            try:
                await call
                outcomes["ok"] += 1
            except asyncio.CancelledError:
                outcomes["cancelled"] += 1
            except grpc.aio.AioRpcError as exc:
                outcomes["cancelled" if exc.code() == grpc.StatusCode.CANCELLED else exc.code().name] += 1
            n += clients

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await asyncio.gather(*(client(stub, i) for i in range(clients)))
    return outcomes


def publish(repository: Path, version: int) -> None:
    """Each translation model's ``version`` directory as a copy of the one before, its manifest
    saying so; in place at once (a rename), as a deployment pipeline publishes."""
    for model in TRANSLATORS:
        staging = repository / model / f".staging-{version}"
        shutil.copytree(repository / model / str(version - 1), staging)
        manifest = json.loads((staging / "manifest.json").read_text())
        manifest["version"] = version
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
        staging.rename(repository / model / str(version))


async def swap_versions(server: Server, repository: Path, version: int, every_s: float,
                        deadline: float, since: float) -> list[dict[str, Any]]:  # fmt: skip
    """A new version of each translator every ``every_s`` after ``version`` (the one served);
    the one before it deleted half a period later. Each swap: its version, when it was published
    (seconds after ``since``) and how long it took (``swap_times``, within that half period)."""
    swaps = []
    while time.perf_counter() + every_s < deadline:
        await asyncio.sleep(every_s / 2)
        version += 1
        await asyncio.to_thread(publish, repository, version)
        published = time.perf_counter()
        times = await swap_times(server, version, every_s / 2)
        swaps.append({"version": version, "t_s": round(published - since, 1), **times})
        await asyncio.sleep(max(0.0, published + every_s / 2 - time.perf_counter()))
        for model in TRANSLATORS:
            await asyncio.to_thread(shutil.rmtree, repository / model / str(version - 1))
    return swaps


def decode_processes(server: Server) -> int:
    root = server.proc.pid
    n = 0
    for p in server.tree():
        try:
            n += process_name(p, root).startswith("decode processes")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return n


async def swap_times(server: Server, version: int, limit_s: float, every_s: float = 0.1) -> dict[str, Any]:
    """Polling every ``every_s`` from ``version``'s publishing on: seconds until every translator
    answers with it (``serving_s``; the replica reads the repository every second) and until the
    replica is down to one decode process per translator (``retired_s``: the versions before it
    let go); None where not within ``limit_s``. The polls' statuses other than 200 (``wrong``)."""
    began = time.perf_counter()
    waiting, wrong = set(TRANSLATORS), Counter[str]()
    times: dict[str, Any] = {"serving_s": None, "retired_s": None}
    conn = await Connection.open("127.0.0.1", server.port)
    try:
        while time.perf_counter() - began < limit_s:
            for model in sorted(waiting):
                conn = await conn.renewed()
                request = Request.json(f"/v1/models/{model}/translate", {"text": TEXTS[0]})
                status, body = await conn.send(request)
                if status != 200:
                    wrong[str(status)] += 1
                elif json.loads(body)["version"] == version:
                    waiting.discard(model)
            if not waiting:
                if times["serving_s"] is None:
                    times["serving_s"] = round(time.perf_counter() - began, 2)
                if await asyncio.to_thread(decode_processes, server) == len(TRANSLATORS):
                    times["retired_s"] = round(time.perf_counter() - began, 2)
                    break
            await asyncio.sleep(every_s)
    finally:
        conn.close()
    return {**times, "wrong": dict(wrong)}


def reading(server: Server, began: float) -> dict[str, Any]:
    """RSS (MiB), descriptors and threads of each process of the tree, summed by name."""
    root = server.proc.pid
    by: dict[str, dict[str, float]] = {}
    for p in server.tree():
        try:
            name = process_name(p, root)
            row = (p.memory_info().rss / 2**20, p.num_fds(), p.num_threads())
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        into = by.setdefault(name, {"rss_mib": 0.0, "fds": 0, "threads": 0, "processes": 0})
        for key, value in zip(("rss_mib", "fds", "threads"), row, strict=True):
            into[key] += value
        into["processes"] += 1
    return {"t_s": round(time.perf_counter() - began, 1), "processes": by}


def sample_until(
    server: Server, every_s: float, began: float, stop: threading.Event, into: list[dict[str, Any]]
) -> None:
    while not stop.wait(every_s):
        into.append(reading(server, began))


async def load(server: Server, repository: Path, duration_s: float, version: int, clients: int,
               swap_every_s: float) -> dict[str, Any]:  # fmt: skip
    """Every stream at once for ``duration_s``, new versions from ``version`` + 1 on."""
    since = time.perf_counter()
    deadline = since + duration_s
    grpc_port = int(server.env["ATTN_GRPC_PORT"])
    good, bad, gone, rpcs, swaps = await asyncio.gather(
        closed_loop("127.0.0.1", server.port, answered(), clients, duration_s, keep_every=10**9),
        refuse(server.port, deadline),
        abandon(server.port, deadline),
        kserve_grpc(grpc_port, deadline),
        swap_versions(server, repository, version, swap_every_s, deadline, since),
    )
    return {
        "rest": {"statuses": dict(good.statuses), "errors": good.errors, "per_s": good.ok / good.elapsed_s},
        "refusals": {"statuses": dict(bad)},
        "abandoned": gone,
        "grpc": dict(rpcs),
        "versions": [version + 1, swaps[-1]["version"] if swaps else version],
        "swaps": swaps,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """A warm-up under the same load, quiet, a reading; the load, sampled; quiet, a reading."""
    with tempfile.TemporaryDirectory(prefix="soak-") as scratch:
        repository = Path(scratch) / "repository"
        shutil.copytree(args.repository, repository)  # links followed: the copy is ours to change
        config = configurations(repository, ROOT / "build" / "checkpoints")["in-replica"]
        config = dataclasses.replace(config, env={**config.env, "ATTN_REPOSITORY_POLL_S": "1"})
        server = start("soak", config, args.out)
        try:
            print(f"warm-up: {args.warmup:.0f} s of load", flush=True)
            warmup = asyncio.run(load(server, repository, args.warmup, 1, args.clients, args.swap_every))
            time.sleep(args.cooldown)
            began = time.perf_counter()
            before = reading(server, began)
            samples: list[dict[str, Any]] = []
            stop = threading.Event()
            sampler = threading.Thread(
                target=sample_until, args=(server, args.sample_every, began, stop, samples)
            )
            sampler.start()
            print(f"soak: {args.duration:.0f} s of load", flush=True)
            try:
                version = warmup["versions"][1]
                answers = asyncio.run(
                    load(server, repository, args.duration, version, args.clients, args.swap_every)
                )
            finally:
                stop.set()
                sampler.join()
            loaded_s = time.perf_counter() - began
            time.sleep(args.cooldown)
            after = reading(server, began)
        finally:
            server.stop()
    return {
        "date": dt.date.today().isoformat(),
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "cooldown_s": args.cooldown,
        "clients": args.clients,
        "swap_every_s": args.swap_every,
        "loaded_s": loaded_s,
        "warmup": warmup,
        "answers": answers,
        "before": before,
        "samples": samples,
        "after": after,
    }


def parser() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    options.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    options.add_argument("--duration", type=float, default=900.0, help="seconds of load")
    options.add_argument(
        "--warmup", type=float, default=60.0, help="seconds of load before the first reading"
    )
    options.add_argument("--cooldown", type=float, default=20.0, help="quiet seconds before each reading")
    options.add_argument("--clients", type=int, default=16, help="REST clients that must be answered")
    options.add_argument("--swap-every", type=float, default=20.0, help="seconds between new versions")
    options.add_argument("--sample-every", type=float, default=10.0)
    options.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return options


def main(argv: list[str] | None = None) -> int:
    return outputs.main(argv, parser(), run, "soak", write_report, plot)


if __name__ == "__main__":
    sys.exit(main())
