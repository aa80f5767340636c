"""Assemble the Ray Serve application from the repository and the settings.

``build_app(settings)`` is used by ``python -m service``; ``app_builder(args)`` is the import
path for ``serve run deploy/serve_config.yaml`` (its ``args`` are settings overrides, e.g.
``repository``).
"""

from __future__ import annotations

import logging
from typing import Any

from ray.serve import Application

from service.deployment import model_deployment
from service.ingress import Ingress
from service.repository import discover
from service.settings import Settings

log = logging.getLogger(__name__)


class NoModels(RuntimeError):
    pass


def build_app(settings: Settings) -> Application:
    found = discover(settings.repository, settings.models)
    if not found.models:
        raise NoModels(f"no servable model in {settings.repository}: {found.rejected or 'it is empty'}")
    for key, reason in found.rejected.items():
        log.error("not serving %s: %s", key, reason)
    handles = {name: model_deployment(entry, settings) for name, entry in found.models.items()}
    return Ingress.options(  # type: ignore[attr-defined]
        name="ingress",
        max_ongoing_requests=1024,
        ray_actor_options={"num_cpus": 0},
        logging_config=settings.serve_logging,
    ).bind(handles, found.models, found.rejected, settings)


def app_builder(args: dict[str, Any]) -> Application:
    return build_app(Settings(**args))
