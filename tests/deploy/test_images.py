"""The Dockerfiles run the same entry points CI runs natively, and keep the runtime torch-free."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def stages(dockerfile: Path) -> list[list[str]]:
    """Instructions per stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    result: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            result.append([])
        result[-1].append(line)
    return result


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_multi_stage_build_uses_the_projects_own_commands(name: str) -> None:
    build, runtime = stages(ROOT / "deploy" / name)
    runs = [i for i in build if i.startswith("RUN ")]
    assert any("make models" in r for r in runs), (
        "the build stage must run `make models`, as CI and developers do"
    )
    assert "models" in make_targets()
    assert any("dataset-fashion-mnist" in r for r in runs)
    installs = " ".join(i for i in runtime if i.startswith("RUN "))
    assert "'.[serve" in installs and "export" not in installs and "torch" not in installs
    assert any(i.startswith("USER ") and i.split()[1] not in ("root", "0") for i in runtime)
    [health] = [i for i in runtime if i.startswith("HEALTHCHECK")]
    assert "/readyz" in health
    assert 'ENTRYPOINT ["attention-serve"]' in runtime


def test_the_serve_extra_has_no_torch() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not any(d.startswith("torch") for d in extras["serve"] + extras["gpu"])
    assert "torch==2.13.0" in extras["export"]


def test_entrypoint_is_valid_shell_and_starts_the_same_service() -> None:
    script = ROOT / "deploy" / "entrypoint.sh"
    assert script.stat().st_mode & 0o111, "entrypoint.sh must be executable"
    subprocess.run(["sh", "-n", str(script)], check=True)
    text = script.read_text()
    assert "exec python -m service" in text and "ATTN_RAY_ADDRESS=auto" in text
    assert "--metrics-export-port" in text and "--port=6379" in text


def test_kuberay_serves_the_same_application_as_serve_config() -> None:
    """The production path is the fast one: in-replica replicas on the worker pods, one per pod,
    reached through a Kubernetes Service over those pods' own ports, ready once /readyz answers."""
    service, clients = yaml.safe_load_all((ROOT / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    assert service["kind"] == "RayService" and service["apiVersion"] == "ray.io/v1"
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    local = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    [app], [local_app] = embedded["applications"], local["applications"]
    assert app["import_path"] == local_app["import_path"]
    assert app["args"]["frontend"] == "in-replica" and embedded["proxy_location"] == "Disabled"
    assert app["args"]["host"] == "0.0.0.0" and app["args"]["max_replicas_per_node"] == 1
    groups = {g["groupName"]: g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert app["args"]["num_replicas"] == groups["cpu"]["replicas"]
    for group in groups.values():
        [container] = group["template"]["spec"]["containers"]
        assert {8000, 9000} <= {p["containerPort"] for p in container["ports"]}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8000}
    assert groups["gpu"]["rayStartParams"]["num-gpus"] == "1"
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == 1
    assert clients["kind"] == "Service"
    assert clients["spec"]["selector"] == {
        "ray.io/cluster": service["metadata"]["name"],
        "ray.io/node-type": "worker",
    }
    assert {p["port"] for p in clients["spec"]["ports"]} == {8000, 9000}
    from service.settings import Settings

    assert set(app["args"]) <= set(Settings.model_fields), "app args must be Settings fields"
    Settings(**{**app["args"], "repository": ROOT})  # the args make a valid settings object
