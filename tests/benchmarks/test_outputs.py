"""What every benchmark's main shares: a report never overwrites another, its files are written
under one free name, and a SIGTERM runs the ``finally`` blocks that stop its servers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.outputs import free_stem, save


def test_a_report_takes_the_first_name_no_report_has(tmp_path: Path) -> None:
    assert free_stem(tmp_path, "2026-12-05-idle") == "2026-12-05-idle"
    (tmp_path / "2026-12-05-idle.json").write_text("{}")
    (tmp_path / "2026-12-05-idle-2.md").write_text("")
    assert free_stem(tmp_path, "2026-12-05-idle") == "2026-12-05-idle-3"
    (tmp_path / "2026-12-05-peers.png").write_bytes(b"")  # another kind's plot: not the serving report's
    assert free_stem(tmp_path, "2026-12-05", ("requests_per_s", "p99_ms")) == "2026-12-05"
    (tmp_path / "2026-12-05-requests_per_s.png").write_bytes(b"")  # the serving report's plot alone
    assert free_stem(tmp_path, "2026-12-05", ("requests_per_s", "p99_ms")) == "2026-12-05-2"
    assert free_stem(tmp_path, "2026-12-05-peers") == "2026-12-05-peers-2"


def test_a_report_s_results_plot_and_text_go_under_one_free_name(tmp_path: Path) -> None:
    def report(r: dict[str, Any], path: Path) -> Path:
        path.write_text(f"# {r['figure']}")
        return path

    def plot(r: dict[str, Any], path: Path) -> Path:
        path.write_bytes(b"png")
        return path

    out = tmp_path / "results"  # made when missing
    assert save(out, "2026-12-06-soak", {"figure": 1}, report, plot) == out / "2026-12-06-soak.md"
    second = save(out, "2026-12-06-soak", {"figure": 2}, report)  # never over the first
    assert second == out / "2026-12-06-soak-2.md" and second.read_text() == "# 2"
    assert json.loads((out / "2026-12-06-soak.json").read_text()) == {"figure": 1}
    assert sorted(p.name for p in out.iterdir()) == [
        "2026-12-06-soak-2.json", "2026-12-06-soak-2.md",
        "2026-12-06-soak.json", "2026-12-06-soak.md", "2026-12-06-soak.png",
    ]  # fmt: skip


def test_a_sigterm_runs_the_finally_that_stops_the_servers(tmp_path: Path) -> None:
    """What a ``timeout``, a cancelled CI job or ``kill`` sends: the benchmark's servers (and
    their private Ray) were left running, re-parented to PID 1."""
    stopped = tmp_path / "stopped"
    script = (
        "import time\n"
        "from benchmarks.outputs import stop_on_sigterm\n"
        "stop_on_sigterm()\n"
        "try:\n"
        "    print('serving', flush=True)\n"
        "    time.sleep(60)\n"
        "finally:\n"
        f"    open({str(stopped)!r}, 'w').write('server.stop()')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "serving"
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 143
    assert stopped.read_text() == "server.stop()"
