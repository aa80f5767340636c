"""Assemble the Ray Serve application from the repository and the settings.

``build_app(settings)`` is used by ``python -m service``; ``app_builder(args)`` is the import
path for ``serve run deploy/serve_config.yaml`` (its ``args`` are settings overrides, e.g.
``repository``). The frontend setting picks the topology: serving replicas that hold every model
and listen themselves (``in-replica``), or an ingress deployment in front of one deployment per
model (``ray-proxy``, ``ray-direct``).
"""

from __future__ import annotations

import logging
from typing import Any

from ray.serve import Application

from service.inference.repository import discover
from service.settings import Settings

log = logging.getLogger(__name__)


class NoModels(RuntimeError):
    pass


def build_app(settings: Settings) -> Application:
    held = {p.name for p in settings.repository.iterdir() if p.is_dir()}
    for variable, names in (
        ("ATTN_MODELS", settings.models or []),
        ("ATTN_MODEL_OVERRIDES", settings.model_overrides),
    ):
        if unknown := sorted(set(names) - held):  # a typo would otherwise do nothing, silently
            raise NoModels(
                f"{variable} names {unknown}, not in {settings.repository}: it holds {sorted(held)}"
            )
    found = discover(settings.repository, settings.models)
    if not found.models:
        why = found.rejected or ("it is empty" if not held else f"ATTN_MODELS is {settings.models}")
        raise NoModels(f"no servable model in {settings.repository}: {why}")
    for key, reason in found.rejected.items():
        log.error("not serving %s: %s", key, reason)
    if settings.frontend == "in-replica":
        from service.hosting.in_replica import ServingReplica, replica_options, user_config

        config = user_config(found.models, found.rejected)
        return ServingReplica.options(**replica_options(settings), user_config=config).bind(  # type: ignore[attr-defined]
            settings
        )
    from service.hosting.ray_ingress import Ingress, ingress_options, model_deployment

    handles = {name: model_deployment(entry, settings) for name, entry in found.models.items()}
    return Ingress.options(**ingress_options(settings)).bind(  # type: ignore[attr-defined]
        handles, found.models, found.rejected, settings
    )


def starting_replicas(settings: Settings) -> dict[str, int]:
    """Each deployment's replicas at start (autoscaling: its minimum), by a name for messages:
    the serving replicas (in-replica), or each model's deployment (the ingress reserves none)."""
    minimum = settings.autoscaling.min_replicas if settings.autoscaling is not None else None
    if settings.frontend == "in-replica":
        return {"the serving replicas": minimum or settings.num_replicas}
    names = discover(settings.repository, settings.models).models
    return {f"model {name!r}": minimum or settings.replicas_for(name) for name in names}


def reserved_cpus(settings: Settings, starting: dict[str, int] | None = None) -> float:
    """Logical CPUs the application's replicas reserve at start — on a private Ray they must fit
    its ``num_cpus``, or replicas wait forever to be scheduled. ``starting``:
    :func:`starting_replicas`, when the caller has it."""
    return sum((starting or starting_replicas(settings)).values()) * settings.replica_num_cpus


def over_node_cap(settings: Settings, starting: dict[str, int] | None = None) -> str | None:
    """On a private Ray (one node), the deployments whose starting replicas exceed
    ``max_replicas_per_node``: they would wait forever to be scheduled. None when all fit."""
    cap = settings.max_replicas_per_node
    if cap is None:
        return None
    over = {what: n for what, n in (starting or starting_replicas(settings)).items() if n > cap}
    return ", ".join(f"{what}: {n} replicas at start" for what, n in over.items()) or None


def app_builder(args: dict[str, Any]) -> Application:
    return build_app(Settings(**args))
