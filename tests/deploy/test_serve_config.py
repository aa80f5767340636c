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
