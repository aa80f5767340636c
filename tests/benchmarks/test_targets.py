"""The targets are judged from one run's figures, with the margin by which each is met or missed."""

from __future__ import annotations

from typing import Any

from benchmarks import targets


def _row(**figures: float) -> dict[str, Any]:
    return {"requests_per_s": 0.0, "server_cpu_ms_per_request": 0.0, **figures}


def results(cpu_ms: float) -> dict[str, Any]:
    return {
        "ceilings": {"fashion-vit": {"images_per_s": 1000.0}, "dates-transformer": {"tokens_per_s": 10000.0}},
        "startup_s": {"in-replica": 8.0},
        "rss_bytes": {"in-replica": 1.5 * 2**30},
        "runs": {
            "in-replica-x2": {
                "tiny-rest": {"64": _row(requests_per_s=2000, server_cpu_ms_per_request=cpu_ms)}
            },
            "fastapi-baseline": {"tiny-rest": {"64": _row(requests_per_s=1000)}},
            "in-replica": {
                "vit": {"64": _row(images_per_s=950.0)},
                "nmt-transformer": {"32": _row(tokens_per_s=7000.0)},
            },
            "pytorch-eager": {"nmt-transformer": {"32": _row(tokens_per_s=1000.0)}},
        },
    }


def test_each_target_is_met_or_missed_by_a_stated_margin() -> None:
    judged = {t.name: t for t in targets.evaluate(results(cpu_ms=0.45))}
    cpu = judged["tiny path: server CPU per request"]
    assert cpu.met is False and cpu.margin == "-50 %"  # 0.45 ms is 50 % over 0.3 ms
    assert (
        judged["tiny path: req/s vs plain FastAPI"].met
        and judged["tiny path: req/s vs plain FastAPI"].value == 2
    )
    assert judged["ViT at 64 clients: images/s vs raw ORT at its best batch"].met  # 0.95 ≥ 0.9
    nmt = judged["NMT at 32 clients: tokens/s vs offline batched decoding"]
    assert nmt.met is False and nmt.margin == "-13 %"  # 0.7 is 12.5 % under 0.8
    assert judged["NMT at 32 clients: tokens/s vs a PyTorch-eager server"].value == 7
    assert judged["cold start to ready, demo repository"].met
    assert judged["RSS of the whole process tree"].met is False
    lines = targets.markdown(list(judged.values()))
    assert any("**no**" in line and "RSS" in line for line in lines)


def test_a_configuration_left_out_is_reported_as_not_measured() -> None:
    partial = results(cpu_ms=0.2)
    del partial["runs"]["pytorch-eager"]
    [eager] = [t for t in targets.evaluate(partial) if "PyTorch" in t.name]
    assert eager.met is None and eager.margin == "not measured"
    assert next(t for t in targets.evaluate(partial) if "CPU" in t.name).met  # 0.2 ≤ 0.3
