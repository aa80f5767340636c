"""The performance targets of the project, evaluated on one run's results (issue #6).

Each target compares figures measured in the same run (ratios), or an absolute budget, and says
by how much it is met or missed. ``benchmarks/analysis.md`` (written by people, from profiles)
explains the misses; the report appends it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

#: the default frontend, with one replica and with two behind one port
SERVICE, SERVICE_X2 = "in-replica", "in-replica-x2"


@dataclass
class Target:
    name: str
    goal: str
    value: float | None
    limit: float
    higher_is_better: bool
    detail: str

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit

    @property
    def margin(self) -> str:
        """How far from the limit, as a percentage of it (positive: met by that much)."""
        if self.value is None:
            return "not measured"
        gap = (self.value - self.limit) / self.limit * 100
        return f"{gap if self.higher_is_better else -gap:+.0f} %"


def _row(results: dict[str, Any], config: str, workload: str, clients: int) -> dict[str, Any] | None:
    return results["runs"].get(config, {}).get(workload, {}).get(str(clients))


def evaluate(results: dict[str, Any]) -> list[Target]:
    out: list[Target] = []
    tiny = _row(results, SERVICE_X2, "tiny-rest", 64)
    base = _row(results, "fastapi-baseline", "tiny-rest", 64)
    cpu = tiny["server_cpu_ms_per_request"] if tiny else None
    out.append(Target("tiny path: server CPU per request", "≤ 0.3 ms (2 replicas, one port, 64 clients)",
                      cpu, 0.3, False, f"{cpu:.2f} ms" if cpu else "–"))  # fmt: skip
    one = _row(results, SERVICE, "tiny-rest", 64)
    if tiny and base:  # two replicas against the baseline's one process: say so, and give one replica
        ratio = tiny["requests_per_s"] / base["requests_per_s"]
        detail = (
            f"2 replicas vs 1 process: {tiny['requests_per_s']:.0f} vs {base['requests_per_s']:.0f} req/s"
        )
        if one:
            detail += f"; 1 replica: {one['requests_per_s'] / base['requests_per_s']:.2f} ×"
    else:
        ratio, detail = None, "–"
    out.append(Target("tiny path: req/s vs plain FastAPI", "≥ 1.0 ×", ratio, 1.0, True, detail))
    vit = _row(results, SERVICE, "vit", 64)
    ceiling = results["ceilings"]["fashion-vit"]["images_per_s"]
    ratio = vit["images_per_s"] / ceiling if vit else None
    out.append(Target("ViT at 64 clients: images/s vs raw ORT at its best batch", "≥ 0.9 ×", ratio, 0.9, True,
                      f"{vit['images_per_s']:.0f} vs {ceiling:.0f} images/s" if vit else "–"))  # fmt: skip
    nmt = _row(results, SERVICE, "nmt-transformer", 32)
    offline = results["ceilings"]["dates-transformer"]["tokens_per_s"]
    ratio = nmt["tokens_per_s"] / offline if nmt else None
    out.append(Target("NMT at 32 clients: tokens/s vs offline batched decoding", "≥ 0.8 ×", ratio, 0.8, True,
                      f"{nmt['tokens_per_s']:.0f} vs {offline:.0f} tokens/s" if nmt else "–"))  # fmt: skip
    eager = _row(results, "pytorch-eager", "nmt-transformer", 32)
    ratio = nmt["tokens_per_s"] / eager["tokens_per_s"] if nmt and eager else None
    out.append(Target("NMT at 32 clients: tokens/s vs a PyTorch-eager server", "≥ 3 ×", ratio, 3.0, True,
                      f"{nmt['tokens_per_s']:.0f} vs {eager['tokens_per_s']:.0f} tokens/s"
                      if nmt and eager else "–"))  # fmt: skip
    start = results["startup_s"].get(SERVICE)
    out.append(Target("cold start to ready, demo repository", "≤ 10 s", start, 10.0, False,
                      f"{start:.1f} s" if start else "–"))  # fmt: skip
    rss = results["rss_bytes"].get(SERVICE)
    gib = rss / 2**30 if rss else None
    out.append(Target("RSS of the whole process tree", "≤ 1.2 GiB", gib, 1.2, False,
                      f"{gib:.2f} GiB" if gib else "–"))  # fmt: skip
    return out


def as_json(targets: list[Target]) -> list[dict[str, Any]]:
    return [asdict(t) | {"met": t.met, "margin": t.margin} for t in targets]


def markdown(targets: list[Target]) -> list[str]:
    lines = ["## Targets", "", "| target | goal | measured | met | margin |", "|---|---|---|---|---|"]
    for t in targets:
        verdict = {True: "yes", False: "**no**", None: "–"}[t.met]
        lines.append(f"| {t.name} | {t.goal} | {t.detail} | {verdict} | {t.margin} |")
    return lines
