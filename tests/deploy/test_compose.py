"""docker-compose.yml: validated by docker-compose itself, then checked for what the product needs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = shutil.which("docker-compose")


def config() -> dict[str, Any]:
    """The configuration as docker-compose resolves it (1.29: validated, interpolated, short syntax)."""
    if COMPOSE is None:
        pytest.fail("docker-compose is missing: `make system-deps` installs Debian's docker-compose")
    result = subprocess.run(
        [COMPOSE, "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def volumes(service: dict[str, Any]) -> dict[str, str]:
    """target → source of each volume ("source:target[:mode]")."""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def test_default_services_ports_and_healthchecks() -> None:
    services = config()["services"]
    assert {n for n, s in services.items() if "profiles" not in s} == {"serve", "prometheus", "grafana"}
    ports = set(services["serve"]["ports"])
    assert {"127.0.0.1:8000:8000/tcp", "127.0.0.1:9000:9000/tcp", "127.0.0.1:8080:8080/tcp"} <= ports
    assert all(p.startswith("127.0.0.1:") for s in services.values() for p in s.get("ports", []))
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
    assert "/readyz" in " ".join(services["serve"]["healthcheck"]["test"])


def test_profiles_gpu_and_cluster() -> None:
    cfg = config()
    assert cfg["services"]["serve-gpu"]["profiles"] == ["gpu"]
    assert cfg["services"]["ray-worker"]["profiles"] == ["cluster"]
    gpu = cfg["services"]["serve-gpu"]
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["build"]["dockerfile"] == "deploy/Dockerfile.gpu"
    worker = cfg["services"]["ray-worker"]
    assert worker["command"] == ["worker"] and worker["environment"]["RAY_HEAD"] == "serve:6379"
    assert worker["depends_on"]["serve"]["condition"] == "service_healthy"


def test_every_build_and_mounted_path_exists() -> None:
    cfg = config()
    for name, service in cfg["services"].items():
        if "build" in service:
            context = Path(service["build"]["context"])
            assert context.is_dir() and (context / service["build"]["dockerfile"]).is_file(), name
        for source in volumes(service).values():
            if source.startswith("/"):
                assert Path(source).exists(), f"{name} mounts a missing {source}"
    assert {"models", "prometheus-data", "grafana-data"} <= set(cfg["volumes"])


def test_model_repository_and_cluster_token_are_shared_with_workers() -> None:
    cfg = config()
    for name in ("serve", "serve-gpu", "ray-worker"):
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
