"""The profile summary counts busy samples only and ranks frames by inclusive share."""

from __future__ import annotations

from pathlib import Path

from benchmarks import profiling


def test_summary_counts_self_time_by_component_and_skips_idle_threads(tmp_path: Path) -> None:
    raw = tmp_path / "profile.txt"
    raw.write_text(
        "serve (uvicorn/server.py:10);handle (starlette/routing.py:5);run (onnxruntime/capi/session.py:3) 30\n"
        "serve (uvicorn/server.py:10);handle (starlette/routing.py:7) 10\n"
        "serve (uvicorn/server.py:10);batch (ray/serve/batching.py:1) 10\n"
        "_bootstrap (threading.py:1);Condition.wait (threading.py:2) 1000\n"
    )
    summary = profiling.summarise(raw)
    components = {name: share for share, name in summary["components"]}
    assert components == {"onnxruntime": 0.6, "starlette": 0.2, "ray.serve": 0.2}
    frames = {frame: share for share, frame in summary["frames"]}
    assert frames["handle (starlette/routing.py)"] == 0.2  # line numbers merged
    assert not any("Condition.wait" in frame for frame in frames)
