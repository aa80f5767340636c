"""``make bench``: ceilings, then each server configuration under closed-loop load, interleaved.

For every configuration and concurrency: requests/s (and images/s or target tokens/s), latency
p50/p90/p99, server CPU ms per request (CPU seconds of the server's whole process tree divided by
requests), mean formed batch size (from the answers' metrics), errors; per configuration the
start-up time to ready and the RSS of the process tree. Rounds interleave the configurations and
the report keeps medians, because the machine is noisy. Writes ``benchmarks/results/<date>.json``
and ``<date>.md`` with PNG plots beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import requests

from benchmarks import ceilings, outputs, profiling, report, targets, tiny
from benchmarks.loadgen import Request, closed_loop, percentile
from benchmarks.ports import service_ports

ROOT = Path(__file__).resolve().parents[1]
#: the checkpoint the PyTorch-eager reference serves: the demo NMT model of the nmt-transformer workload
TORCH_MODEL = "dates-transformer"
SAMPLE = ROOT / "docs" / "samples" / "bag.png"
TEXTS = ["5 mars 2024", "Tuesday, July 4, 1995", "31.12.1999", "12 de mayo de 2003", "3 juin 1980",
         "Samstag, 15. Mai 1976", "9/9/1986", "mar, 31 mar 2009"]  # fmt: skip


@dataclass(frozen=True)
class Workload:
    name: str
    requests: list[Request]
    unit: str  # what the extra throughput column counts


def workloads() -> list[Workload]:
    image = base64.b64encode(SAMPLE.read_bytes()).decode()
    tiny_image = base64.b64encode(tiny.image()).decode()

    def translate(model: str) -> list[Request]:
        return [Request.json(f"/v1/models/{model}/translate", {"text": t}) for t in TEXTS]

    def classify(model: str, png: str) -> list[Request]:
        return [Request.json(f"/v1/models/{model}/classify", {"image": png, "top_k": 1})]

    return [
        Workload("tiny-rest", classify(tiny.TINY, tiny_image), "images"),
        Workload("nmt-transformer", translate("dates-transformer"), "tokens"),
        Workload("nmt-bahdanau", translate("dates-bahdanau"), "tokens"),
        Workload("vit", classify("fashion-vit", image), "images"),
    ]


@dataclass(frozen=True)
class Configuration:
    cmd: list[str]
    env: dict[str, str]
    #: workloads it serves (None: all)
    serves: tuple[str, ...] | None = None
    #: where clients connect, relative to the HTTP port it is given
    port_offset: int = 0
    #: the checkout whose code it runs (None: this one)
    cwd: Path | None = None


#: the module a replica's decode processes run, and the name they are reported under
DECODE_CHILD = "decode_child"
DECODE_PROCESS = "decode process (a replica's translation loop)"
#: a readable name for a process of a server's tree (the process, the server's root pid)
ProcessName = Callable[[psutil.Process, int], str]


def process_title(p: psutil.Process, root: int) -> str:
    """The process's name; Ray's actors by title, a replica's decode processes as such (the
    translation loop: they are "python" by name), the server's own process as such."""
    title = " ".join(p.cmdline())
    if title.startswith("ray::"):
        return title.split()[0]
    if DECODE_CHILD in title:
        return DECODE_PROCESS
    return p.name() if p.pid != root else "server main process"


class Server:
    """A server process we start and stop by PID, with its tree's CPU time and memory."""

    def __init__(
        self, name: str, cmd: list[str], env: dict[str, str], port: int, log: Path, cwd: Path | None = None
    ) -> None:
        self.name, self.port, self.env = name, port, env
        start = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, env={**os.environ, **env}, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=cwd
        )
        try:
            self._wait_ready(start, log)
        except BaseException:
            self.stop()  # never leave a half-started server (and its Ray) behind
            raise
        self.startup_s = time.perf_counter() - start

    def _wait_ready(self, start: float, log: Path) -> None:
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{self.port}/readyz", timeout=10).status_code == 200:
                    return
            except requests.RequestException:  # not listening yet, or still warming up
                pass
            if self.proc.poll() is not None or time.perf_counter() - start > 300:
                raise RuntimeError(f"{self.name} did not become ready; see {log}")
            time.sleep(0.2)

    def ready(self) -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{self.port}/readyz", timeout=10).status_code == 200
        except requests.RequestException:
            return False

    def tree(self) -> list[psutil.Process]:
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def cpu_by_process(self, name: ProcessName | None = None) -> dict[str, float]:
        """CPU seconds (user + system) per process of the tree, keyed by ``name(process, root
        pid)`` (default: :func:`process_title`), processes of one name summed."""
        name = name or process_title
        out: dict[str, float] = {}
        for p in self.tree():
            try:
                t = p.cpu_times()
                key = name(p, self.proc.pid)
            except psutil.NoSuchProcess:
                continue
            out[key] = out.get(key, 0.0) + t.user + t.system
        return out

    def replica_pid(self) -> int | None:
        """A serving replica of the in-replica frontend, for the profiler."""
        for p in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                if "ServeReplica:attention:replica" in " ".join(p.cmdline()):
                    return p.pid
        return None

    def cpu_s(self) -> float:
        return sum(self.cpu_by_process().values())

    def rss_bytes(self) -> int:
        return rss_bytes(self.tree())

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def cpu_seconds(processes: list[psutil.Process]) -> float:
    """User + system CPU seconds of ``processes`` (those gone meanwhile count nothing)."""
    total = 0.0
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def rss_bytes(processes: list[psutil.Process]) -> int:
    total = 0
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def configurations(repository: Path, checkpoints: Path) -> dict[str, Configuration]:
    """The servers compared: our frontends, the plain FastAPI + ORT baseline and PyTorch eager."""
    service = [sys.executable, "-m", "service"]

    def ray(frontend: str, **env: str) -> dict[str, str]:
        return {"ATTN_REPOSITORY": str(repository), "RAY_USAGE_STATS_ENABLED": "0",
                "ATTN_LOG_LEVEL": "WARNING", "ATTN_FRONTEND": frontend, **env}  # fmt: skip

    return {
        "fastapi-baseline": Configuration(
            [sys.executable, "-m", "benchmarks.baseline_server", "--repository", str(repository)], {}
        ),
        "pytorch-eager": Configuration(
            [
                sys.executable,
                "-m",
                "benchmarks.torch_server",
                "--checkpoint",
                str(checkpoints / "dates-transformer"),
            ],
            {},
            serves=("nmt-transformer",),
        ),
        "in-replica": Configuration(service, ray("in-replica")),
        "in-replica-x2": Configuration(service, ray("in-replica", ATTN_NUM_REPLICAS="2")),
        "ray-proxy": Configuration(service, ray("ray-proxy")),
        "ray-direct": Configuration(service, ray("ray-direct"), port_offset=1),
    }


def start(name: str, config: Configuration, out: Path) -> Server:
    """``config``'s server on free loopback ports (room above them for ray-direct's replicas)."""
    port, grpc, metrics = service_ports()
    env = {**config.env, "ATTN_HTTP_PORT": str(port), "ATTN_GRPC_PORT": str(grpc),
           "ATTN_METRICS_PORT": str(metrics)}  # fmt: skip
    cmd = config.cmd if "ATTN_FRONTEND" in env else [*config.cmd, "--port", str(port)]
    return Server(name, cmd, env, port + config.port_offset, out / f"{name}.log", config.cwd)


def from_checkout(configs: dict[str, Configuration], checkout: Path) -> dict[str, Configuration]:
    """The service configurations again, running another checkout's ``service`` package (say, a
    ``git worktree`` of the commit before a change): rows named ``<config>@<commit>``, measured in
    the same interleaved rounds as this checkout's, so a before/after comparison shares the
    machine's noise."""
    git = ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"]
    commit = subprocess.run(git, capture_output=True, text=True, check=True).stdout.strip()
    env = {"PYTHONPATH": str(checkout.resolve())}
    return {
        f"{name}@{commit}": dataclasses.replace(c, env={**c.env, **env}, cwd=checkout.resolve())
        for name, c in configs.items()
        if "ATTN_FRONTEND" in c.env
    }


def measure(
    server: Server, workload: Workload, clients: int, duration_s: float, profile: Path | None = None
) -> dict[str, Any]:
    before = server.cpu_by_process()
    spy = None
    if profile is not None and (replica := server.replica_pid()) is not None:
        spy = profiling.start(replica, duration_s - 1, profile)
    result = asyncio.run(closed_loop("127.0.0.1", server.port, workload.requests, clients, duration_s))
    if spy is not None:
        spy.wait(timeout=60)
    after = server.cpu_by_process()
    by_process = {k: after[k] - before.get(k, 0.0) for k in after}
    cpu = sum(by_process.values())
    batches, units = [], 0
    for body in result.bodies:
        answer = json.loads(body)
        batches.append(answer.get("metrics", {}).get("batch_size", 1))
        if workload.unit == "tokens":
            units += sum(len(t["target_tokens"]) for t in answer["translations"])
    sampled = max(1, len(result.bodies))
    per_request_units = units / sampled if workload.unit == "tokens" else 1.0
    ok = max(1, result.ok)
    return {
        "requests_per_s": result.ok / result.elapsed_s,
        f"{workload.unit}_per_s": result.ok * per_request_units / result.elapsed_s,
        "p50_ms": percentile(result.latencies_s, 50) * 1000,
        "p90_ms": percentile(result.latencies_s, 90) * 1000,
        "p99_ms": percentile(result.latencies_s, 99) * 1000,
        "server_cpu_ms_per_request": cpu / ok * 1000,
        "mean_batch_size": statistics.fmean(batches) if batches else None,
        "errors": result.errors,
        "requests": result.ok,
        "cpu_ms_per_request_by_process": {
            k: v / ok * 1000 for k, v in sorted(by_process.items(), key=lambda kv: -kv[1]) if v / ok > 5e-5
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--checkpoints", type=Path, default=ROOT / "build" / "checkpoints")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--configs", nargs="+", help="only these configurations")
    parser.add_argument("--workloads", nargs="+", help="only these workloads")
    parser.add_argument(
        "--also-from",
        type=Path,
        metavar="CHECKOUT",
        help="also run the service configurations from this checkout (another commit), interleaved",
    )
    args = parser.parse_args(argv)
    outputs.stop_on_sigterm()
    args.out.mkdir(parents=True, exist_ok=True)
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    stamp = outputs.free_stem(args.out, today, report.PLOTS)
    repository = tiny.repository(args.repository, ROOT / "build" / "bench_repository")
    print("ceilings: raw ONNX Runtime, no server", flush=True)
    ceiling = ceilings.measure(repository)
    raw: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
    startup: dict[str, list[float]] = {}
    rss: dict[str, list[int]] = {}
    configs = configurations(repository, args.checkpoints)
    if args.also_from:  # each configuration followed by its twin from the other checkout
        twins = from_checkout(configs, args.also_from)
        twin_of = {k.split("@")[0]: (k, v) for k, v in twins.items()}
        configs = dict(p for name, c in configs.items() for p in [(name, c), twin_of.get(name)] if p)
    for r in range(args.rounds):
        for name, config in configs.items():  # interleaved
            if args.configs and name.split("@")[0] not in args.configs:
                continue
            if name == "pytorch-eager" and not (args.checkpoints / TORCH_MODEL).is_dir():
                print(f"skipping {name}: no checkpoint in {args.checkpoints / TORCH_MODEL}", flush=True)
                continue
            server = start(name, config, args.out)
            startup.setdefault(name, []).append(server.startup_s)
            try:
                for workload in workloads():
                    if args.workloads and workload.name not in args.workloads:
                        continue
                    if config.serves is not None and workload.name not in config.serves:
                        continue
                    for clients in args.concurrency:
                        print(f"round {r + 1}/{args.rounds} {name} {workload.name} c={clients}", flush=True)
                        last = r == args.rounds - 1 and clients == max(args.concurrency)
                        row = measure(server, workload, clients, args.duration, None)
                        raw.setdefault(name, {}).setdefault(workload.name, {}).setdefault(
                            str(clients), []
                        ).append(row)
                        if last and name == targets.SERVICE and workload.name == "tiny-rest":
                            # a pass of its own, not kept: py-spy's sampling costs the replica
                            # CPU, and an --also-from twin is not sampled
                            measure(server, workload, clients, args.duration, args.out / "profile.txt")
                rss.setdefault(name, []).append(server.rss_bytes())
            finally:
                server.stop()
    spy_raw = args.out / "profile.txt"
    profile = profiling.summarise(spy_raw) if spy_raw.exists() else {}
    spy_raw.unlink(missing_ok=True)
    results: dict[str, Any] = {
        "date": stamp, "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "settings": vars(args) | {"repository": str(args.repository), "out": str(args.out)},
        "ceilings": ceiling,
        "startup_s": {k: statistics.median(v) for k, v in startup.items()},
        "rss_bytes": {k: statistics.median(v) for k, v in rss.items()},
        "runs": {c: {w: {n: report.median_row(rows) for n, rows in by_n.items()} for w, by_n in by_w.items()}
                 for c, by_w in raw.items()},
        "profile": {"where": f"{targets.SERVICE} / tiny-rest / {max(args.concurrency)} clients",
                    **profile},
    }  # fmt: skip
    results["targets"] = targets.as_json(targets.evaluate(results))
    path = args.out / f"{stamp}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    md = report.write(results, args.out, stamp)
    print(f"wrote {path} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
