"""The GPU check's report (``benchmarks/gpu.py``): its results as the Markdown written beside the
JSON, ``benchmarks/results/<date>-gpu.md`` — parity, the ViT against ONNX Runtime CUDA alone and the
pipeline ceiling, replicas, NMT served against offline, short requests among long ones."""

from __future__ import annotations

from typing import Any


def markdown(r: dict[str, Any]) -> str:
    raw = r["vit_raw"]
    best = raw["best_images_per_s"]
    by_batch = ", ".join(f"{b}: {v:,.0f}" for b, v in raw["images_per_s_by_batch"].items())
    lines = [f"# GPU check, {r['date']} ({r['device']})", "", "## CUDA against CPU", ""]
    for name, p in r["parity"].items():
        lines.append(f"- **{name}**: " + ", ".join(f"{k} {v:.3g}" for k, v in p.items()))
    lines += [
        "",
        "## ViT",
        "",
        f"ONNX Runtime CUDA alone: best {best:,.0f} images/s at batch {raw['best_batch']}",
    ]
    path = r.get("vit_path", "HTTP, in-replica frontend, one replica")
    pipe = r["vit_pipeline"]
    ceiling = pipe["images_per_s"]
    by_pipe = ", ".join(f"{b}: {v:,.0f}" for b, v in pipe["pipeline_images_per_s_by_batch"].items())
    lines += [
        f"({by_batch}).",
        "",
        f"The pipeline ceiling — one process decoding and preprocessing each PNG as the service does, "
        f"then one run of the batch — is {ceiling:,.0f} images/s at batch {pipe['best_batch']} "
        f"({by_pipe}): the decode and preprocessing on one core, not the GPU, bound one process.",
        "",
        f"Served: {path}.",
        "",
        "| clients | images/s | × pipeline ceiling (goal ≥ 0.9) | × raw best | mean batch | p50 / p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for n, s in r["vit_served"].items():
        rate = s["images_per_s"]
        batch = f"{s['mean_batch']:.0f}" if "mean_batch" in s else "–"  # over HTTP: not collected
        lines.append(
            f"| {n} | {rate:,.0f} | {rate / ceiling:.2f} | {rate / best:.3f} | {batch} "
            f"| {s['p50_ms']:.1f} / {s['p99_ms']:.1f} |"
        )
    if r.get("vit_replicas"):
        lines += ["", "Replicas as processes sharing the device (256 clients split among them):", ""]
        lines += [
            "| replicas | images/s | × one replica | mean batch | p50 / p99 ms |",
            "|---|---|---|---|---|",
        ]
        one = r["vit_served"][256]["images_per_s"]
        for n, s in r["vit_replicas"].items():
            rate = s["images_per_s"]
            lines.append(
                f"| {n} | {rate:,.0f} | {rate / one if one else 0:.2f} | {s['mean_batch']:.0f} "
                f"| {s['p50_ms']:.1f} / {s['p99_ms']:.1f} |"
            )
    lines += ["", "## NMT (greedy, 128 clients in process)", ""]
    lines += [
        "| model | offline tokens/s | served, loop on a thread | ratio (goal ≥ 0.8) "
        "| served, decode process | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for n, m in r["nmt"].items():
        thread, process = m["served"]["tokens_per_s"], m["served_process"]["tokens_per_s"]
        lines.append(
            f"| {n} | {m['offline_tokens_per_s']:,.0f} | {thread:,.0f} | {m['ratio']:.2f} "
            f"| {process:,.0f} ({m['served_process']['providers'][0]}) | {m['ratio_process']:.2f} |"
        )
    c = r.get("short_among_long")
    if c:
        lines += [
            "",
            "## Short requests among long ones (#17 5c; the loop on CUDA in its decode process)",
            "",
            f"A lone 10-token request: {c['solo_short_ms']:.1f} ms (the lower median of 30, warmed, "
            f"before / after the mixes: {c['solo_before_ms']:.1f} / {c['solo_after_ms']:.1f}). "
            f"8 clients of 100-token requests and 8 of "
            f"10-token ones: short p50 {c['short_p50_ms']:.1f} ms = **{c['short_p50_vs_solo']:.2f} × solo** "
            f"(goal ≤ 1.3), p99 {c['short_p99_ms']:.1f} ms.",
        ]
        if "solo_step_ms" in c and "mixed_step_ms" in c:
            lines.append(
                f"Mean step {c['solo_step_ms']:.2f} ms at {c['solo_rows_per_step']:.1f} rows alone, "
                f"{c['mixed_step_ms']:.2f} ms at {c['mixed_rows_per_step']:.1f} rows mixed."
            )
        for part, v in c.get("parts", {}).items():
            lines.append(f"- {part}: short p50 {v['short_p50_ms']:.1f} ms ({v['vs_solo']:.2f} × solo)")
    return "\n".join(lines) + "\n"
