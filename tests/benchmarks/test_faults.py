"""The faults report: the kill's figures and one overload row per factor, with the generator's lag."""

from __future__ import annotations

from pathlib import Path

from benchmarks import faults


def overload_row(factor: float, late_p99_ms: float) -> dict[str, object]:
    return {
        "factor": factor, "capacity_per_s": 900.0, "offered_per_s": factor * 900, "requests": 100,
        "answered_503_share": 0.75, "p99_503_ms": 412.3, "p99_accepted_ms": 1500.0, "other_errors": 0,
        "rss_before_mib": 1800.0, "rss_after_mib": 1850.0, "healthy_after": True,
        "late_p50_ms": late_p99_ms / 10, "late_p99_ms": late_p99_ms,
    }  # fmt: skip


def test_report_has_a_row_per_overload_factor_with_the_generators_lag(tmp_path: Path) -> None:
    results = {
        "kill": {
            "requests": 1000, "failed": 1, "failed_share": 0.001, "retried": 3,
            "throughput_before_per_s": 700.0, "seconds_to_full_throughput": 5.5, "replicas_after": 2,
        },
        "overload": [overload_row(4, 220.0), overload_row(10, 11400.0)], "date": "2026-12-05",
    }  # fmt: skip
    text = faults.report(results, tmp_path / "r.md").read_text()
    assert (
        "| 4× | 900 | 3600 | 75 % | 412.3 ms | 1500 ms | 0 | 1800 → 1850 | True | 22.0 / 220.0 ms |" in text
    )
    assert "| 10× | 900 | 9000 |" in text and "| 1140.0 / 11400.0 ms |" in text
    assert "| 1000 | 1 (0.10 %; goal ≤ 0.1 %) | 3 | 700 | 5.5 s (goal ≤ 10 s) | 2 |" in text
    results["kill"]["seconds_to_full_throughput"] = None
    assert "| 700 | not recovered (goal ≤ 10 s) |" in faults.report(results, tmp_path / "r.md").read_text()
    assert "Sustained heavy overload" not in text  # reports written before it had no such run


def test_report_compares_the_sustained_overload_with_and_without_the_predicted_wait(tmp_path: Path) -> None:
    def row(predicted: bool, answered: int, timed_out: int) -> dict[str, object]:
        return {
            "predicted_wait": predicted, "clients": 350, "timeout_s": 10.0, "answered": answered,
            "answered_per_s": answered / 47, "p50_answered_ms": 7800.0, "p99_answered_ms": 9900.0,
            "timed_out_504": timed_out, "refused_503": 9000, "p99_503_ms": 310.0, "other": 0,
        }  # fmt: skip

    results = {
        "kill": {
            "requests": 1000, "failed": 1, "failed_share": 0.001, "retried": 3,
            "throughput_before_per_s": 700.0, "seconds_to_full_throughput": 5.5, "replicas_after": 2,
        },
        "overload": [overload_row(4, 220.0)], "date": "2026-12-06",
        "sustained": [row(True, 348, 0), row(False, 269, 831)],
    }  # fmt: skip
    text = faults.report(results, tmp_path / "r.md").read_text()
    assert "## Sustained heavy overload: 350 clients, 64 texts at beam 8, 10 s timeout, one replica" in text
    assert "| predicted wait | 348 | 7.4 | 7.8 / 9.9 s | 0 | 9000 | 310 ms | 0 |" in text
    assert "| count only | 269 | 5.7 | 7.8 / 9.9 s | 831 | 9000 | 310 ms | 0 |" in text


def test_recovery_is_when_throughput_came_back_for_good() -> None:
    """From the kill (bucket 4) on: no dip reads 0 s (it read 0.5 s), a late dip counts (a
    first recovery of two buckets was taken, the dip after it missed), and a throughput that
    never comes back is None; the last, partial bucket is left out."""
    steady = [100.0] * 12 + [40.0]
    assert faults.recovery_bucket(steady, 4, 100.0) == 4
    late_dip = [100.0] * 4 + [30, 95, 95, 60, 60, 95, 95, 95, 95, 95] + [10.0]
    assert faults.recovery_bucket(late_dip, 4, 100.0) == 9
    assert faults.recovery_bucket([100.0] * 4 + [50.0] * 8, 4, 100.0) is None
    assert faults.recovery_bucket([100.0] * 12 + [85.0, 40.0], 4, 100.0) == 4  # one last dip, averaged
