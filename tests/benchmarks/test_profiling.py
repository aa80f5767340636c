"""The profile summary counts busy samples only and ranks frames by inclusive share."""

from __future__ import annotations

from pathlib import Path

from benchmarks import profiling


def test_summary_ranks_busy_frames_and_skips_idle_threads(tmp_path: Path) -> None:
    raw = tmp_path / "profile.txt"
    raw.write_text(
        "serve (uvicorn/server.py:10);handle (app.py:5);run (onnxruntime/session.py:3) 30\n"
        "serve (uvicorn/server.py:10);handle (app.py:7) 10\n"
        "_bootstrap (threading.py:1);Condition.wait (threading.py:2) 1000\n"
    )
    rows = profiling.summarise(raw)
    shares = {frame: share for share, frame in rows}
    assert rows[0][0] == 1.0 and shares["serve (uvicorn/server.py)"] == 1.0
    assert shares["handle (app.py)"] == 1.0  # line numbers merged: both samples count
    assert shares["run (onnxruntime/session.py)"] == 0.75
    assert not any("Condition.wait" in frame for frame in shares)
