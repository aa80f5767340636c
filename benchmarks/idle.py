"""``make bench-idle``: what an idle service costs — the CPU each of its processes uses while no
request arrives, and how long it takes to start.

The service (``python -m service``, default settings: in-replica frontend, one replica, its own
private Ray) on the demo repository, started once per configuration and round, in turns: left
alone ``--settle`` seconds after it answers ``/readyz``, then every process of its tree is read
for CPU time over ``--window`` seconds (user + system, by process: Ray's actors by title, Python
helpers by script). Configurations: the service's defaults, and the same with Ray Serve's control
loop at Ray's own default, 0.1 s (``ATTN_SERVE_CONTROL_LOOP_S``; the service runs it every 0.5 s).
Medians over ``--rounds``.

Why it matters beyond an idle machine: Ray's processes keep this up under load, where the image
path's server-CPU comparison with TorchServe (``benchmarks/image_peers.py``) counts the whole
tree — 88 ms a second is ≈ 28 µs an image at 3,200 images/s (an interleaved A/B under load did
not resolve the control loop's share of it from that A/B's noise).

Writes ``benchmarks/results/<date>-idle.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks import outputs
from benchmarks.run import Server, configurations, start

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "service defaults (control loop 0.5 s)": {},
    "Ray's control loop (0.1 s)": {"ATTN_SERVE_CONTROL_LOOP_S": "0.1"},
}
#: images/s at which the report spreads the idle CPU over requests (the image path at 64 clients)
IMAGES_PER_S = 3200


def process_name(p: psutil.Process, root: int) -> str:
    """A readable name: Ray's actors and agents by title, Python helpers by script, binaries by name."""
    if p.pid == root:
        return "python -m service (driver)"
    argv = p.cmdline()
    if argv and argv[0].startswith("ray::"):
        return argv[0].split()[0]
    script = next((Path(a).name for a in argv[1:] if a.endswith(".py")), None)
    if script:
        return script
    if any("decode_child" in a for a in argv):
        return "decode processes (one per translation model, children of the replica)"
    return p.name()


def measure(server: Server, settle_s: float, window_s: float) -> dict[str, float]:
    """ms of CPU per second per process over ``window_s``, after ``settle_s`` of quiet."""
    time.sleep(settle_s)
    before = server.cpu_by_process(process_name)
    started = time.monotonic()
    time.sleep(window_s)
    after = server.cpu_by_process(process_name)
    elapsed = time.monotonic() - started
    return {name: (after[name] - before.get(name, 0.0)) / elapsed * 1000 for name in after}


def run(args: argparse.Namespace) -> dict[str, Any]:
    base = configurations(args.repository, ROOT / "build" / "checkpoints")["in-replica"]
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    # the servers' logs stay in --out (*.log, not committed): a failed start names one
    for r in range(args.rounds):
        order = list(CONFIGS) if r % 2 == 0 else list(CONFIGS)[::-1]
        for name in order:
            print(f"round {r + 1}: {name}", flush=True)
            config = dataclasses.replace(base, env={**base.env, **CONFIGS[name]})
            server = start("idle", config, args.out)
            try:
                rows[name].append(
                    {
                        "startup_s": server.startup_s,
                        "cpu_ms_per_s": measure(server, args.settle, args.window),
                    }
                )
            finally:
                server.stop()
    results = {}
    for name, runs in rows.items():
        names = sorted({p for run in runs for p in run["cpu_ms_per_s"]})
        per_process = {p: statistics.median(run["cpu_ms_per_s"].get(p, 0.0) for run in runs) for p in names}
        totals = [sum(run["cpu_ms_per_s"].values()) for run in runs]
        results[name] = {
            "cpu_ms_per_s": per_process,
            "total_ms_per_s": statistics.median(totals),
            "total_by_round": totals,
            "startup_s": statistics.median(run["startup_s"] for run in runs),
            "startup_s_by_round": [run["startup_s"] for run in runs],
        }
    return {
        "date": dt.date.today().isoformat(),
        "rounds": args.rounds,
        "settle_s": args.settle,
        "window_s": args.window,
        "results": results,
    }


def write_report(r: dict[str, Any], path: Path) -> Path:
    names = list(r["results"])
    processes = sorted(
        {p for res in r["results"].values() for p in res["cpu_ms_per_s"]},
        key=lambda p: -r["results"][names[0]]["cpu_ms_per_s"].get(p, 0.0),
    )
    lines = [
        f"# An idle service: CPU by process, and start-up ({r['date']})",
        "",
        "`python -m benchmarks.idle` (see its docstring): `python -m service` with its defaults on the "
        f"demo repository, no requests; CPU over {r['window_s']:.0f} s windows after {r['settle_s']:.0f} s "
        f"of quiet, {r['rounds']} rounds, configurations in turns (medians). {os.cpu_count()}-core machine.",
        "",
        "| process | " + " | ".join(f"{n}: ms CPU / s" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for p in processes:
        cells = " | ".join(f"{r['results'][n]['cpu_ms_per_s'].get(p, 0.0):.1f}" for n in names)
        lines.append(f"| {p} | {cells} |")
    lines.append(
        "| **total** | " + " | ".join(f"**{r['results'][n]['total_ms_per_s']:.1f}**" for n in names) + " |"
    )
    lines.append(
        "| start-up to ready, s | " + " | ".join(f"{r['results'][n]['startup_s']:.1f}" for n in names) + " |"
    )
    lines += ["", "Totals by round:", ""]
    for n in names:
        res = r["results"][n]
        lines.append(
            f"- {n}: " + ", ".join(f"{t:.1f}" for t in res["total_by_round"]) + " ms/s; start-up "
            + ", ".join(f"{s:.1f}" for s in res["startup_s_by_round"]) + " s"
        )  # fmt: skip
    ours, rays = (r["results"][n]["total_ms_per_s"] for n in names[:2])
    lines += [
        "",
        f"The service's defaults spend {ours:.0f} ms of CPU a second idle against {rays:.0f} with Ray's "
        f"control loop ({(rays - ours) / rays:.0%} less). Spread over {IMAGES_PER_S:,} images/s (the "
        f"image path at 64 clients), that is {ours / IMAGES_PER_S * 1000:.0f} against "
        f"{rays / IMAGES_PER_S * 1000:.0f} µs of each image's server CPU.",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def parser() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    options.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    options.add_argument("--rounds", type=int, default=3)
    options.add_argument("--settle", type=float, default=10.0, help="quiet seconds before measuring")
    options.add_argument("--window", type=float, default=20.0, help="seconds measured")
    options.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return options


def main(argv: list[str] | None = None) -> int:
    return outputs.main(argv, parser(), run, "idle", write_report)


if __name__ == "__main__":
    sys.exit(main())
