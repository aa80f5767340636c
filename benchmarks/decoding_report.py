"""The Markdown report and the plot of ``make bench-decoding`` (``benchmarks/decoding.py``), from
its results — also when read back from the json (``write_report(json.load(...), path)``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def plot(r: dict[str, Any], path: Path) -> Path:
    """(a) step cost against past length, KV-cached (per-layer and packed caches) and whole-prefix;
    (d) latency against load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for ax, model in zip(axes[:2], ("dates-transformer", "opus-mt-shape"), strict=True):
        for key, by_batch in r["cost_ms_per_step"].items():
            if not key.startswith(model + "/"):
                continue
            for batch, costs in by_batch.items():
                lengths = sorted(costs, key=int)
                style = {"kv": "-", "kv-packed": ":"}.get(key.split("/")[1], "--")
                label = f"{key.split('/')[1]}, batch {batch}"
                xs, ys = [int(t) for t in lengths], [costs[t] for t in lengths]
                ax.plot(xs, ys, style, marker="o", label=label)
        ax.set(title=f"(a) {model}: ms per decoder step", xlabel="past tokens", yscale="log")
        ax.legend(fontsize=8)
    ax = axes[2]
    for mode in ("scheduler", "static"):
        points = r["open_loop"][mode]
        loads = [100 * m["load"] for m in points]
        ax.plot(loads, [m["p50_ms"] for m in points], marker="o", label=f"{mode} p50")
        ax.plot(loads, [m["p99_ms"] for m in points], "--", marker="o", label=f"{mode} p99")
    ax.set(title="(d) open-loop Poisson arrivals", xlabel="% of capacity", ylabel="ms", yscale="log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(r: dict[str, Any], path: Path) -> Path:
    image = plot(r, path.with_suffix(".png"))
    costs_by_length = [c for by_batch in r["cost_ms_per_step"].values() for c in by_batch.values()]
    lengths = sorted({int(t) for costs in costs_by_length for t in costs})  # str keys from json
    lines = [
        f"# Translation decoding: KV cache and the per-model scheduler ({r['date']})",
        "",
        "`python -m benchmarks.decoding` (see its docstring). One ONNX Runtime thread, "
        f"{os.cpu_count()}-core machine.",
        "",
        f"![step cost and open-loop latency]({image.name})",
        "",
        "## (a) Decoder step cost (ms) by past length",
        "",
        "| model / contract | batch | " + " | ".join(f"T={t}" for t in lengths) + " |",
        "|---|---|" + "---|" * len(lengths),
    ]
    for name, by_batch in r["cost_ms_per_step"].items():
        for b, costs in by_batch.items():
            costs = {int(t): ms for t, ms in costs.items()}  # str keys once read back from json
            cells = (f"{costs[t]:.2f}" if t in costs else "–" for t in lengths)
            lines.append(f"| {name} | {b} | " + " | ".join(cells) + " |")
    s = r["served_32_clients"]
    lines += [
        "",
        "## (b) Served tokens/s at 32 clients (in-process worker) vs offline batched greedy",
        "",
        "Each round's served runs are bracketed by offline decodes of a batch of 32; the row is the "
        "round with the median ratio, the last column every round's ratio.",
        "",
        "| | tokens/s | p50 ms | p99 ms | ratio to offline | ratios by round |",
        "|---|---|---|---|---|---|",
        f"| offline batch of 32 | {s['offline_tokens_per_s']:.0f} | | | 1.00 | |",
    ]
    for mode in ("scheduler", "static"):
        m = s[mode]
        ratio = m.get("ratio_to_offline", m["tokens_per_s"] / s["offline_tokens_per_s"])
        by_round = ", ".join(f"{x:.2f}" for x in m.get("ratios", []))
        lines.append(
            f"| {mode} | {m['tokens_per_s']:.0f} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | "
            f"{ratio:.2f} | {by_round} |"
        )
    o = r["open_loop"]
    lines += [
        "",
        f"## (d) Open-loop Poisson arrivals (capacity {o['capacity_requests_per_s']:.0f} req/s, closed loop)",
        "",
        'Latencies count from each request\'s arrival time; "sent late" is how far behind the '
        "arrivals the sending loop ran (reports without it counted from the send).",
        "",
        "| batching | load | requests/s offered | p50 ms | p99 ms | shed (503) | sent late p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in ("scheduler", "static"):
        for m in o[mode]:
            late = f"{m['late_p99_ms']:.1f}" if "late_p99_ms" in m else "–"
            row = f"{m['rate']:.0f} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | {m['shed']} | {late}"
            lines.append(f"| {mode} | {m['load']:.0%} | {row} |")
    lines += [
        "",
        "## (c, e) Short requests (10 tokens) while long ones (100 tokens) decode",
        "",
        "| batching | solo short ms (e) | short p50 ms | short p99 ms | p50 / solo | long answers' tokens "
        "| step ms (rows): solo → mixed |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, m in r["short_among_long"].items():
        step = (
            f"{m['solo_step_ms']:.2f} ({m['solo_rows_per_step']:.0f}) → "
            f"{m['mixed_step_ms']:.2f} ({m['mixed_rows_per_step']:.1f})"
            if "mixed_step_ms" in m
            else "–"
        )
        lines.append(
            f"| {mode} | {m['solo_short_ms']:.1f} | {m['short_p50_ms']:.1f} | {m['short_p99_ms']:.1f} | "
            f"{m['short_p50_vs_solo']:.2f} | {m['long_tokens_mean']:.0f} | {step} |"
        )
    brackets = [
        f"{mode} {m['solo_before_ms']:.1f} / {m['solo_after_ms']:.1f} ms"
        for mode, m in r["short_among_long"].items()
        if "solo_before_ms" in m  # not in reports written before both were measured
    ]
    if brackets:
        lines += [
            "",
            "Solo: the lower median of 30 lone requests measured before and after the mixes, each "
            f"warmed first (before / after: {', '.join(brackets)}).",
        ]
    parts = r["short_among_long"].get("scheduler", {}).get("parts")
    if parts:
        lines += [
            "",
            "What the scheduler's short p50 is made of (clients of each kind, the same solo latency): short "
            "requests share decoder steps with each other as well as with long ones, and on CPU a step's "
            "cost grows with its rows.",
            "",
            "| mix | short p50 ms | p50 / solo |",
            "|---|---|---|",
            *(f"| {part} | {m['short_p50_ms']:.1f} | {m['vs_solo']:.2f} |" for part, m in parts.items()),
        ]
    path.write_text("\n".join(lines) + "\n")
    return path
