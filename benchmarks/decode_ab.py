"""A/B of where a translation model's decode loop runs: a process of its own or a thread of the
serving process (``ATTN_DECODE_PROCESS``), served over HTTP.

``python -m benchmarks.decode_ab [--rounds 4] [--duration 5] [--clients 32]`` starts two services
on the demo repository at once (default in-replica frontend, one replica each), one per setting,
and loads them in turn, alternating which goes first each round, with the streaming benchmark's
closed-loop clients (``benchmarks/streaming.py``: dates-transformer, streamed and plain). Both
services are up through every round, so a minute's speed of this 2-core machine affects both
alike. Prints each point and a Markdown table of medians.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import tempfile
from pathlib import Path

from benchmarks.streaming import ROOT, closed_loop, configurations, start, targets

SETTINGS = {"own process": "true", "thread": "false"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.decode_ab", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=32)
    args = parser.parse_args(argv)
    target = targets(args.repository)[0]
    base = configurations(target.repository, ROOT / "build" / "checkpoints")["in-replica"]
    tokens: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        servers = {}
        try:
            for name, value in SETTINGS.items():
                config = dataclasses.replace(base, env={**base.env, "ATTN_DECODE_PROCESS": value})
                directory = Path(tmp) / value
                directory.mkdir()
                servers[name] = start("in-replica", config, directory)
            for r in range(args.rounds):
                for name in list(SETTINGS) if r % 2 == 0 else list(SETTINGS)[::-1]:
                    for mode in ("stream", "plain"):
                        load = closed_loop(
                            servers[name].port, target, args.clients, args.duration, mode == "stream"
                        )
                        out = asyncio.run(load)
                        tokens.setdefault((name, mode), []).append(out["tokens_per_s"])
                        print(f"round {r + 1}: {name}, {mode}: {out['tokens_per_s']:.0f} tokens/s, "
                              f"{out['errors']} errors", flush=True)  # fmt: skip
        finally:
            for server in servers.values():
                server.stop()
    print(
        f"\n| decode loop | plain tokens/s | streamed tokens/s | streamed / plain ({args.clients} clients) |"
    )
    print("|---|---|---|---|")
    for name in SETTINGS:
        plain, stream = tokens[(name, "plain")], tokens[(name, "stream")]
        ratios = " / ".join(f"{s / p:.2f}" for s, p in zip(stream, plain, strict=True))
        print(
            f"| {name} | {statistics.median(plain):,.0f} | {statistics.median(stream):,.0f} | "
            f"{statistics.median(stream) / statistics.median(plain):.2f} (rounds {ratios}) |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
