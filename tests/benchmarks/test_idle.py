"""The idle report: per-process medians side by side, totals, start-up, and the share of an image."""

from __future__ import annotations

from pathlib import Path

from benchmarks import idle


def test_report_lists_every_process_of_either_configuration_with_totals(tmp_path: Path) -> None:
    ours, rays = idle.CONFIGS
    r = {
        "date": "2026-12-05", "rounds": 3, "settle_s": 10.0, "window_s": 20.0,
        "results": {
            ours: {"cpu_ms_per_s": {"ray::ServeController": 12.0, "gcs_server": 8.0}, "total_ms_per_s": 20.0,
                   "total_by_round": [20.0, 21.0, 19.0], "startup_s": 8.0, "startup_s_by_round": [8.0, 8.2, 7.9]},
            rays: {"cpu_ms_per_s": {"ray::ServeController": 30.0, "gcs_server": 16.0, "raylet": 4.0},
                   "total_ms_per_s": 50.0, "total_by_round": [50.0, 49.0, 52.0], "startup_s": 7.0,
                   "startup_s_by_round": [7.0, 7.1, 6.9]},
        },
    }  # fmt: skip
    text = idle.write_report(r, tmp_path / "idle.md").read_text()
    assert "| ray::ServeController | 12.0 | 30.0 |" in text
    assert "| raylet | 0.0 | 4.0 |" in text  # a process only one configuration has
    assert "| **total** | **20.0** | **50.0** |" in text and "| start-up to ready, s | 8.0 | 7.0 |" in text
    assert "20 ms of CPU a second idle against 50" in text and "(60% less)" in text
    assert f"{20 / idle.IMAGES_PER_S * 1000:.0f} against {50 / idle.IMAGES_PER_S * 1000:.0f} µs" in text
