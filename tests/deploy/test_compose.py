"""docker-compose.yml: validated by docker-compose itself, then checked for what the product needs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = shutil.which("docker-compose")


SERVING_PORTS = {"127.0.0.1:8000:8000/tcp", "127.0.0.1:9000:9000/tcp", "127.0.0.1:8080:8080/tcp"}


def config(*files: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The configuration as docker-compose resolves it (1.29: validated, interpolated, short
    syntax, override files merged in order), with ``env`` set in the shell that runs it."""
    if COMPOSE is None:
        pytest.fail("docker-compose is missing: `make system-deps` installs Debian's docker-compose")
    args = [arg for f in files or ("docker-compose.yml",) for arg in ("-f", str(ROOT / f))]
    shell = {k: v for k, v in os.environ.items() if not k.startswith("ATTN_")} | (env or {})
    result = subprocess.run([COMPOSE, *args, "config"], capture_output=True, text=True, cwd=ROOT, env=shell)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def started(services: dict[str, Any]) -> set[str]:
    """The services a plain ``up`` starts: those in no profile."""
    return {name for name, service in services.items() if "profiles" not in service}


def volumes(service: dict[str, Any]) -> dict[str, str]:
    """target → source of each volume ("source:target[:mode]")."""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def test_default_services_ports_and_healthchecks() -> None:
    services = config()["services"]
    assert started(services) == {"serve", "prometheus", "grafana"}
    assert set(services["serve"]["ports"]) >= SERVING_PORTS
    assert all(p.startswith("127.0.0.1:") for s in services.values() for p in s.get("ports", []))
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
    assert "/readyz" in " ".join(services["serve"]["healthcheck"]["test"])


def gpu_command() -> list[str]:
    """The compose files of the GPU command documented atop docker-compose.yml, checked to be the
    README's too."""
    [command] = re.findall(r"docker compose (-f \S+ -f \S+) up", (ROOT / "docker-compose.yml").read_text())
    assert f"docker compose {command} up" in (ROOT / "README.md").read_text()
    return command.split()[1::2]


def test_the_gpu_command_runs_the_gpu_image_instead_of_the_cpu_one() -> None:
    """The documented GPU command yields one serving service, the GPU image on an NVIDIA GPU, under
    the same name: Prometheus, Grafana and the workers find it as before, nothing else takes its
    ports, and no CPU service is started beside it."""
    files = gpu_command()
    assert files == ["docker-compose.yml", "docker-compose.gpu.yml"]
    services = config(*files)["services"]
    assert started(services) == {"serve", "prometheus", "grafana"}
    serving = [n for n, s in services.items() if SERVING_PORTS & set(s.get("ports", []))]
    assert serving == ["serve"] and set(services["serve"]["ports"]) >= SERVING_PORTS
    gpu = services["serve"]
    assert gpu["image"] == "attention-serve:gpu" and gpu["build"]["dockerfile"] == "deploy/Dockerfile.gpu"
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    # all else as without the override: healthcheck, volumes, shared memory, environment
    cpu_services = config()["services"]
    assert not any("deploy" in s for s in cpu_services.values()), "the CPU file asks for no GPU"
    cpu = cpu_services["serve"]
    assert set(gpu["ports"]) == set(cpu["ports"])  # the merge reorders them
    assert {
        k: v for k, v in gpu.items() if k not in ("image", "build", "deploy", "ports", "environment")
    } == {k: v for k, v in cpu.items() if k not in ("image", "build", "ports", "environment")}
    assert gpu["environment"] == {**cpu["environment"], "ATTN_NUM_GPUS_PER_REPLICA": None}
    # the cluster profile stays CPU-only, as both files and the README say: no GPU workers
    assert services["ray-worker"] == cpu_services["ray-worker"]


def test_the_gpu_command_passes_each_replica_s_gpu_share_through() -> None:
    """docker-compose.gpu.yml documents ATTN_NUM_GPUS_PER_REPLICA: set in the shell, it reaches
    the service (before, nothing passed it and every replica kept the default share)."""
    from service.settings import Settings

    assert "ATTN_NUM_GPUS_PER_REPLICA" in (ROOT / "docker-compose.gpu.yml").read_text().split("services:")[0]
    assert "num_gpus_per_replica" in Settings.model_fields
    services = config(*gpu_command(), env={"ATTN_NUM_GPUS_PER_REPLICA": "0.5"})["services"]
    assert services["serve"]["environment"]["ATTN_NUM_GPUS_PER_REPLICA"] == "0.5"


def test_the_healthchecks_ask_the_port_the_service_listens_on() -> None:
    """The image's and compose's healthchecks (the same command) GET /readyz on ATTN_HTTP_PORT
    (8000 unset): run here against a server on another port, they pass while it answers 200 and
    fail when it answers 503 or nothing listens there."""
    import http.server
    import sys
    import threading

    compose_test = tuple(config()["services"]["serve"]["healthcheck"]["test"])
    for name in ("Dockerfile", "Dockerfile.gpu"):
        [line] = [
            row
            for row in (ROOT / "deploy" / name).read_text().splitlines()
            if row.strip().startswith("CMD [")
        ]
        assert tuple(json.loads(line.strip()[len("CMD ") :])) == compose_test[1:], name
    command = [sys.executable, *compose_test[2:]]  # this python for the image's
    status = {"code": 200}

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status["code"] if self.path == "/readyz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    def check(**extra: str) -> int:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ATTN_")}
        return subprocess.run(command, env={**env, **extra}, capture_output=True, timeout=30).returncode

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = str(server.server_address[1])
        assert check(ATTN_HTTP_PORT=port) == 0
        status["code"] = 503
        assert check(ATTN_HTTP_PORT=port) != 0
        status["code"] = 200
        server.shutdown()
        server.server_close()
        assert check(ATTN_HTTP_PORT=port) != 0  # nothing listens
    finally:
        server.server_close()


def test_every_long_running_service_is_restarted_unless_stopped() -> None:
    """A crashed service stayed down (Docker restarts no container for being unhealthy), and a
    worker whose ``ray start --block`` ended with its head stayed out of the cluster."""
    services = config()["services"]
    assert {name for name, svc in services.items() if svc.get("restart") != "unless-stopped"} == set()


def test_cluster_profile() -> None:
    from service.settings import Settings

    cfg = config()
    assert cfg["services"]["ray-worker"]["profiles"] == ["cluster"]
    worker = cfg["services"]["ray-worker"]
    assert worker["command"] == ["worker"] and worker["environment"]["RAY_HEAD"] == "serve:6379"
    # not service_healthy: by then the service has placed its replicas, and Ray Serve never moves
    # them; the worker waits for the head's GCS itself (tests/deploy/test_entrypoint.py)
    assert worker["depends_on"]["serve"]["condition"] == "service_started"
    # the service's settings too: the entrypoint derives every node's Ray environment from them
    assert cfg["services"]["serve"]["environment"].items() <= worker["environment"].items()
    # the serve image, buildable from the worker too: never pulled from a registry
    assert worker["image"] == cfg["services"]["serve"]["image"]
    assert worker["build"] == cfg["services"]["serve"]["build"]
    # stopped or scaled down, its `ray start --block` drains the node (test_cluster) for up to
    # ATTN_NODE_DRAIN_S before it stops Ray's processes: Docker kills it only after that. Short:
    # every node holds a replica (one per node), so no replacement finds room and the drain
    # runs to its end — Ray's 60 s made every `docker compose down` wait a minute
    drain = Settings(
        repository=ROOT, node_drain_s=worker["environment"]["ATTN_NODE_DRAIN_S"]
    ).node_drain_timeout_s
    grace = worker["stop_grace_period"]
    assert drain <= 15 and grace.endswith("s") and float(grace[:-1]) >= drain + 10


def test_the_cluster_command_puts_one_replica_on_each_node() -> None:
    """The documented cluster command sets ATTN_MAX_REPLICAS_PER_NODE=1 (a real setting), which
    compose passes to the service; a plain ``up`` leaves it unset: one machine may hold several
    replicas."""
    from service.settings import Settings

    command = "ATTN_NUM_REPLICAS=4 ATTN_MAX_REPLICAS_PER_NODE=1 docker compose --profile cluster up"
    assert (
        command in (ROOT / "README.md").read_text() and command in (ROOT / "docker-compose.yml").read_text()
    )
    assert "max_replicas_per_node" in Settings.model_fields
    assert "ATTN_MAX_REPLICAS_PER_NODE" not in {
        k for k, v in config()["services"]["serve"]["environment"].items() if v is not None
    }
    cluster = config(env={"ATTN_NUM_REPLICAS": "4", "ATTN_MAX_REPLICAS_PER_NODE": "1"})["services"]["serve"]
    assert cluster["environment"]["ATTN_MAX_REPLICAS_PER_NODE"] == "1"
    assert cluster["environment"]["ATTN_NUM_REPLICAS"] == "4"


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_every_build_and_mounted_path_exists(gpu: bool) -> None:
    cfg = config(*gpu_command()) if gpu else config()
    for name, service in cfg["services"].items():
        if "build" in service:
            context = Path(service["build"]["context"])
            assert context.is_dir() and (context / service["build"]["dockerfile"]).is_file(), name
        for source in volumes(service).values():
            if source.startswith("/"):
                assert Path(source).exists(), f"{name} mounts a missing {source}"
    assert {"models", "prometheus-data", "grafana-data"} <= set(cfg["volumes"])


def test_ray_clients_in_docker_exec_send_the_cluster_token() -> None:
    """The entrypoint exports RAY_AUTH_MODE only to what it starts; the healthcheck's ``ray status``
    runs through ``docker exec`` with the container's environment, so compose sets it there."""
    services = config()["services"]
    for name in ("serve", "ray-worker"):
        assert services[name]["environment"]["RAY_AUTH_MODE"] == "token", name
    assert services["ray-worker"]["healthcheck"]["test"][1] == "ray"
    assert "export RAY_AUTH_MODE=token" in (ROOT / "deploy" / "entrypoint.sh").read_text()


def test_model_repository_and_cluster_token_are_shared_with_workers() -> None:
    cfg = config()
    for name in ("serve", "ray-worker"):
        assert volumes(cfg["services"][name])["/models"] == "models"
        assert volumes(cfg["services"][name])["/home/serve/.ray"] == "ray-auth"
    raw = (ROOT / "docker-compose.yml").read_text()
    assert "${MODEL_REPOSITORY:-models}:/models" in raw


def test_the_cluster_profile_reaches_every_nodes_replicas() -> None:
    """cluster-lb balances over the head's and every worker's own serving ports (in-replica
    replicas listen on each container's 0.0.0.0:8000/9000), using those whose /readyz answers;
    haproxy itself validates the configuration."""
    services = config()["services"]
    lb = services["cluster-lb"]
    assert lb["profiles"] == ["cluster"] and volumes(lb)["/usr/local/etc/haproxy"].endswith("deploy/haproxy")
    assert {"127.0.0.1:8001:8000/tcp", "127.0.0.1:9001:9000/tcp"} <= set(lb["ports"])
    text = (ROOT / "deploy" / "haproxy" / "haproxy.cfg").read_text()
    for port in ("8000", "9000"):
        assert f"server head serve:{port}" in text and f"ray-worker:{port}" in text
    assert "option httpchk GET /readyz" in text
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.fail("haproxy is missing: `make system-deps` installs Debian's haproxy")
    check = subprocess.run([haproxy, "-c", "-f", str(ROOT / "deploy" / "haproxy" / "haproxy.cfg")],
                           capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
