"""The Dockerfiles run the same entry points CI runs natively, and keep the runtime torch-free."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

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
    # CPU PyTorch for export: PyPI's Linux torch wheel brings CUDA's nvidia-* wheels
    pip_index = build.index("ENV PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu")
    assert pip_index < next(n for n, i in enumerate(build) if "make models" in i)
    installs = " ".join(i for i in runtime if i.startswith("RUN "))
    assert "'.[serve" in installs and "export" not in installs and "torch" not in installs
    assert any(i.startswith("USER ") and i.split()[1] not in ("root", "0") for i in runtime)
    [health] = [i for i in runtime if i.startswith("HEALTHCHECK")]
    assert "/readyz" in health
    assert 'ENTRYPOINT ["attention-serve"]' in runtime
    # KubeRay before 1.4 starts Ray with `bash -lc`, whose Debian login profile resets PATH
    assert "ln -s /opt/venv/bin/ray /opt/venv/bin/serve /usr/local/bin/" in installs


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_the_images_give_ray_the_services_defaults_that_kuberay_cannot_export(
    name: str, tmp_path: Path
) -> None:
    """KubeRay starts Ray with `ray start`, not the entrypoint that exports Settings.ray_environment:
    what that holds whatever the frontend (the metrics path and interval, the controller's loop) is in the
    image's own environment, with the same values."""
    from service.settings import Settings

    frontends = [
        Settings(repository=tmp_path, frontend=f).ray_environment() for f in ("in-replica", "ray-proxy")
    ]
    common = {k: v for k, v in frontends[0].items() if all(env.get(k) == v for env in frontends)}
    assert {
        "RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "RAY_metrics_report_interval_ms", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"
    } <= common.keys()  # fmt: skip
    runtime = stages(ROOT / "deploy" / name)[-1]
    env = dict(
        word.split("=", 1) for i in runtime if i.startswith("ENV ") for word in i.split()[1:] if "=" in word
    )
    assert {k: env.get(k) for k in common} == common
    # the metrics path is the default frontend's (in-replica, as the KubeRay manifests run it);
    # the Ray-ingress frontends need OpenTelemetry (their pods would set it)
    default = Settings(repository=tmp_path).ray_environment()["RAY_enable_open_telemetry"]
    assert env.get("RAY_enable_open_telemetry") == default == "0"
    for manifest in (ROOT / "deploy" / "kuberay").glob("*.yaml"):
        assert "ATTN_FRONTEND" not in manifest.read_text(), manifest  # else its pods set the path


def test_the_gpu_image_is_the_cpu_image_with_the_serve_gpu_extra() -> None:
    """One pip install of ``.[serve-gpu]`` (no uninstall and reinstall of ONNX Runtime: the extras
    keep the wheels apart, tests/deploy/test_extras.py) on the same base as the CPU image — the
    CUDA libraries are the extra's pip wheels — with CUDA asked for and the driver mounted."""
    cpu, gpu = (
        [i for stage in stages(ROOT / "deploy" / name) for i in stage]
        for name in ("Dockerfile", "Dockerfile.gpu")
    )
    installs = [i for i in gpu if "pip install" in i]
    assert len(installs) == 1 and "'.[serve-gpu]'" in installs[0]
    assert not any(word in " ".join(gpu) for word in ("uninstall", "--force-reinstall", "--no-deps"))
    env = " ".join(i for i in gpu if i.startswith("ENV "))
    assert """ATTN_PROVIDERS='["CUDAExecutionProvider","CPUExecutionProvider"]'""" in env
    assert "NVIDIA_VISIBLE_DEVICES=all" in env and "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in env
    # everything else as in the CPU image, instruction by instruction: the two cannot drift apart
    gpu_env = [i for i in gpu if i.startswith("ENV ") and "NVIDIA_VISIBLE_DEVICES" in i]
    assert [i.replace("'.[serve-gpu]'", "'.[serve]'") for i in gpu if i not in gpu_env] == cpu


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore's patterns leave ``path`` (or a folder above it) out of the build
    context; ``*`` also crosses ``/`` here, so this errs on the side of "ignored"."""
    parts = path.split("/")
    for prefix in ("/".join(parts[: i + 1]) for i in range(len(parts))):
        for pattern in patterns:
            if fnmatch.fnmatchcase(prefix, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatchcase(prefix.rsplit("/", 1)[-1], pattern[3:])
            ):
                return True
    return False


def test_the_build_context_has_what_the_images_copy_and_not_the_local_builds() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert not [p for p in patterns if p.startswith("!")], "no exceptions: the check below ignores them"
    sources = {
        source
        for name in ("Dockerfile", "Dockerfile.gpu")
        for stage in stages(ROOT / "deploy" / name)
        for i in stage
        if i.startswith("COPY ") and "--from=" not in i
        for source in [w for w in i.split()[1:-1] if not w.startswith("--")]
    }
    assert {"service", "export", "pyproject.toml", "deploy/entrypoint.sh"} <= sources
    tracked = subprocess.run(["git", "ls-files", *sources], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()  # fmt: skip
    assert len(tracked) > 20 and not [f for f in tracked if dockerignored(f, patterns)]
    # the images build their own demo models; local venvs, builds and models stay out
    for local in (".venv", ".venv-triton", "build", "model_repository", "test-artifacts", ".git"):
        assert dockerignored(local, patterns), local


def test_the_serve_extras_have_no_torch() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not any(
        d.startswith("torch") for name in ("serve-core", "serve", "serve-gpu") for d in extras[name]
    )
    assert "torch==2.13.0" in extras["export"]


def test_entrypoint_is_valid_shell_and_starts_the_same_service() -> None:
    script = ROOT / "deploy" / "entrypoint.sh"
    assert script.stat().st_mode & 0o111, "entrypoint.sh must be executable"
    subprocess.run(["sh", "-n", str(script)], check=True)
    text = script.read_text()
    assert "exec python -m service" in text and "ATTN_RAY_ADDRESS=auto" in text
    assert "--metrics-export-port" in text and "--port=6379" in text


def rayservice(name: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A KubeRay manifest: its RayService, the application in its serveConfigV2, its Service."""
    service, clients = yaml.safe_load_all((ROOT / "deploy" / "kuberay" / name).read_text())
    assert service["kind"] == "RayService" and service["apiVersion"] == "ray.io/v1"
    assert clients["kind"] == "Service"
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert embedded["proxy_location"] == "Disabled"
    [app] = embedded["applications"]
    return service, app, clients


def check_serving_pods(service: dict[str, Any], app: dict[str, Any], clients: dict[str, Any]) -> None:
    """In-replica replicas on the worker pods, listening on 0.0.0.0:8000/9000 themselves, reached
    through the Kubernetes Service over the pods whose /readyz answers; valid settings."""
    from service.settings import Settings

    assert app["args"]["frontend"] == "in-replica" and app["args"]["host"] == "0.0.0.0"
    for group in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        [container] = group["template"]["spec"]["containers"]
        assert {8000, 9000} <= {p["containerPort"] for p in container["ports"]}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8000}
        # KubeRay labels pods ray.io/cluster=<RayService name>-raycluster-<suffix>: our own label
        # and the node type select them
        assert clients["spec"]["selector"] == {
            **group["template"]["metadata"]["labels"],
            "ray.io/node-type": "worker",
        }
    assert {p["port"] for p in clients["spec"]["ports"]} == {8000, 9000}
    assert set(app["args"]) <= set(Settings.model_fields), "app args must be Settings fields"
    Settings(**{**app["args"], "repository": ROOT})  # the args make a valid settings object


def test_kuberay_serves_the_same_application_as_serve_config() -> None:
    """The production path is the fast one: in-replica replicas on the worker pods, one per pod."""
    service, app, clients = rayservice("rayservice.yaml")
    [local_app] = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())["applications"]
    assert app["import_path"] == local_app["import_path"]
    check_serving_pods(service, app, clients)
    [cpu] = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert app["args"]["max_replicas_per_node"] == 1 and app["args"]["num_replicas"] == cpu["replicas"]
    assert "providers" not in app["args"]
    # a replica being replaced says unready while it serves on, longer than the Service takes to
    # see it (the pod's only replica: its probes are that replica's)
    [container] = cpu["template"]["spec"]["containers"]
    probe = container["readinessProbe"]
    assert app["args"]["unready_s"] > probe["periodSeconds"] * probe["failureThreshold"]


def test_kuberay_on_gpus_places_replicas_by_gpu_share() -> None:
    """deploy/kuberay/rayservice.gpu.yaml: serve_config.gpu.yaml's application on GPU pods. Each
    replica reserves a fraction of a GPU, and the replicas fit the gpu group's GPUs."""
    from service.settings import Settings

    service, app, clients = rayservice("rayservice.gpu.yaml")
    [local_app] = yaml.safe_load((ROOT / "deploy" / "serve_config.gpu.yaml").read_text())["applications"]
    assert app["import_path"] == local_app["import_path"]
    for key in ("providers", "num_gpus_per_replica"):
        assert app["args"][key] == local_app["args"][key], key
    check_serving_pods(service, app, clients)
    settings = Settings(**{**app["args"], "repository": ROOT})
    share = settings.actor_options()["num_gpus"]
    assert isinstance(share, float) and 0 < share < 1, "replicas share a GPU"
    [gpu] = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpus_per_pod = int(gpu["rayStartParams"]["num-gpus"])
    [container] = gpu["template"]["spec"]["containers"]
    assert container["image"] == "attention-serve:gpu"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus_per_pod
    assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus_per_pod
    # every replica finds its share: they do not wait for a GPU that never comes
    assert settings.num_replicas * share <= gpu["replicas"] * gpus_per_pod
    assert "max_replicas_per_node" not in app["args"], "replicas share a pod's GPU"
    # so a leaving replica's 503 would fail the probes of a pod whose other replicas serve on
    assert "unready_s" not in app["args"]
    # the rest is the CPU manifest's: head, pod security
    cpu, _, _ = rayservice("rayservice.yaml")
    head, cpu_head = (s["spec"]["rayClusterConfig"]["headGroupSpec"] for s in (service, cpu))
    assert head["rayStartParams"] == cpu_head["rayStartParams"]
    [cpu_group] = cpu["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert gpu["template"]["spec"]["securityContext"] == cpu_group["template"]["spec"]["securityContext"]


@pytest.mark.parametrize("name", ["rayservice.yaml", "rayservice.gpu.yaml"])
def test_kuberay_finds_the_head_ports_it_looks_up_by_name_and_probes_ray_over_http(name: str) -> None:
    """KubeRay's RayService controller finds head ports by name: ``dashboard`` to read the
    application's status, ``serve`` (or ``serve-*``) to build its serve Service. A head that
    declares any port gets none of KubeRay's defaults, and without those two the application is
    never deployed (ray-operator: ``getServicePorts``, ``FetchHeadServiceURL``,
    ``BuildServeService``). Every Ray container declares its liveness probe, and the head its
    readiness probe, as KubeRay itself does for Ray ≥ 2.53: an HTTP GET of the dashboard agent's
    ``/api/healthz`` on Ray's default agent port (older KubeRay injects ``wget``, which the image
    lacks). ``test_cluster`` checks that a node started with ``ray start`` answers on that path."""
    from ray._private import ray_constants

    service, _, _ = rayservice(name)
    cluster = service["spec"]["rayClusterConfig"]
    [head] = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["gcs"] == 6379 and ports["dashboard"] == ray_constants.DEFAULT_DASHBOARD_PORT
    assert "serve" in ports
    probe = {"path": "/api/healthz", "port": ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT}
    assert head["livenessProbe"]["httpGet"] == probe and head["readinessProbe"]["httpGet"] == probe
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    assert not [
        g for g in groups if {"dashboard-port", "dashboard-agent-listen-port"} & set(g["rayStartParams"])
    ]
    for group in cluster["workerGroupSpecs"]:
        [container] = group["template"]["spec"]["containers"]
        assert container["livenessProbe"]["httpGet"] == probe


@pytest.mark.parametrize("name", ["rayservice.yaml", "rayservice.gpu.yaml"])
def test_kuberay_pods_take_the_image_built_or_loaded_on_the_node(name: str) -> None:
    """The README builds the image locally (and loads it into kind or minikube): Kubernetes pulls a
    ``:latest`` image Always by default, from Docker Hub, where there is none."""
    service, _, _ = rayservice(name)
    cluster = service["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        [container] = group["template"]["spec"]["containers"]
        assert container["image"].startswith("attention-serve:")
        assert container["imagePullPolicy"] == "IfNotPresent"


@pytest.mark.parametrize("name", ["rayservice.yaml", "rayservice.gpu.yaml"])
def test_kuberay_pods_outlast_their_nodes_drain(name: str) -> None:
    """A deleted pod's ``ray start --block`` drains its node for RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S
    — the pod's own, else the image's (the application's args never reach ``ray start``) — which
    must cover what the application's settings need (``node_drain_timeout_s``: the replica's
    handover, test_cluster); Kubernetes kills the pod after its terminationGracePeriodSeconds (30 s
    unless set), which must be longer, with time for Ray to stop its processes."""
    from service.settings import Settings

    service, app, _ = rayservice(name)
    needed = Settings(**{**app["args"], "repository": ROOT}).node_drain_timeout_s
    image = dict(
        word.split("=", 1)
        for i in stages(ROOT / "deploy" / ("Dockerfile.gpu" if "gpu" in name else "Dockerfile"))[-1]
        if i.startswith("ENV ")
        for word in i.split()[1:]
        if "=" in word
    )
    cluster = service["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        spec = group["template"]["spec"]
        [container] = spec["containers"]
        own = {e["name"]: e.get("value") for e in container["env"]}
        drain = float(
            own.get("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S") or image["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"]
        )
        assert drain >= needed and spec["terminationGracePeriodSeconds"] >= drain + 10, group


@pytest.mark.parametrize("name", ["rayservice.yaml", "rayservice.gpu.yaml"])
def test_kuberay_manifests_use_no_deprecated_fields(name: str) -> None:
    """KubeRay has deprecated serviceUnhealthySecondThreshold and deploymentUnhealthySecondThreshold."""
    service, _, _ = rayservice(name)
    assert not [key for key in service["spec"] if key.endswith("UnhealthySecondThreshold")]


@pytest.mark.parametrize("name", ["rayservice.yaml", "rayservice.gpu.yaml"])
def test_kuberay_pods_take_the_api_token_from_a_secret(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every pod (the head builds the application's settings, the workers run its replicas) reads
    ATTN_API_TOKEN from the Secret when it exists (optional: without it, no token); the settings
    the application's args make then require it."""
    from service.settings import Settings

    service, app, _ = rayservice(name)
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        [container] = group["template"]["spec"]["containers"]
        [env] = [e for e in container["env"] if e["name"] == "ATTN_API_TOKEN"]
        ref = env["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "attention-serve", "key": "api-token", "optional": True}
    monkeypatch.setenv("ATTN_API_TOKEN", "x" * 48)
    settings = Settings(**{**app["args"], "repository": ROOT})
    assert settings.api_token is not None and settings.api_token.get_secret_value() == "x" * 48
