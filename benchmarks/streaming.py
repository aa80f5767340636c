"""``make bench-streaming``: token streaming over HTTP (issue #18) — time to first token against
whole-answer latency, and what streaming costs in throughput.

The service (``python -m service``, default in-replica frontend, one replica) on the demo
repository, then on the opus-mt-en-de-shaped Marian of ``make bench-ctranslate2`` when that has
been built (random weights, 48 tokens per answer: a real model's step cost); closed-loop clients
on raw asyncio streams (``benchmarks/loadgen.py``'s connection) send single-text translations
(the demo's date strings; English verses), either streamed (``"stream": true``: Server-Sent
Events, read as they arrive) or plain. At 1, 8 and 32 clients, in ``--rounds`` interleaved
rounds (medians): for streams, the time to the first ``token`` event and to the ``answer``
event, p50/p99; for plain calls, the answer's latency; target tokens/s of both. Goal: streaming
costs at most 10 % of the served tokens/s at 32 clients.

Writes ``benchmarks/results/<date>-streaming.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import outputs
from benchmarks.decoding_load import TEXTS
from benchmarks.loadgen import Connection, Request, percentile
from benchmarks.run import configurations, start

ROOT = Path(__file__).resolve().parents[1]
TOKENS = re.compile(rb'"tokens_generated":(\d+)')
GOAL = 0.9  # streamed tokens/s ≥ 0.9 × plain at the top concurrency


async def streamed(conn: Connection, path: str, body: bytes) -> tuple[float, float, int]:
    """One streamed request on a keep-alive connection → (s to the first token event, s to the
    answer event, target tokens), reading the chunked body as it arrives."""
    start = time.perf_counter()
    conn.writer.write(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    status_line = await conn.reader.readline()
    if not status_line:
        raise ConnectionError("connection closed")
    status = int(status_line.split()[1])
    while (line := await conn.reader.readline()) not in (b"\r\n", b""):  # headers: the body is chunked
        if line.lower().startswith(b"connection:") and b"close" in line.lower():
            conn.closing = True  # the service recycles keep-alive connections now and then
    if status != 200:
        raise RuntimeError(f"status {status}")
    first, body = 0.0, b""
    while not body.endswith(b"\r\n0\r\n\r\n"):  # the chunked body's end, after the answer event
        data = await conn.reader.read(65536)
        if not data:
            raise ConnectionError("connection closed")
        if not first and b"event: token" in data:
            first = time.perf_counter() - start
        body += data
    return first, time.perf_counter() - start, generated(body)


def generated(body: bytes) -> int:
    """The answer's tokens_generated, read without parsing the whole answer (client CPU is shared
    with the server here, and a stream's body is no longer to parse than a plain answer)."""
    match = TOKENS.search(body)
    if match is None:
        raise RuntimeError("no answer")
    return int(match.group(1))


@dataclass(frozen=True)
class Target:
    """A model to stream from: its repository, name, texts and (optionally) a fixed output length."""

    repository: Path
    model: str
    texts: list[str]
    max_length: int | None = None

    def body(self, text: str, stream: bool) -> bytes:
        options = {"max_length": self.max_length} if self.max_length else {}
        return json.dumps({"text": text, "stream": stream, **options}).encode()


def targets(repository: Path) -> list[Target]:
    """The demo's dates-transformer; bible-fr-en-transformer when ``make models-real`` has built it;
    an opus-mt-en-de-shaped Marian (6 + 6 layers, d 512; random weights, 48 tokens per answer)
    when ``make bench-ctranslate2`` has built it."""
    out = [Target(repository, "dates-transformer", TEXTS)]
    if (repository / "bible-fr-en-transformer").is_dir():  # make models-real
        from export.data.bible import splits

        verses = splits(max_words=20)[1][:32]  # held-out French verses
        out.append(Target(repository, "bible-fr-en-transformer", [v.source for v in verses]))
    marian = ROOT / "build" / "ct2_peer" / "repository"
    if (marian / "opus-mt-shape").is_dir():
        from benchmarks.ct2_checkpoint import english_texts

        out.append(Target(marian, "opus-mt-shape", english_texts(32), 48))
    return out


async def closed_loop(
    port: int, target: Target, clients: int, seconds: float, stream: bool
) -> dict[str, Any]:
    path = f"/v1/models/{target.model}/translate"
    bodies = [target.body(t, stream) for t in target.texts]
    first, whole, tokens, errors = [], [], 0, 0
    deadline = time.perf_counter() + seconds

    async def client(i: int) -> None:
        nonlocal tokens, errors
        conn = await Connection.open("127.0.0.1", port)
        n = i
        try:
            while time.perf_counter() < deadline:
                body = bodies[n % len(bodies)]
                n += clients
                try:
                    if stream:
                        f, w, k = await streamed(conn, path, body)
                        first.append(f)
                    else:
                        start = time.perf_counter()
                        status, raw = await conn.send(Request(path, body))
                        if status != 200:
                            raise RuntimeError(f"status {status}")
                        w, k = time.perf_counter() - start, generated(raw)
                except (OSError, RuntimeError, asyncio.IncompleteReadError):
                    errors += 1
                    conn.close()
                    conn = await Connection.open("127.0.0.1", port)
                    continue
                whole.append(w)
                tokens += k
                conn = await conn.renewed()
        finally:
            conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - start
    out = {
        "clients": clients,
        "requests": len(whole),
        "tokens_per_s": tokens / elapsed,
        "answer_p50_ms": percentile(whole, 50) * 1000,
        "answer_p99_ms": percentile(whole, 99) * 1000,
        "errors": errors,
    }
    if stream:
        out |= {
            "first_token_p50_ms": percentile(first, 50) * 1000,
            "first_token_p99_ms": percentile(first, 99) * 1000,
        }
    return out


def median_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "clients"} | {
        "clients": rows[0]["clients"]
    }


def write_report(r: dict[str, Any], path: Path) -> Path:
    top = str(max(r["concurrency"]))
    lines = [
        f"# Token streaming over HTTP ({r['date']})",
        "",
        "`python -m benchmarks.streaming` (see its docstring): the in-replica service with one replica, "
        f"closed-loop clients, {r['rounds']} interleaved rounds of {r['duration_s']:.0f} s per point "
        f"(medians). {os.cpu_count()}-core machine, the load generator on the same cores.",
        "",
        "| model | clients | mode | tokens/s | first token p50 / p99 ms | whole answer p50 / p99 ms "
        "| errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, by_clients in r["results"].items():
        for clients in r["concurrency"]:
            for mode in ("stream", "plain"):
                m = by_clients[str(clients)][mode]
                first = (
                    f"{m['first_token_p50_ms']:.1f} / {m['first_token_p99_ms']:.1f}"
                    if mode == "stream"
                    else "–"
                )
                lines.append(
                    f"| {model} | {clients} | {mode} | {m['tokens_per_s']:.0f} | {first} | "
                    f"{m['answer_p50_ms']:.1f} / {m['answer_p99_ms']:.1f} | {m['errors']:.0f} |"
                )
    lines += ["", f"**Goal: streaming costs ≤ 10 % of the served tokens/s at {top} clients.**", ""]
    for model, ratios in r["ratios_by_round"].items():
        ratio = r["ratio_at_top"][model]
        lines.append(
            f"- {model}: {'met' if ratio >= GOAL else 'missed'}, streamed {ratio:.2f} × plain (rounds: "
            + ", ".join(f"{x:.2f}" for x in ratios)
            + ")."
        )
    lines += [
        "",
        "Tokens chosen within `stream_interval_ms` (default 16 ms, one display frame) of the last "
        "token event go out together in the next; the first token goes at once and the answer as "
        "soon as it is ready. The same top concurrency on a service that sends every decoder step's "
        "tokens as chosen (`ATTN_STREAM_INTERVAL_MS=0`), streamed and plain interleaved:",
        "",
    ]
    for model, e in r.get("every_step", {}).items():
        lines.append(
            f"- {model}: streamed {e['ratio']:.2f} × plain ({e['stream']['tokens_per_s']:.0f} against "
            f"{e['plain']['tokens_per_s']:.0f} tokens/s), "
            f"first token p50 {e['stream']['first_token_p50_ms']:.1f} ms."
        )
    lines += [
        "",
        *r.get("notes", []),
        "",
        *(
            []
            if "bible-fr-en-transformer" in r["results"]
            else [
                "Not measured here: `bible-fr-en-transformer` (it needs `make models-real`, about 30 "
                "minutes of training on this machine)."
            ]
        ),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def every_step(config: Any, target: Target, args: argparse.Namespace) -> dict[str, Any]:
    """The top concurrency again on a service that sends every decoder step's tokens as they are
    chosen (``ATTN_STREAM_INTERVAL_MS=0``), streamed and plain interleaved: what the default's
    coalescing of tokens within a display frame saves."""
    top = max(args.concurrency)
    config = dataclasses.replace(config, env={**config.env, "ATTN_STREAM_INTERVAL_MS": "0"})
    rows: dict[str, list[dict[str, Any]]] = {"stream": [], "plain": []}
    # the server's log stays in --out (*.log, not committed): a failed start names it
    server = start("in-replica", config, args.out)
    try:
        for r in range(args.rounds):
            for mode in ("stream", "plain") if r % 2 == 0 else ("plain", "stream"):
                print(f"{target.model} every step, round {r + 1}: {top} clients, {mode}", flush=True)
                load = closed_loop(server.port, target, top, args.duration, mode == "stream")
                rows[mode].append(asyncio.run(load))
    finally:
        server.stop()
    pairs = zip(rows["stream"], rows["plain"], strict=True)
    ratios = [s["tokens_per_s"] / p["tokens_per_s"] for s, p in pairs]
    return {m: median_of(v) for m, v in rows.items()} | {"ratio": statistics.median(ratios), "rounds": ratios}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.streaming", description=__doc__.split(".")[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    outputs.stop_on_sigterm()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d"),
        "rounds": args.rounds,
        "duration_s": args.duration,
        "concurrency": args.concurrency,
        "results": {},
        "ratios_by_round": {},
        "ratio_at_top": {},
        "every_step": {},
    }
    for target in targets(args.repository):
        config = configurations(target.repository, ROOT / "build" / "checkpoints")["in-replica"]
        rows: dict[int, dict[str, list[dict[str, Any]]]] = {
            c: {"stream": [], "plain": []} for c in args.concurrency
        }
        ratios = []
        # the server's log stays in --out (*.log, not committed): a failed start names it
        server = start("in-replica", config, args.out)
        try:
            for r in range(args.rounds):
                for clients in args.concurrency:
                    for mode in ("stream", "plain") if r % 2 == 0 else ("plain", "stream"):
                        print(f"{target.model} round {r + 1}: {clients} clients, {mode}", flush=True)
                        load = closed_loop(server.port, target, clients, args.duration, mode == "stream")
                        rows[clients][mode].append(asyncio.run(load))
                top = rows[max(args.concurrency)]
                ratios.append(top["stream"][-1]["tokens_per_s"] / top["plain"][-1]["tokens_per_s"])
        finally:
            server.stop()
        results["every_step"][target.model] = every_step(config, target, args)
        results["results"][target.model] = {
            str(c): {m: median_of(v) for m, v in by_mode.items()} for c, by_mode in rows.items()
        }
        results["ratios_by_round"][target.model] = ratios
        results["ratio_at_top"][target.model] = statistics.median(ratios)
    path = args.out / f"{outputs.free_stem(args.out, results['date'] + '-streaming')}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path} and {write_report(results, path.with_suffix('.md'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
