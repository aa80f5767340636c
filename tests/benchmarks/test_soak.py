"""The soak report (``benchmarks/soak_report.py``): what it summarises per process and what its
verdict names, from made-up readings; and the new versions the run publishes, on a real copy of a
version directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import soak, soak_report

REPLICA = "ray::ServeReplica:attention:replica"
DECODE = "decode processes (one per translation model, children of the replica)"


def proc(rss: float, fds: int, threads: int, processes: int = 1) -> dict[str, float]:
    return {"rss_mib": rss, "fds": fds, "threads": threads, "processes": processes}


def swap(version: int, serving: float | None, retired: float | None, **wrong: int) -> dict[str, Any]:
    return {
        "version": version,
        "t_s": 20.0 * version,
        "serving_s": serving,
        "retired_s": retired,
        "wrong": wrong,
    }


def answers(**changes: Any) -> dict[str, Any]:
    a: dict[str, Any] = {
        "rest": {"statuses": {"200": 1000}, "errors": 0, "per_s": 250.0},
        "refusals": {"statuses": {"404": 10, "422": 20}},
        "abandoned": 40,
        "grpc": {"ok": 80, "cancelled": 20},
        "versions": [3, 7],
        "swaps": [swap(v, 1.0 + v / 10, 1.5 + v / 10) for v in range(3, 8)],
    }
    return {**a, **changes}


def run(after_replica: dict[str, float], load: dict[str, Any] | None = None) -> dict[str, Any]:
    """A run whose replica's RSS grows 1 MiB a minute under load, 100 → 110 MiB."""
    samples = [
        {"t_s": t, "processes": {REPLICA: proc(100 + t / 60, 90 + t % 7, 42), DECODE: proc(190, 30, 4, 2)}}
        for t in range(0, 601, 10)
    ]
    return {
        "date": "2026-12-06", "duration_s": 600.0, "warmup_s": 60.0, "cooldown_s": 20.0, "clients": 16,
        "swap_every_s": 20.0, "loaded_s": 600.0, "warmup": answers(), "answers": load or answers(),
        "before": {"t_s": 0.0, "processes": {REPLICA: proc(100, 84, 42), DECODE: proc(190, 24, 4, 2)}},
        "samples": samples,
        "after": {"t_s": 620.0, "processes": {REPLICA: after_replica, DECODE: proc(192, 24, 4, 2)}},
    }  # fmt: skip


def test_a_steady_run_reports_its_figures_and_names_nothing(tmp_path: Path) -> None:
    r = run(proc(110, 84, 42))
    s = soak_report.summary(r, REPLICA)
    assert s["rss"] == (100, 110) and s["fds"] == (84, 96, 84) and s["threads"] == (42, 42, 42)
    assert s["slope_mib_h"] == pytest.approx(60.0)  # 1 MiB a minute, over the second half
    assert soak_report.problems(r) == []
    text = soak_report.write_report(r, tmp_path / "soak.md").read_text()
    assert f"| {REPLICA} | 100 → 110 | +60.0 | 84 / 96 / 84 | 42 / 42 / 42 | 1 / 1 |" in text
    assert "REST: 1,000 answers (250/s), by status 200: 1,000; connections dropped 0" in text
    assert "versions 3–7 of each translator" in text and "Every answer as it must be" in text
    assert soak_report.swap_summary(r) == {
        "n": 5,
        "serving": (pytest.approx(1.5), pytest.approx(1.7), pytest.approx(1.7)),
        "retired": (pytest.approx(2.0), pytest.approx(2.2), pytest.approx(2.2)),
        "serving_late": 0,
        "retired_late": 0,
    }
    assert "both translators answer with the new version: 1.50 / 1.70 / 1.70" in text
    assert "one decode process per translator left: 2.00 / 2.20 / 2.20" in text


def test_readings_taken_during_a_swap_are_left_out_of_a_groups_slope() -> None:
    r = run(proc(110, 84, 42))
    for sample in r["samples"][40::5]:  # an old version's decode processes beside the new ones
        sample["processes"][DECODE] = proc(380, 48, 8, 4)
    assert soak_report.summary(r, DECODE)["slope_mib_h"] == pytest.approx(0.0)


def test_the_verdict_names_a_swap_not_done_within_half_a_period(tmp_path: Path) -> None:
    swaps = [swap(3, 1.2, 1.4), swap(4, None, None), swap(5, 1.1, None), swap(6, 1.3, 1.6, **{"503": 2})]
    r = run(proc(110, 84, 42), answers(swaps=swaps))
    assert soak_report.problems(r) == [
        "load: version 4 not answering 10 s after it was published",
        "load: version 5: the versions before it still had a decode process 10 s after",
        "load: version 6: polls answered {'503': 2}",
    ]
    s = soak_report.swap_summary(r)
    assert (s["serving_late"], s["retired_late"]) == (1, 2) and s["retired"][2] == pytest.approx(1.6)
    text = soak_report.write_report(r, tmp_path / "soak.md").read_text()
    assert "not there within half a period (10 s): 1 and 2" in text
    soak_report.plot(r, tmp_path / "soak.png")
    assert (tmp_path / "soak.png").stat().st_size > 10_000


def test_the_verdict_names_a_descriptor_left_open_a_process_left_and_wrong_answers(tmp_path: Path) -> None:
    load = answers(
        rest={"statuses": {"200": 990, "500": 10}, "errors": 12, "per_s": 250.0},
        refusals={"statuses": {"422": 5, "200": 1}},
        grpc={"ok": 80, "cancelled": 20, "UNAVAILABLE": 3},
    )
    r = run(proc(110, 85, 42), load)
    r["after"]["processes"][DECODE] = proc(250, 24, 4, 3)  # an old version's child still there
    found = soak_report.problems(r)
    assert found == [
        "load: REST answers other than 200: {'500': 10} (12 errors)",
        "load: refusals answered otherwise than 4xx: {'422': 5, '200': 1}",
        "load: gRPC calls that failed: {'UNAVAILABLE': 3}",
        f"{DECODE}: 3 processes after the load against 2 before",
        f"{REPLICA}: 85 descriptors open after the load against 84 before",
    ]
    text = soak_report.write_report(r, tmp_path / "soak.md").read_text()
    assert all(f"- **{p}**" in text for p in found) and "connections dropped 2" in text


def test_a_published_version_is_the_one_before_saying_its_own_number(tmp_path: Path) -> None:
    for model in soak.TRANSLATORS:
        (tmp_path / model / "1").mkdir(parents=True)
        (tmp_path / model / "1" / "manifest.json").write_text(json.dumps({"name": model, "version": 1}))
        (tmp_path / model / "1" / "encoder.onnx").write_bytes(b"graph")
    soak.publish(tmp_path, 2)
    for model in soak.TRANSLATORS:
        assert sorted(p.name for p in (tmp_path / model).iterdir()) == ["1", "2"]  # no staging left
        assert json.loads((tmp_path / model / "2" / "manifest.json").read_text()) == {
            "name": model,
            "version": 2,
        }
        assert (tmp_path / model / "2" / "encoder.onnx").read_bytes() == b"graph"
