"""``make bench-peers``'s report (``benchmarks/image_peers.py``): issue #19's goals judged from
the results, the Markdown and the bar chart of images/s written beside the JSON."""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

GOAL_IMAGES, GOAL_ROLLOUT = 1.2, 1.0  # × the best peer's images/s (issue #19)


def goals(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue #19's goals at each client count: attention-serve's images/s against the best peer's
    (any payload it speaks), at no more server CPU per image; with the rollout, ≥ 1.0 ×."""
    out: list[dict[str, Any]] = []
    res = r["results"]
    if "attention-serve" not in res:
        return out
    for clients in map(str, r["concurrency"]):
        peer_points = [
            (name, kind, point[clients])
            for name, by_kind in res.items()
            if name != "attention-serve"
            for kind, point in by_kind.items()
        ]
        if not peer_points:
            continue
        best_name, best_kind, best = max(peer_points, key=lambda x: x[2]["images_per_s"])
        mine = max(
            ((k, p[clients]) for k, p in res["attention-serve"].items() if k != "json+rollout"),
            key=lambda x: x[1]["images_per_s"],
        )
        rollout = res["attention-serve"].get("json+rollout", {}).get(clients)
        out.append({
            "clients": int(clients),
            "best_peer": f"{best_name} ({best_kind})",
            "best_peer_images_per_s": best["images_per_s"],
            "best_peer_cpu_ms": best["cpu_ms_per_image"],
            "ours": f"attention-serve ({mine[0]})",
            "ratio": mine[1]["images_per_s"] / best["images_per_s"],
            "cpu_ms": mine[1]["cpu_ms_per_image"],
            "rollout_ratio": rollout["images_per_s"] / best["images_per_s"] if rollout else None,
        })  # fmt: skip
    return out


def same_payload(r: dict[str, Any]) -> list[str]:
    """The goals' comparison payload by payload (each against the peer fastest with the same
    payload), and round by round: the goals take each side's fastest payload and each figure's
    median over the rounds, which can hide a comparison that goes the other way on one payload or
    in some rounds. Rounds of a point are the same rounds on both sides (interleaved)."""
    res = r["results"]
    ours = res.get("attention-serve", {})
    lines = [
        "| payload | clients | attention-serve images/s · CPU ms | fastest peer with it "
        "| its images/s · CPU ms | ratio | rounds with ratio ≥ 1.2 | rounds with CPU ≤ the peer's |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, by_clients in ours.items():
        for clients, mine in by_clients.items():
            peers = [(n, k[kind][clients]) for n, k in res.items() if n != "attention-serve" and kind in k]
            if not peers:
                continue
            name, theirs = max(peers, key=lambda x: x[1]["images_per_s"])
            pairs = list(zip(mine.get("rounds", []), theirs.get("rounds", []), strict=False))
            fast = sum(a["images_per_s"] >= GOAL_IMAGES * b["images_per_s"] for a, b in pairs)
            frugal = sum(a["cpu_ms_per_image"] <= b["cpu_ms_per_image"] for a, b in pairs)
            lines.append(
                f"| {kind} | {clients} | {mine['images_per_s']:.0f} · {mine['cpu_ms_per_image']:.2f} | "
                f"{name} | "
                f"{theirs['images_per_s']:.0f} · {theirs['cpu_ms_per_image']:.2f} | "
                f"{mine['images_per_s'] / theirs['images_per_s']:.2f} | {fast} of {len(pairs)} | "
                f"{frugal} of {len(pairs)} |"
            )
    return lines if len(lines) > 2 else []


def write_report(r: dict[str, Any], path: Path) -> Path:
    lines = [
        f"# The image path against its peers ({r['date']})",
        "",
        "`python -m benchmarks.image_peers` (see its docstring): `fashion-vit` behind each server with one "
        "worker / replica and ONNX Runtime on one thread; Fashion-MNIST test PNGs; closed-loop clients "
        f"on raw asyncio connections; {r['rounds']} rounds of {r['duration_s']:.0f} s per point, each "
        f"server started alone in its turn (medians). {os.cpu_count()}-core machine, the load generator "
        "on the same cores. Server CPU is the whole process tree's (Ray's processes, TorchServe's JVM and "
        "Python worker, Triton's server and Python backend stub).",
        "",
        f"![images/s by server and payload]({path.with_suffix('.png').name})",
        "",
        "| server | payload | clients | images/s | p50 / p99 ms | server CPU ms / image | RSS MiB | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, by_kind in r["results"].items():
        for kind, by_clients in by_kind.items():
            for clients, m in by_clients.items():
                lines.append(
                    f"| {name} | {kind} | {clients} | {m['images_per_s']:.0f} | {m['p50_ms']:.1f} / "
                    f"{m['p99_ms']:.1f} | {m['cpu_ms_per_image']:.2f} | {m['rss_mib']:.0f} | "
                    f"{m['errors']:.0f} |"
                )
    lines += ["", "## Goals (issue #19)", ""]
    for g in r["goals"]:
        met = g["ratio"] >= GOAL_IMAGES and g["cpu_ms"] <= g["best_peer_cpu_ms"]
        lines.append(
            f"- {g['clients']} clients: {g['ours']} {g['ratio']:.2f} × the best peer, {g['best_peer']} "
            f"({g['best_peer_images_per_s']:.0f} images/s), at {g['cpu_ms']:.2f} against "
            f"{g['best_peer_cpu_ms']:.2f} ms CPU per image — goal ≥ {GOAL_IMAGES} × at ≤ its CPU: "
            f"**{'met' if met else 'missed'}**."
        )
        if g["rollout_ratio"] is not None:
            ok = g["rollout_ratio"] >= GOAL_ROLLOUT
            lines.append(
                f"  With the rollout as an array: {g['rollout_ratio']:.2f} × — goal ≥ {GOAL_ROLLOUT} × "
                f"**{'met' if ok else 'missed'}**."
            )
    if table := same_payload(r):
        lines += [
            "",
            "Payload by payload and round by round (the goals above take each side's fastest payload, "
            "and each figure's median over the rounds):",
            "",
            *table,
        ]
    c = r["ceiling"]
    top = str(max(r["concurrency"]))
    served = r["results"].get("attention-serve", {}).get("json", {}).get(top)
    lines += [
        "",
        "## The ceiling",
        "",
        "One process, one ONNX Runtime thread, no server: the service's decode + preprocess of every "
        f"image and one run for the logits reach {c['images_per_s']:.0f} images/s (best batch "
        f"{c['best_batch']}); the run alone on ready pixels {c['raw_images_per_s']:.0f} images/s (batch "
        f"{c['raw_best_batch']}). By batch, pipeline / run alone: "
        + ", ".join(
            f"{b}: {c['pipeline_images_per_s_by_batch'][b]:.0f} / {c['raw_images_per_s_by_batch'][b]:.0f}"
            for b in c["pipeline_images_per_s_by_batch"]
        )
        + ".",
    ]
    ceiling_rounds = r.get("ceiling_rounds", [])
    if len(ceiling_rounds) > 1:
        each = ", ".join(f"{x['images_per_s']:.0f}" for x in ceiling_rounds)
        lines.append(
            f"(The round of the median ceiling; each round measured its own, right before attention-serve: "
            f"{each} images/s.)"
        )
    if served:
        # each round's served figure over that round's own ceiling, minutes apart; their median
        pairs = zip(served["rounds"], ceiling_rounds, strict=False)  # a report from before: none
        ratios = [p["images_per_s"] / x["images_per_s"] for p, x in pairs]
        ratio = statistics.median(ratios) if ratios else served["images_per_s"] / c["images_per_s"]
        each = ", ".join(f"{x:.2f}" for x in ratios)
        per_round = f" (each round over its own ceiling: {each})" if ratios else ""
        lines.append(
            f"attention-serve at {top} clients (JSON): {ratio:.2f} × that pipeline ceiling{per_round} — goal "
            f"≥ 0.9 ×: **{'met' if ratio >= 0.9 else 'missed'}** (the servers have both cores, shared with "
            "the load generator; the ceiling one)."
        )
    lines += ["", "Pins of the peers' venvs (`benchmarks/peers/versions.py`):", ""]
    lines += [f"- {name}: {', '.join(pins)}" for name, pins in r["pins"].items()]
    lines += [
        "",
        "TorchServe runs with its logs cut to warnings (no access or metrics log files); the Java "
        "frontend still reads the metrics line its worker prints per batch. Triton keeps its defaults.",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def plot(r: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels: list[str] = []
    values: dict[str, list[float]] = {c: [] for c in map(str, r["concurrency"])}
    for name, by_kind in r["results"].items():
        for kind, by_clients in by_kind.items():
            labels.append(f"{name}\n{kind}")
            for c in values:
                values[c].append(by_clients[c]["images_per_s"])
    fig, ax = plt.subplots(figsize=(max(8, len(labels) * 1.1), 4))
    width = 0.8 / len(values)
    for i, (c, vals) in enumerate(values.items()):
        ax.bar([x + i * width for x in range(len(labels))], vals, width, label=f"{c} clients")
    ax.set_xticks([x + width * (len(values) - 1) / 2 for x in range(len(labels))], labels, fontsize=7)
    ax.set_ylabel("images/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
