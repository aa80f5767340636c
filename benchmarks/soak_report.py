"""The soak run's report (``benchmarks/soak.py``): per process, memory idle before and after the
load with its slope under load over the second half, descriptors and threads before, at their
peak and after; the answers by stream; how long the version swaps took; the readings and the
swaps over time as a plot."""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

from benchmarks.loadgen import percentile

#: the processes whose descriptors and threads the plot follows (the serving ones)
SERVING = ("ray::ServeReplica", "decode processes")


def series(r: dict[str, Any], name: str, key: str, since_s: float = 0.0) -> list[tuple[float, float]]:
    """(t, value) of one process group's readings under load from ``since_s`` on."""
    return [
        (s["t_s"], s["processes"][name][key])
        for s in r["samples"]
        if s["t_s"] >= since_s and name in s["processes"]
    ]


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of ``points`` per hour; None under three points."""
    if len(points) < 3:
        return None
    t, v = zip(*points, strict=True)
    return statistics.linear_regression(t, v).slope * 3600


def summary(r: dict[str, Any], name: str) -> dict[str, Any]:
    """One process group: RSS idle before and after the load, its slope under load over the
    second half (over the readings with as many of its processes as before); descriptors and
    threads before, at their peak and after; processes before and after (None where the group
    was not there)."""
    before = r["before"]["processes"].get(name, {})
    after = r["after"]["processes"].get(name, {})
    peak = {k: max((v for _, v in series(r, name, k)), default=None) for k in ("fds", "threads")}
    # the slope over the readings with the group's own processes: one taken during a swap, with
    # an old version's decode processes beside the new ones, is not the same group growing
    half = r["loaded_s"] / 2
    counts = series(r, name, "processes", half)
    rss = [p for p, (_, n) in zip(series(r, name, "rss_mib", half), counts, strict=True)
           if n == before.get("processes")]  # fmt: skip
    return {
        "rss": (before.get("rss_mib"), after.get("rss_mib")),
        "slope_mib_h": slope_per_hour(rss),
        "fds": (before.get("fds"), peak["fds"], after.get("fds")),
        "threads": (before.get("threads"), peak["threads"], after.get("threads")),
        "processes": (before.get("processes"), after.get("processes")),
    }


def swap_summary(r: dict[str, Any]) -> dict[str, Any]:
    """The swaps under load: how many; p50 / p95 / max seconds until the new version answered
    (``serving``) and until the versions before it were let go (``retired``), over the swaps that
    got there within half a period; how many did not (``late``)."""
    swaps = r["answers"].get("swaps", [])
    out: dict[str, Any] = {"n": len(swaps)}
    for key in ("serving", "retired"):
        done = sorted(s[f"{key}_s"] for s in swaps if s[f"{key}_s"] is not None)
        out[key] = (statistics.median(done), percentile(done, 95), done[-1]) if done else None
        out[f"{key}_late"] = len(swaps) - len(done)
    return out


def swap_problems(phase: str, swaps: list[dict[str, Any]], within_s: float) -> list[str]:
    """A swap whose version did not answer within ``within_s``, whose versions before it kept a
    decode process that long, or whose polls were answered otherwise than 200."""
    out = []
    for s in swaps:
        v = f"{phase}: version {s['version']}"
        if s["serving_s"] is None:
            out.append(f"{v} not answering {within_s:.0f} s after it was published")
        elif s["retired_s"] is None:
            out.append(f"{v}: the versions before it still had a decode process {within_s:.0f} s after")
        if s["wrong"]:
            out.append(f"{v}: polls answered {s['wrong']}")
    return out


def problems(r: dict[str, Any]) -> list[str]:
    """What the run must not show, warm-up included: an answer other than 200, a refusal other
    than 4xx, a gRPC call that failed (not cancelled by its client), a swap not done within half
    a period; a serving process with more descriptors or processes after the load than before it."""
    out = []
    for phase, a in (("warm-up", r["warmup"]), ("load", r["answers"])):
        wrong = {s: n for s, n in a["rest"]["statuses"].items() if int(s) != 200}
        if wrong or a["rest"]["errors"]:
            out.append(f"{phase}: REST answers other than 200: {wrong} ({a['rest']['errors']} errors)")
        if any(not 400 <= int(s) < 500 for s in a["refusals"]["statuses"]):
            out.append(f"{phase}: refusals answered otherwise than 4xx: {a['refusals']['statuses']}")
        failed = {k: n for k, n in a["grpc"].items() if k not in ("ok", "cancelled")}
        if failed:
            out.append(f"{phase}: gRPC calls that failed: {failed}")
        out += swap_problems(phase, a.get("swaps", []), r["swap_every_s"] / 2)
    for name in sorted(r["after"]["processes"]):
        if name.startswith(SERVING):
            s = summary(r, name)
            (fds, _, fds_after), (procs, procs_after) = s["fds"], s["processes"]
            if fds is not None and fds_after > fds:
                out.append(f"{name}: {fds_after} descriptors open after the load against {fds} before")
            if procs != procs_after:
                out.append(f"{name}: {procs_after} processes after the load against {procs} before")
    return out


def _cells(values: tuple[float | None, ...]) -> str:
    return " / ".join("—" if v is None else f"{v:.0f}" for v in values)


def _swap_lines(r: dict[str, Any]) -> list[str]:
    s = swap_summary(r)
    if not s["n"]:
        return []
    half = r["swap_every_s"] / 2

    def p(key: str) -> str:
        t = s[key]
        return "—" if t is None else " / ".join(f"{v:.2f}" for v in t)

    return [
        "## Version swaps under load",
        "",
        f"{s['n']} swaps of both translators, each timed from its publishing (a rename), polling "
        "every 100 ms; p50 / p95 / max seconds:",
        "",
        f"- until both translators answer with the new version: {p('serving')} (the replica reads "
        "the repository every second)",
        f"- until the versions before it are let go, one decode process per translator left: {p('retired')}",
        f"- not there within half a period ({half:.0f} s): {s['serving_late']} and {s['retired_late']}",
        "",
    ]


def write_report(r: dict[str, Any], path: Path) -> Path:
    a = r["answers"]
    names = sorted(r["after"]["processes"], key=lambda n: -r["after"]["processes"][n]["rss_mib"])
    rest = a["rest"]["statuses"]
    dropped = a["rest"]["errors"] - sum(n for s, n in rest.items() if int(s) != 200)
    refusals = a["refusals"]["statuses"]
    swapped = r["swap_every_s"] < r["duration_s"]
    lines = [
        f"# A long run of mixed traffic: memory, descriptors, threads ({r['date']})",
        "",
        "`python -m benchmarks.soak` (see its docstring): `python -m service` with its defaults on a "
        f"copy of the demo repository, polled every second; {r['duration_s']:.0f} s of load after "
        f"{r['warmup_s']:.0f} s of warm-up — {r['clients']} REST clients over every model (attention "
        "as arrays and PNGs), a client sending requests that must be refused, a client hanging up on "
        "requests and token streams, two KServe v2 gRPC clients cancelling one call in five, and "
        + (f"a new version of each translator every {r['swap_every_s']:.0f} s with the one before deleted"
           if swapped else "no new versions (`--swap-every` past the run)")
        + f". Readings every few seconds under load, and after {r['cooldown_s']:.0f} s of quiet "
        f"before and after it. {os.cpu_count()}-core machine.",
        "",
        f"![RSS, descriptors and threads over time]({path.with_suffix('.png').name})",
        "",
        f"## Answers in the {r['duration_s']:.0f} s of load",
        "",
        f"- REST: {sum(rest.values()):,} answers ({a['rest']['per_s']:.0f}/s), by status "
        + ", ".join(f"{s}: {n:,}" for s, n in sorted(rest.items())) + f"; connections dropped {dropped}",
        "- refusals: " + ", ".join(f"{s}: {n:,}" for s, n in sorted(refusals.items())),
        f"- abandoned by their client: {a['abandoned']:,} (half of them token streams)",
        "- KServe v2 gRPC: " + ", ".join(f"{k}: {n:,}" for k, n in sorted(a["grpc"].items())),
        *(
            [f"- versions {a['versions'][0]}–{a['versions'][1]} of each translator published and "
             "swapped to under load, each one before deleted"]
            if swapped else []
        ),
        "",
        *_swap_lines(r),
        "## By process",
        "",
        "| process | RSS MiB idle before → after | MiB / hour under load, second half, its own processes "
        "| descriptors before / peak / after | threads before / peak / after | processes before / after |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name in names:
        s = summary(r, name)
        slope = "—" if s["slope_mib_h"] is None else f"{s['slope_mib_h']:+.1f}"
        rss = " → ".join("—" if v is None else f"{v:.0f}" for v in s["rss"])
        cells = " | ".join(_cells(s[k]) for k in ("fds", "threads", "processes"))
        lines.append(f"| {name} | {rss} | {slope} | {cells} |")
    found = problems(r)
    lines += ["", "## Verdict", ""]
    lines += [f"- **{p}**" for p in found] or [
        "Every answer as it must be, warm-up included, and the serving processes' descriptors and "
        "processes back where they were before the load."
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def plot(r: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    names = sorted(r["after"]["processes"], key=lambda n: -r["after"]["processes"][n]["rss_mib"])
    for ax, key, label, shown in (
        (axes[0], "rss_mib", "RSS, MiB", names[:6]),
        (axes[1], "fds", "open descriptors", [n for n in names if n.startswith(SERVING)]),
        (axes[2], "threads", "threads", [n for n in names if n.startswith(SERVING)]),
    ):
        for name in shown:
            points = series(r, name, key)
            if points:
                ax.plot(*zip(*points, strict=True), label=name[:40])
        ax.set_xlabel("seconds of load")
        ax.set_ylabel(label)
        ax.legend(fontsize=6)
    swaps = r["answers"].get("swaps", [])
    for key, label in (("serving_s", "new version answering"), ("retired_s", "versions before let go")):
        done = [(s["t_s"], s[key]) for s in swaps if s[key] is not None]
        if done:
            axes[3].scatter(*zip(*done, strict=True), s=8, label=label)
    axes[3].set_xlabel("seconds of load (when published)")
    axes[3].set_ylabel("seconds after publishing")
    axes[3].set_ylim(bottom=0)
    if swaps:
        axes[3].legend(fontsize=6)
    else:
        axes[3].set_title("no version swaps in this run", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
