"""deploy/serve_config.yaml builds the same application as `make serve`."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from ray.serve import Application

ROOT = Path(__file__).resolve().parents[2]


def test_serve_config_points_at_the_app_builder(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    [app] = config["applications"]
    # the default frontend: the replicas listen themselves, Ray starts no proxy
    assert config["proxy_location"] == "Disabled" and "frontend" not in app["args"]
    module, attr = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module), attr)
    from service.hosting.app import NoModels

    with pytest.raises(NoModels, match="no servable model"):
        builder({**app["args"], "repository": str(tmp_path)})


@pytest.mark.slow
def test_serve_config_builds_an_application_from_a_repository(tiny_repository: Path) -> None:
    from service.hosting.app import app_builder

    assert isinstance(app_builder({"repository": str(tiny_repository)}), Application)


def test_the_gpu_serve_config_is_the_same_app_on_a_share_of_a_gpu(tmp_path: Path) -> None:
    """deploy/serve_config.gpu.yaml: the same application, CUDA first, each replica reserving a
    fraction of a GPU (several share one)."""
    from service.settings import Settings

    [cpu] = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())["applications"]
    config = yaml.safe_load((ROOT / "deploy" / "serve_config.gpu.yaml").read_text())
    [app] = config["applications"]
    assert config["proxy_location"] == "Disabled" and app["import_path"] == cpu["import_path"]
    gpu_only = ("providers", "num_gpus_per_replica")
    assert {k: v for k, v in app["args"].items() if k not in gpu_only} == cpu["args"]
    settings = Settings(**{**app["args"], "repository": tmp_path})
    assert settings.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"] and settings.use_gpu
    share = settings.actor_options()["num_gpus"]
    assert isinstance(share, float) and 0 < share < 1


@pytest.mark.parametrize(
    ("frontend", "environ", "missing"),
    [
        ("ray-proxy", {"RAY_enable_open_telemetry": "0"}, ["RAY_enable_open_telemetry=1"]),  # the images'
        ("ray-proxy", {}, []),  # Ray's default: OpenTelemetry on
        ("ray-proxy", {"RAY_enable_open_telemetry": "true"}, []),
        (
            "ray-direct",
            {},
            ["RAY_SERVE_ENABLE_DIRECT_INGRESS=1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=8001"],
        ),
        ("in-replica", {"RAY_enable_open_telemetry": "0"}, []),
    ],
)
def test_serve_run_refuses_a_frontend_its_ray_processes_cannot_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, frontend: str, environ: dict, missing: list[str]
) -> None:
    """``serve run`` and KubeRay build the app in Ray processes whose environment is the shell's or
    the image's, not the settings' (``python -m service`` and the entrypoint set it): ray-proxy
    in the images (OpenTelemetry off) had Ray's metrics agent fail every scrape, ray-direct
    without its switches listened on no direct port. Now the build is refused, naming what to set."""
    from service.hosting.app import NoModels, app_builder, environment_refusal
    from service.settings import Settings

    for key in ("RAY_enable_open_telemetry", "RAY_SERVE_ENABLE_DIRECT_INGRESS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    settings = Settings(repository=tmp_path, frontend=frontend)
    why = environment_refusal(settings, {**environ})
    if not missing:
        assert why is None
        with pytest.raises(NoModels):  # on to the build: an empty repository
            app_builder({"repository": str(tmp_path), "frontend": frontend})
        return
    assert why is not None and all(m in why for m in missing), why
    with pytest.raises(ValueError, match=f"the {frontend} frontend needs"):
        app_builder({"repository": str(tmp_path), "frontend": frontend})
