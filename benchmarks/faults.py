"""``python -m benchmarks.faults`` (``make bench-faults``): the service under faults and overload.

Both scenarios run the default frontend (in-replica) with two serving replicas behind one port:

* **kill** — closed-loop load (16 clients on keep-alive connections; a request whose connection
  drops is sent once more on a new one, as any client with a retry policy does — inference is
  idempotent); after 5 s one replica is killed with SIGKILL. Reported: requests that failed
  after the retry (goal ≤ 0.1 %), requests retried, and the time from the kill until throughput
  is back to 90 % of what it was (goal ≤ 10 s; Ray replaces the replica, which rejoins the port).
* **overload** — the capacity is measured (64 clients, closed loop), then Poisson arrivals at
  4× and at 10× that rate, 10 s each. Reported: the share answered 503 and how fast (p99), the
  p99 of the accepted requests (bounded by queue limit ÷ capacity), errors other than 503, RSS
  before/after, and how late the load generator started its requests: on two cores it shares
  with the service it cannot offer 10× a capacity of several hundred requests/s, and its lag
  (with the new connections a request that finds none idle opens) then dominates the
  latencies; 4× is the overload it can offer there.
* **sustained heavy overload** — one replica, a 10 s request timeout, 350 clients on keep-alive
  connections each sending 64 texts at beam 8 to dates-transformer back to back for 40 s (a
  client waits 1 s after a 503, as ``Retry-After`` asks), once with the admission by predicted
  wait (``service/inference/admission.py``) and once counting requests only
  (``ATTN_LIMITS__SHED_BY_PREDICTED_WAIT=false``). Reported: answers and answers/s, their p50 /
  p99, 504s (requests that waited out the timeout), 503s and how fast they came.

Writes ``benchmarks/results/<date>-faults.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks import outputs
from benchmarks.loadgen import Request, Result, closed_loop, open_loop, percentile
from benchmarks.run import ROOT, TEXTS, Server, configurations, start
from benchmarks.targets import SERVICE_X2

SLOW = [Request.json("/v1/models/dates-transformer/translate", {"text": t, "beam_size": 4}) for t in TEXTS]
HEAVY = Request.json("/v1/models/dates-transformer/translate", {"text": TEXTS * 8, "beam_size": 8})


def replicas(server: Server) -> list[int]:
    return [p.pid for p in server.tree() if "ServeReplica:attention:replica" in " ".join(p.cmdline())]


def throughput(result: Result, begin: float, bucket_s: float = 0.5) -> list[float]:
    """Answers per second in consecutive buckets from ``begin``."""
    counts: dict[int, int] = {}
    for t in result.answered_at:
        counts[int((t - begin) / bucket_s)] = counts.get(int((t - begin) / bucket_s), 0) + 1
    return [counts.get(i, 0) / bucket_s for i in range(max(counts, default=-1) + 1)]


def recovery_bucket(rates: list[float], k: int, before: float) -> int | None:
    """The first half-second bucket from the kill (``k``) on after which throughput, averaged over
    1 s, stays at ≥ 90 % of ``before`` to the end (the last, partial bucket left out): ``k`` when it
    never dipped; None when it never came back for good. A dip that comes later (the clients'
    connections moving to the replacement replica) counts."""
    full = rates[:-1]
    smooth = [(full[j] + full[j + 1]) / 2 for j in range(len(full) - 1)]  # whole seconds only
    for i in range(k, len(smooth)):
        if all(r >= 0.9 * before for r in smooth[i:]):
            return i
    return None


def kill(server: Server, duration_s: float = 20, kill_at_s: float = 5) -> dict[str, Any]:
    victim = replicas(server)[0]
    begin = time.perf_counter()
    timer = threading.Timer(kill_at_s, os.kill, (victim, signal.SIGKILL))
    timer.daemon = True
    timer.start()
    try:
        result = asyncio.run(closed_loop("127.0.0.1", server.port, SLOW, 16, duration_s, retries=1))
        timer.join()
    finally:  # a Ctrl-C or SIGTERM before the kill: no SIGKILL later, to a PID that may be reused
        timer.cancel()
    rates = throughput(result, begin)
    k = int(kill_at_s / 0.5)
    before = statistics.median(rates[2:k]) if k > 2 else max(rates, default=0)
    recovered = recovery_bucket(rates, k, before)
    total = result.ok + result.errors
    return {
        "requests": total,
        "failed": result.errors,
        "failed_share": result.errors / max(1, total),
        "retried": result.retried,
        "throughput_before_per_s": before,
        "seconds_to_full_throughput": None if recovered is None else (recovered - k) * 0.5,
        "throughput_per_half_second": rates,
        "replicas_after": len(replicas(server)),
    }


def overload(
    server: Server, factors: tuple[float, ...] = (4, 10), duration_s: float = 10
) -> list[dict[str, Any]]:
    """The capacity, then each overload factor in turn (each once every request of the one before
    was answered)."""
    capacity = asyncio.run(closed_loop("127.0.0.1", server.port, SLOW, 64, 3)).ok / 3
    return [{"factor": f, **_overload(server, capacity, f, duration_s)} for f in factors]


def _overload(server: Server, capacity: float, factor: float, duration_s: float) -> dict[str, Any]:
    rss_before = server.rss_bytes()
    result = asyncio.run(open_loop("127.0.0.1", server.port, SLOW, factor * capacity, duration_s))
    shed = result.statuses.get(503, 0)
    accepted = [lat for lat, code in zip(result.latencies_s, result.codes, strict=True) if code == 200]
    refused = [lat for lat, code in zip(result.latencies_s, result.codes, strict=True) if code == 503]
    total = sum(result.statuses.values()) + result.dropped
    return {
        "capacity_per_s": capacity,
        "offered_per_s": factor * capacity,
        "requests": total,
        "answered_503_share": shed / max(1, total),
        "p99_503_ms": percentile(refused, 99) * 1000,
        "p99_accepted_ms": percentile(accepted, 99) * 1000,
        "late_p50_ms": percentile(result.late_s, 50) * 1000,
        "late_p99_ms": percentile(result.late_s, 99) * 1000,
        "other_errors": total - result.ok - shed,
        "rss_before_mib": rss_before / 2**20,
        "rss_after_mib": server.rss_bytes() / 2**20,
        "healthy_after": server.ready(),
    }


def sustained(
    repository: Path, out: Path, clients: int = 350, duration_s: float = 40, timeout_s: float = 10
) -> list[dict[str, Any]]:
    """The sustained heavy overload, with the admission by predicted wait and without it."""
    rows = []
    for predicted in (True, False):
        base = configurations(repository, ROOT / "build" / "checkpoints")["in-replica"]
        env = {"ATTN_LIMITS__REQUEST_TIMEOUT_S": str(timeout_s),
               "ATTN_LIMITS__SHED_BY_PREDICTED_WAIT": str(predicted).lower()}  # fmt: skip
        server = start("sustained", dataclasses.replace(base, env={**base.env, **env}), out)
        try:
            result = asyncio.run(
                closed_loop("127.0.0.1", server.port, [HEAVY], clients, duration_s, shed_wait_s=1.0)
            )
        finally:
            server.stop()
        rows.append(
            {"predicted_wait": predicted, "clients": clients, "timeout_s": timeout_s, **_answers(result)}
        )
    return rows


def _answers(result: Result) -> dict[str, Any]:
    """A sustained run's answers, 504s and 503s."""
    by_status: dict[int, list[float]] = {}
    for latency, code in zip(result.latencies_s, result.codes, strict=True):
        by_status.setdefault(code, []).append(latency)
    ok, shed = by_status.get(200, []), by_status.get(503, [])
    return {
        "answered": len(ok), "answered_per_s": len(ok) / result.elapsed_s,
        "p50_answered_ms": percentile(ok, 50) * 1000, "p99_answered_ms": percentile(ok, 99) * 1000,
        "timed_out_504": len(by_status.get(504, [])), "refused_503": len(shed),
        "p99_503_ms": percentile(shed, 99) * 1000,
        "other": sum(len(v) for s, v in by_status.items() if s not in (200, 503, 504)) + result.dropped,
    }  # fmt: skip


def _sustained_row(o: dict[str, Any]) -> str:
    admission = "predicted wait" if o["predicted_wait"] else "count only"
    return (
        f"| {admission} | {o['answered']} | {o['answered_per_s']:.1f} | "
        f"{o['p50_answered_ms'] / 1000:.1f} / {o['p99_answered_ms'] / 1000:.1f} s | {o['timed_out_504']} | "
        f"{o['refused_503']} | {o['p99_503_ms']:.0f} ms | {o['other']} |"
    )


def _overload_row(o: dict[str, Any]) -> str:
    return (
        f"| {o['factor']:g}× | {o['capacity_per_s']:.0f} | {o['offered_per_s']:.0f} | "
        f"{o['answered_503_share'] * 100:.0f} % | {o['p99_503_ms']:.1f} ms | {o['p99_accepted_ms']:.0f} ms | "
        f"{o['other_errors']} | {o['rss_before_mib']:.0f} → {o['rss_after_mib']:.0f} | "
        f"{o['healthy_after']} | {o['late_p50_ms']:.1f} / {o['late_p99_ms']:.1f} ms |"
    )


def _recovery(seconds: float | None) -> str:
    return "not recovered" if seconds is None else f"{seconds} s"


def report(results: dict[str, Any], path: Path) -> Path:
    k = results["kill"]
    lines = [
        f"# attention-serve under faults and overload, {results['date']}", "",
        f"Machine: {os.cpu_count()} CPUs. Service: in-replica frontend, 2 replicas on one port, demo "
        "repository; load: dates-transformer, beam 4 (python -m benchmarks.faults).", "",
        "## A replica killed under load (SIGKILL, 16 clients, one retry on a dropped connection)", "",
        "| requests | failed after retry | retried | throughput before (req/s) | back to 90 % after | "
        "replicas after |", "|---|---|---|---|---|---|",
        f"| {k['requests']} | {k['failed']} ({k['failed_share'] * 100:.2f} %; goal ≤ 0.1 %) | "
        f"{k['retried']} | "
        f"{k['throughput_before_per_s']:.0f} | {_recovery(k['seconds_to_full_throughput'])} (goal ≤ 10 s) | "
        f"{k['replicas_after']} |", "",
        "Where retries happen: in the client. A replica that dies drops its connections; the "
        "requests on them were idempotent inference, so the client sends them again and the kernel "
        "gives the new connection to a live replica on the same port. The service itself never "
        "retries (it cannot know whether a lost answer was computed).", "",
        "## Overload: 4× and 10× capacity (open loop, Poisson arrivals, 10 s each)", "",
        "| factor | capacity (req/s) | offered (req/s) | answered 503 | p99 of a 503 | p99 accepted | "
        "other errors | RSS before → after (MiB) | healthy after | requests started late, p50 / p99 |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *map(_overload_row, results["overload"]), "",
        "Latencies run from when the load generator started each request, which shares the two cores "
        "with the service: \"started late\" is how far behind its arrival time (Poisson) it began. Once "
        "that reaches the latencies' order, the generator could not offer the rate: the 503s' p99 "
        "then measures the machine, the generator's own backlog and new connections included, more "
        "than the service's shedding.", "",
    ]  # fmt: skip
    if "sustained" in results:
        o = results["sustained"][0]
        lines += [
            f"## Sustained heavy overload: {o['clients']} clients, 64 texts at beam 8, "
            f"{o['timeout_s']:g} s timeout, one replica", "",
            "| admission | answered | answers/s | p50 / p99 answered | 504 (timed out) | 503 | "
            "p99 of a 503 | other |", "|---|---|---|---|---|---|---|---|",
            *map(_sustained_row, results["sustained"]), "",
            "Counting requests admits whatever they cost: the queue holds more work than the timeout "
            "allows, requests wait it out for a 504 while holding rows of the batch, and the answers "
            "that come arrive near the timeout. Predicting the wait refuses at once what would not be "
            "answered in time (`service/inference/admission.py`).", "",
        ]  # fmt: skip
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.faults", description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    outputs.stop_on_sigterm()
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    results: dict[str, Any] = {"date": stamp}
    stem = outputs.free_stem(args.out, f"{stamp}-faults")
    service = configurations(args.repository, ROOT / "build" / "checkpoints")[SERVICE_X2]
    server = start(SERVICE_X2, service, args.out)
    try:
        results["overload"] = overload(server)
        results["kill"] = kill(server)
    finally:
        server.stop()
    results["sustained"] = sustained(args.repository, args.out)
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {report(results, args.out / f'{stem}.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
