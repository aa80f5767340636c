"""deploy/entrypoint.sh, run as the image runs it but with stand-ins for ``ray start`` and
``python -m service`` first on PATH, which record their arguments and environment instead of
starting a cluster: what each branch starts, and with what, from an empty home."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"
RAY = Path(sys.executable).with_name("ray")

RECORD = """import json, os, sys
with open(os.environ["CALLS"], "a") as calls:
    calls.write(json.dumps({"argv": sys.argv[1:], "env": dict(os.environ)}) + "\\n")
"""


def stand_ins(tmp: Path) -> Path:
    """A bin directory whose ``ray`` records every command but get-auth-token (the real one), and
    whose ``python`` records ``-m service`` (but its ``--ray-environment``, which the entrypoint
    runs for its exports) and runs anything else with the venv's Python."""
    bin_ = tmp / "bin"
    bin_.mkdir()
    (tmp / "record.py").write_text(RECORD)
    record = f"exec {sys.executable} {tmp / 'record.py'}"
    scripts = {
        "ray": f'[ "$1" = get-auth-token ] && exec {RAY} "$@"\n{record} ray "$@"\n',
        "python": f'[ "$1 $2" = "-m service" ] && [ "${{3:-}}" != --ray-environment ] && {record} python "$@"\n'
        f'exec {sys.executable} "$@"\n',
    }
    for name, body in scripts.items():
        (bin_ / name).write_text(f"#!/bin/sh\n{body}")
        (bin_ / name).chmod(0o755)
    return bin_


def run(tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the entrypoint in a clean environment (only what a container would have, plus ``env``)
    with HOME at ``tmp/home``."""
    (tmp / "home").mkdir(parents=True, exist_ok=True)
    (tmp / "models").mkdir(exist_ok=True)
    base = {
        "PATH": f"{stand_ins(tmp)}:{RAY.parent}:/usr/bin:/bin", "HOME": str(tmp / "home"),
        "CALLS": str(tmp / "calls.jsonl"), "ATTN_REPOSITORY": str(tmp / "models"),
    }  # fmt: skip
    return subprocess.run(["sh", str(ENTRYPOINT), *args], env={**base, **env}, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def calls(tmp: Path) -> list[dict[str, Any]]:
    """The commands the stand-ins recorded, in order."""
    log = tmp / "calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def entrypoint(tmp: Path, *args: str, **env: str) -> list[dict[str, Any]]:
    result = run(tmp, *args, **env)
    assert result.returncode == 0, result.stdout + result.stderr
    return calls(tmp)


@pytest.fixture
def gcs() -> Iterator[str]:
    """A listening port where a worker expects the head's GCS."""
    with socket.create_server(("127.0.0.1", free_port())) as server:
        yield f"127.0.0.1:{server.getsockname()[1]}"


def test_the_head_creates_the_cluster_token_in_an_empty_home(tmp_path: Path) -> None:
    """Ray 2.60's ``ray start --head`` reads the token but never writes it: from an empty home the
    head would stop with AuthenticationError and the container with it."""
    head, service = entrypoint(tmp_path)
    assert head["argv"][:3] == ["ray", "start", "--head"] and head["env"]["RAY_AUTH_MODE"] == "token"
    token = tmp_path / "home" / ".ray" / "auth_token"
    assert len(token.read_text().strip()) >= 32
    assert service["argv"] == ["python", "-m", "service"] and service["env"]["ATTN_RAY_ADDRESS"] == "auto"


def test_a_restarted_head_keeps_the_token_its_workers_hold(tmp_path: Path) -> None:
    token = tmp_path / "home" / ".ray" / "auth_token"
    token.parent.mkdir(parents=True)
    token.write_text("kept-token")
    entrypoint(tmp_path)
    assert token.read_text() == "kept-token"


def test_a_worker_joins_once_the_heads_gcs_answers(tmp_path: Path) -> None:
    """Compose starts workers with the head's container; each waits for the GCS, then joins."""
    port = free_port()
    gcs = socket.socket()

    def head_starts_later() -> None:
        time.sleep(2)
        gcs.bind(("127.0.0.1", port))
        gcs.listen()

    threading.Thread(target=head_starts_later, daemon=True).start()
    start = time.monotonic()
    try:
        [worker] = entrypoint(tmp_path, "worker", RAY_HEAD=f"127.0.0.1:{port}")
    finally:
        gcs.close()
    assert time.monotonic() - start >= 2
    assert worker["argv"][:3] == ["ray", "start", f"--address=127.0.0.1:{port}"]
    assert worker["env"]["RAY_AUTH_MODE"] == "token"


def test_every_ray_process_gets_the_frontends_ray_environment(tmp_path: Path, gcs: str) -> None:
    """Settings.ray_environment() reaches the head's and the workers' Ray processes, which start
    before ``python -m service`` could set it: ray-direct's ingress ports, for one."""
    from service.settings import Settings

    settings = {
        "ATTN_FRONTEND": "ray-direct",
        "ATTN_HTTP_PORT": "8100",
        "ATTN_GRPC_MAX_MESSAGE_BYTES": "8388608",
    }
    head, _ = entrypoint(tmp_path / "head", **settings)
    [worker] = entrypoint(tmp_path / "worker", "worker", RAY_HEAD=gcs, **settings)
    expected = Settings(repository=tmp_path, frontend="ray-direct", http_port=8100).ray_environment()
    assert expected["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert expected["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == "8101"
    for node in (head, worker):
        assert expected.items() <= node["env"].items(), node["argv"]
        assert node["env"]["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] == "8388608"  # as python -m service sets it


def test_autoscaling_replicas_report_every_second_on_every_node(tmp_path: Path) -> None:
    head, _ = entrypoint(tmp_path, ATTN_AUTOSCALING='{"max_replicas": 3}')
    assert head["env"]["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] == "1"


def test_a_bad_setting_stops_the_container_before_ray_starts(tmp_path: Path) -> None:
    result = run(tmp_path, ATTN_FRONTEND="nginx")
    assert result.returncode != 0 and "ATTN_FRONTEND" in result.stderr
    assert calls(tmp_path) == []


@pytest.mark.parametrize("first", [[], ["serve"]], ids=["options", "serve-options"])
def test_options_go_to_the_service_after_the_head_starts(tmp_path: Path, first: list[str]) -> None:
    """``docker run attention-serve --repository /data`` ran ``--repository`` as a command; options
    go to ``python -m service``, and its --port moves ray-direct's ingress ports on the head too."""
    models = tmp_path / "data"
    models.mkdir()
    options = ["--repository", str(models), "--port", "8200"]
    head, service = entrypoint(tmp_path, *first, *options, ATTN_FRONTEND="ray-direct")
    assert head["argv"][:3] == ["ray", "start", "--head"]
    assert head["env"]["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == "8201"
    assert service["argv"] == ["python", "-m", "service", *options]


def test_head_and_workers_export_metrics_on_the_same_port(tmp_path: Path, gcs: str) -> None:
    head, _ = entrypoint(tmp_path / "head", ATTN_METRICS_PORT="9100")
    [worker] = entrypoint(tmp_path / "worker", "worker", RAY_HEAD=gcs, ATTN_METRICS_PORT="9100")
    for node in (head, worker):
        assert "--metrics-export-port=9100" in node["argv"]


def test_any_other_command_runs_as_given(tmp_path: Path) -> None:
    result = run(tmp_path, "sh", "-c", 'echo "$RAY_AUTH_MODE"')
    assert result.returncode == 0 and result.stdout == "token\n" and calls(tmp_path) == []
