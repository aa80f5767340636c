"""Markdown report and PNG plots (throughput and p99 against concurrency) from the results."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from benchmarks import targets


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = rows[0].keys()
    out: dict[str, Any] = {}
    for k in keys:
        if isinstance(rows[0][k], dict):  # per-process CPU: median per process
            names = {n for r in rows for n in r[k]}
            out[k] = {n: statistics.median(r[k].get(n, 0.0) for r in rows) for n in names}
            continue
        values = [r[k] for r in rows if r[k] is not None]
        if k == "errors":  # every round's: a median of [0, 0, 250] showed none
            out[k] = max(values, default=0)
            continue
        out[k] = statistics.median(values) if values else None
    out["rounds"] = len(rows)
    return out


#: the plots of a serving report, ``<stamp>-<metric>.png``, with their axis labels
PLOTS = {"requests_per_s": "requests/s", "p99_ms": "p99 latency (ms)"}


def _plots(results: dict[str, Any], out: Path, stamp: str) -> list[str]:
    # imported here: benchmarks.gpu imports this module through benchmarks.run, in .venv-gpu,
    # which has no matplotlib (its report has no plot)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    workloads = sorted({w for by_w in results["runs"].values() for w in by_w})
    # one colour per configuration in every panel (a configuration missing from one panel shifted
    # the colours of the others there)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {config: palette[i % len(palette)] for i, config in enumerate(results["runs"])}
    for metric, label in PLOTS.items():
        fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 3.6), squeeze=False)
        for ax, workload in zip(axes[0], workloads, strict=True):
            for config, by_w in results["runs"].items():
                if workload not in by_w:
                    continue
                points = sorted((int(c), row[metric]) for c, row in by_w[workload].items())
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=config,
                        color=colour[config])  # fmt: skip
            ax.set_title(workload)
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel(label)
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        name = f"{stamp}-{metric}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files


def _cpu_breakdown(results: dict[str, Any]) -> list[str]:
    """Where the server CPU goes, per process, at each configuration's highest concurrency."""
    lines = ["", "## Where the server CPU goes (ms per request, highest concurrency)", ""]
    for config, by_w in results["runs"].items():
        for workload, by_n in by_w.items():
            clients = max(by_n, key=int)
            parts = by_n[clients].get("cpu_ms_per_request_by_process", {})
            top = sorted(parts.items(), key=lambda kv: -kv[1])[:5]
            shown = ", ".join(f"{name} {ms:.2f}" for name, ms in top)
            lines.append(f"- {config} / {workload} / {clients} clients: {shown}")
    return lines


def _profile(results: dict[str, Any]) -> list[str]:
    profile = results.get("profile", {})
    if not profile.get("components"):
        return []
    lines = ["", f"## Profile: {profile['where']} (py-spy, share of the replica's busy samples)", ""]
    shares = ", ".join(f"{name} {share * 100:.0f} %" for share, name in profile["components"])
    lines += [f"By component (self time): {shares}.", ""]
    lines += ["Hottest frames (self time):", ""]
    lines += [f"- {share * 100:.1f} % {frame}" for share, frame in profile["frames"]]
    return lines


def write(results: dict[str, Any], out: Path, stamp: str) -> Path:
    lines = [f"# attention-serve benchmark, {stamp}", ""]
    lines += [f"Machine: {results['machine']['cpus']} CPUs, Python {results['machine']['python']}. "
              f"Closed-loop load, {results['settings']['duration']} s per point, median of "
              f"{results['settings']['rounds']} interleaved rounds. Server CPU = CPU seconds of the whole "
              "server process tree / requests answered.", ""]  # fmt: skip
    lines += [*targets.markdown(targets.evaluate(results)), ""]
    c = results["ceilings"]
    vit, nmt, rnn, tiny = c["fashion-vit"], c["dates-transformer"], c["dates-bahdanau"], c["tiny-vit"]
    lines += [
        "## Ceilings (ONNX Runtime alone, one thread)",
        "",
        f"- tiny-vit: {tiny['images_per_s']:.0f} images/s at batch {tiny['best_batch']}",
        f"- fashion-vit: {vit['images_per_s']:.0f} images/s at batch {vit['best_batch']}",
        f"- dates-transformer: {nmt['tokens_per_s']:.0f} target tokens/s (offline greedy, batch 64)",
        f"- dates-bahdanau: {rnn['tokens_per_s']:.0f} target tokens/s (offline greedy, batch 64)",
        "",
        "## Start-up and memory",
        "",
        "| configuration | start-up to ready (s) | RSS of the tree (MiB) |",
        "|---|---|---|",
    ]
    for config, seconds in results["startup_s"].items():
        lines.append(f"| {config} | {seconds:.1f} | {results['rss_bytes'].get(config, 0) / 2**20:.0f} |")
    columns = ["configuration", "workload", "clients", "req/s", "tokens or images/s", "p50 ms", "p90 ms",
               "p99 ms", "server CPU ms/req", "mean batch", "errors"]  # fmt: skip
    lines += ["", "## Load", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for config, by_w in results["runs"].items():
        for workload, by_n in by_w.items():
            for clients, row in sorted(by_n.items(), key=lambda kv: int(kv[0])):
                extra = row.get("tokens_per_s", row.get("images_per_s"))
                batch = f"{row['mean_batch_size']:.1f}" if row["mean_batch_size"] else "–"
                lines.append(
                    f"| {config} | {workload} | {clients} | {row['requests_per_s']:.0f} | {extra:.0f} | "
                    f"{row['p50_ms']:.1f} | {row['p90_ms']:.1f} | {row['p99_ms']:.1f} | "
                    f"{row['server_cpu_ms_per_request']:.2f} | {batch} | {row['errors']:.0f} |"
                )
    lines += _cpu_breakdown(results)
    lines += _profile(results)
    analysis = Path(__file__).with_name("analysis.md")
    if analysis.exists():  # hand-written, dated notes: they may disagree with this run's figures
        notes = analysis.read_text().strip()
        demoted = "\n".join("#" + line if line.startswith("## ") else line for line in notes.splitlines())
        lines += ["", "## Notes kept beside the benchmark (benchmarks/analysis.md, each dated)", "", demoted]
    lines += [""] + [f"![{name}]({name})" for name in _plots(results, out, stamp)] + [""]
    path = out / f"{stamp}.md"
    path.write_text("\n".join(lines))
    return path
