"""``python -m service``: a second service on a port one already serves stops at once with a clear
message (replicas bind with SO_REUSEPORT, so it would otherwise join the port and split its
traffic), and the running service is untouched."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import Service, free_port, running_service

pytestmark = pytest.mark.slow


def test_a_second_service_on_a_served_port_is_refused_at_once(service: Service) -> None:
    port = int(service.url.rsplit(":", 1)[1])
    env = {
        **os.environ,
        "ATTN_REPOSITORY": str(service.repository),
        "ATTN_HTTP_PORT": str(port),
        "ATTN_GRPC_PORT": str(free_port()),
        "ATTN_METRICS_PORT": str(free_port()),
    }
    started = time.monotonic()
    second = subprocess.run(
        [sys.executable, "-m", "service"], env=env, capture_output=True, text=True, timeout=60
    )
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"HTTP port 127.0.0.1:{port} is taken" in second.stderr
    assert time.monotonic() - started < 15  # no Ray was started: it used to time out after ~40 s
    assert requests.get(f"{service.url}/readyz", timeout=10).status_code == 200


def test_rays_processes_run_their_loops_at_the_configured_intervals(service: Service) -> None:
    """Settings.serve_control_loop_s reaches the Serve controller that the service's private Ray
    starts (Ray reads it once, when the controller's process imports Ray Serve), and
    Settings.metrics_export_s every Ray process, which reads it when it starts."""
    import psutil

    processes = psutil.Process(service.pid).children(recursive=True)
    [controller] = [p for p in processes if "ServeController" in p.name()]
    assert controller.environ()["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.5"
    # the processes that record series (psutil reads none of these variables from Ray's agents,
    # whose process title replaces what /proc shows of them)
    ray = [p for p in processes if p.name().startswith(("ray::Serve", "gcs_server", "raylet"))]
    assert len(ray) >= 4 and {p.environ().get("RAY_metrics_report_interval_ms") for p in ray} == {"5000"}


def test_replicas_that_cannot_fit_the_private_ray_are_refused_at_once(service: Service) -> None:
    """One deployment per model at 0.75 CPU each cannot fit a Ray of one CPU: a clear error before
    Ray starts, not replicas waiting forever to be scheduled."""
    env = {
        **os.environ,
        "ATTN_REPOSITORY": str(service.repository),
        "ATTN_FRONTEND": "ray-proxy",
        "ATTN_NUM_CPUS": "1",
        "ATTN_REPLICA_NUM_CPUS": "0.75",
        "ATTN_HTTP_PORT": str(free_port()),
        "ATTN_GRPC_PORT": str(free_port()),
        "ATTN_METRICS_PORT": str(free_port()),
    }
    refused = subprocess.run(
        [sys.executable, "-m", "service"], env=env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "ATTN_REPLICA_NUM_CPUS=0.75 each" in refused.stderr and "this Ray has 1" in refused.stderr


@pytest.mark.slow
@pytest.mark.skipif(
    "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(), reason="CUDA is here"
)
def test_cuda_asked_for_where_none_is_serves_on_the_cpu_and_says_why(
    tiny_repository: Path, tmp_path: Path
) -> None:
    """Replicas must not reserve a GPU share that this Ray will never have (they would wait
    forever): the service falls back to the CPU at start and logs the reason."""
    providers = '["CUDAExecutionProvider", "CPUExecutionProvider"]'
    with running_service(tiny_repository, tmp_path, ATTN_PROVIDERS=providers) as svc:
        answer = svc.post("/v1/models/dates-transformer/translate", json={"text": "3 mars 2011"})
        assert answer.status_code == 200, answer.text
        assert svc.get("/v1/models/dates-transformer").json()["providers"][0] == "CPUExecutionProvider"
        log = svc.log.read_text()
    assert "CUDA was asked for, but this onnxruntime build has no CUDA provider" in log
    assert "serving on the CPU" in log


def test_an_empty_repository_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    env = {**os.environ, "ATTN_REPOSITORY": str(tmp_path / "empty"), "ATTN_HTTP_PORT": str(free_port()),
           "ATTN_GRPC_PORT": str(free_port()), "ATTN_METRICS_PORT": str(free_port())}  # fmt: skip
    refused = subprocess.run(
        [sys.executable, "-m", "service"], env=env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "error: no servable model" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_while_ray_starts_stops_every_process_it_started(tiny_repository: Path, sig: int) -> None:
    """An interrupt inside ``ray.init`` once left half-started Ray processes running for a minute
    (one held the metrics port, so a restart failed), and the stop started a second Ray. Now the
    stop waits for ``ray.init`` and then stops all of it. SIGTERM (Docker's and Kubernetes' stop)
    went to the handler ray.init installs, which exited at once (status 15) with the raylet's agents
    left running."""
    psutil = pytest.importorskip("psutil")
    metrics = free_port()
    env = {**os.environ, "ATTN_REPOSITORY": str(tiny_repository), "ATTN_HTTP_PORT": str(free_port()),
           "ATTN_GRPC_PORT": str(free_port()), "ATTN_METRICS_PORT": str(metrics)}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "service"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        me = psutil.Process(proc.pid)
        deadline = time.monotonic() + 60
        while not any("gcs_server" in " ".join(c.cmdline()) for c in children(me)):  # Ray is starting
            assert time.monotonic() < deadline and proc.poll() is None, "Ray never started"
            time.sleep(0.05)
        started = children(me)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "interrupted while starting" in err
    gone = time.monotonic() + 15
    while alive := [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]:
        assert time.monotonic() < gone, f"left running: {[' '.join(p.cmdline())[:80] for p in alive]}"
        time.sleep(0.2)
    assert err.count("Started a local Ray instance") <= 1, "the stop must not start a second Ray"
    with socket.socket() as probe:  # a restart can bind the metrics port
        probe.bind(("0.0.0.0", metrics))


def children(process: Any) -> list[Any]:
    try:
        return process.children(recursive=True)
    except Exception:  # it just ended
        return []


def test_a_ray_address_where_nothing_answers_is_refused_at_once(
    tiny_repository: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """ray.init retried an unreachable head for good (12 minutes and counting in an audit), deaf
    to the first Ctrl-C."""
    from service.__main__ import main

    monkeypatch.setattr(os, "environ", os.environ.copy())  # main() sets Ray's variables: this test's only

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"ATTN_REPOSITORY": str(tiny_repository), "ATTN_RAY_ADDRESS": f"127.0.0.1:{port}",
                       "ATTN_HTTP_PORT": str(free_port()), "ATTN_GRPC_PORT": str(free_port())}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    started = time.monotonic()
    assert main([]) == 2
    err = capsys.readouterr().err
    assert (
        f"ATTN_RAY_ADDRESS=127.0.0.1:{port}: no Ray head answers" in err and time.monotonic() - started < 30
    )


@pytest.mark.parametrize("frontend", ["in-replica", "ray-direct"])
def test_a_repository_whose_every_model_fails_to_load_is_an_error_line(
    frontend: str, tiny_repository: Path, tmp_path: Path
) -> None:
    """The manifest's checks pass (its sha256 matches) but ONNX Runtime cannot load the graph:
    the start ended with exit status 1 and Ray's deploy traceback last. The Ray-ingress
    frontends leave such a model out and serve the others: with none left, the start is refused
    as well. A signal while it stops what started cut that stop short with a KeyboardInterrupt
    traceback; now it only asks again."""
    import hashlib
    import json
    import shutil

    repository = tmp_path / "repository"
    version = repository / "fashion-vit" / "1"
    shutil.copytree(tiny_repository / "fashion-vit" / "1", version)
    (version / "model.onnx").write_bytes(b"\x00 not a graph " * 300)
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["checksums"]["model.onnx"] = hashlib.sha256((version / "model.onnx").read_bytes()).hexdigest()
    (version / "manifest.json").write_text(json.dumps(manifest))
    env = {**os.environ, "ATTN_REPOSITORY": str(repository), "ATTN_HTTP_PORT": str(free_port()),
           "ATTN_GRPC_PORT": str(free_port()), "ATTN_METRICS_PORT": str(free_port()),
           "ATTN_FRONTEND": frontend}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "service"], env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    assert proc.stderr is not None
    for line in proc.stderr:  # the error line, then the stop of what started: a signal meanwhile
        lines.append(line)  # (an operator's Ctrl-C, a container's stop) asks again, no traceback
        if line.startswith("error:"):
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGINT)
    stderr = "".join(lines)
    assert proc.wait(timeout=180) == 2, stderr[-2000:]
    assert "error: the replicas could not start" in stderr
    assert "KeyboardInterrupt" not in stderr, stderr[-3000:]  # (Ray logs the replicas' tracebacks)
    if frontend == "ray-direct":  # the model's deployment stayed up serving nothing; the ingress said so
        assert "no model could be loaded: {'fashion-vit/1': 'failed to load" in stderr
