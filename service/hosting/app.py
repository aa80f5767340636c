"""Assemble the Ray Serve application from the repository and the settings.

``build_app(settings)`` is used by ``python -m service``; ``app_builder(args)`` is the import
path for ``serve run deploy/serve_config.yaml`` (its ``args`` are settings overrides, e.g.
``repository``). The frontend setting picks the topology: serving replicas that hold every model
and listen themselves (``in-replica``), or an ingress deployment in front of one deployment per
model (``ray-proxy``, ``ray-direct``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
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
    return {what: replicas for what, (replicas, _) in starting_shares(settings).items()}


def starting_shares(settings: Settings) -> dict[str, tuple[int, float]]:
    """:func:`starting_replicas` with the share of a GPU each of those replicas reserves (0
    without CUDA; :meth:`Settings.gpu_share`), from one look at the repository."""
    minimum = settings.autoscaling.min_replicas if settings.autoscaling is not None else None
    if settings.frontend == "in-replica":
        return {"the serving replicas": (minimum or settings.num_replicas, settings.gpu_share())}
    names = discover(settings.repository, settings.models).models
    shares = {name: (minimum or settings.replicas_for(name), settings.gpu_share(name)) for name in names}
    return {f"model {name!r}": share for name, share in shares.items()}


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


#: fractional replicas up to which :func:`fits_on_gpus` searches every placement
EXACT_PACKING = 16


def fits_on_gpus(shares: list[tuple[int, float]], gpus: int) -> bool:
    """Whether replicas of these (count, GPU share) can be placed on ``gpus`` GPUs at all: a
    whole-number share takes that many whole GPUs, a fraction must fit within one GPU (3 × 0.6
    does not fit on 2 GPUs though 1.8 ≤ 2). Every placement is tried for up to
    :data:`EXACT_PACKING` fractions (2 × 0.4 + 4 × 0.3 fits on 2), beyond it only the sum counts.
    Ray places replicas one at a time and may still miss a placement that exists."""
    whole = sum(n * share for n, share in shares if share >= 1)
    if whole > gpus:
        return False
    fractions = sorted((share for n, share in shares if 0 < share < 1 for _ in range(n)), reverse=True)
    free = [1.0] * (gpus - round(whole))
    if len(fractions) > EXACT_PACKING:
        return sum(fractions) <= len(free) + 1e-9

    def place(i: int) -> bool:
        if i == len(fractions):
            return True
        tried: set[float] = set()
        for gpu, room in enumerate(free):
            if room + 1e-9 >= fractions[i] and round(room, 9) not in tried:
                tried.add(round(room, 9))  # GPUs with the same room left are the same choice
                free[gpu] -= fractions[i]
                if place(i + 1):
                    return True
                free[gpu] += fractions[i]
        return False

    return place(0)


def private_ray_refusal(settings: Settings, cpus: int, gpus: int = 0) -> str | None:
    """Why the replicas could never be placed on the private Ray of ``cpus`` CPUs and ``gpus``
    GPUs (one node), or None: more CPUs or GPUs reserved than it has, or more replicas than
    ``max_replicas_per_node`` — they would wait forever to be scheduled."""
    shares = starting_shares(settings)
    starting = {what: replicas for what, (replicas, _) in shares.items()}
    need_gpus = sum(replicas * share for replicas, share in shares.values())
    if need_gpus > gpus + 1e-9 or not fits_on_gpus(list(shares.values()), gpus):
        packed = "" if need_gpus > gpus + 1e-9 else ", and Ray puts each fraction on one GPU: they do not fit"
        return (f"the replicas reserve {need_gpus:g} GPUs (ATTN_NUM_GPUS_PER_REPLICA and the models' own "
                f"shares, {settings.gpu_share():g} each by default) but this Ray has {gpus}{packed}; they "
                "would wait forever to be scheduled. Lower ATTN_NUM_GPUS_PER_REPLICA or ATTN_NUM_REPLICAS, "
                "or serve fewer models (ATTN_MODELS)")  # fmt: skip
    if (need := reserved_cpus(settings, starting)) > cpus:
        return (f"the replicas reserve {need:g} CPUs (ATTN_REPLICA_NUM_CPUS={settings.replica_num_cpus:g} "
                f"each) but this Ray has {cpus}; they would wait forever to be scheduled. Lower "
                "ATTN_REPLICA_NUM_CPUS (0 is allowed), serve fewer models (ATTN_MODELS) or raise "
                "ATTN_NUM_CPUS")  # fmt: skip
    if over := over_node_cap(settings, starting):
        return (f"{over} on this one-node Ray, above ATTN_MAX_REPLICAS_PER_NODE="
                f"{settings.max_replicas_per_node}; they would wait forever to be scheduled. Raise it, "
                "or lower ATTN_NUM_REPLICAS (or ATTN_AUTOSCALING's min_replicas)")  # fmt: skip
    return None


def private_ray_warning(settings: Settings, cpus: int) -> str | None:
    """What autoscaling asks for that the private Ray of ``cpus`` CPUs (one node) could never
    place: the replicas beyond it would wait to be scheduled (Ray logs it every 30 s) while the
    others carry the load. None when ``max_replicas`` fits, or without autoscaling. Said only of a
    start :func:`private_ray_refusal` lets through."""
    scaling = settings.autoscaling
    if scaling is None:
        return None
    deployments = list(starting_replicas(settings))
    per_node = settings.max_replicas_per_node
    if per_node is not None and scaling.max_replicas > per_node:
        return (f"ATTN_AUTOSCALING's max_replicas={scaling.max_replicas} is above ATTN_MAX_REPLICAS_PER_NODE="
                f"{per_node} on this one-node Ray: at most {per_node} replicas per deployment will run, the "
                "rest wait to be scheduled")  # fmt: skip
    need = reserved_cpus(settings, {what: scaling.max_replicas for what in deployments})
    if need <= cpus:
        return None
    return (f"ATTN_AUTOSCALING's max_replicas={scaling.max_replicas} for {len(deployments)} deployment(s) "
            f"reserve {need:g} CPUs (ATTN_REPLICA_NUM_CPUS={settings.replica_num_cpus:g} each), more than "
            f"this Ray's {cpus}: replicas beyond {cpus} CPUs' worth wait to be scheduled. Lower "
            "max_replicas or ATTN_REPLICA_NUM_CPUS, or raise ATTN_NUM_CPUS")  # fmt: skip


def environment_refusal(settings: Settings, environ: Mapping[str, str]) -> str | None:
    """Why the Ray processes this application would run in (``environ``: their environment, which
    ``serve run`` and KubeRay's pods give Ray from the shell or the image, not from the settings)
    cannot serve its frontend; None when they can. ``python -m service`` and the entrypoint set
    what the frontend needs (``Settings.ray_environment``); ``serve run`` and KubeRay do not, and
    the images carry the in-replica frontend's values."""
    if settings.frontend == "in-replica":
        return None
    needed = settings.ray_environment()
    wrong = []
    # unset: Ray's default, on
    if environ.get("RAY_enable_open_telemetry", "1").lower() not in ("1", "true"):  # as Ray reads it
        wrong.append("RAY_enable_open_telemetry")
    if settings.frontend == "ray-direct":
        ports = [f"RAY_SERVE_DIRECT_INGRESS_{e}_{p}_PORT" for p in ("HTTP", "GRPC") for e in ("MIN", "MAX")]
        wrong += [k for k in ["RAY_SERVE_ENABLE_DIRECT_INGRESS", *ports] if environ.get(k) != needed[k]]
    if not wrong:
        return None
    settings_line = " ".join(f"{k}={needed[k]}" for k in wrong)
    return (
        f"the {settings.frontend} frontend needs {settings_line} in the environment of every Ray "
        "process (set it in the pods' or the shell's environment before Ray starts — a serve "
        "config's runtime_env does not reach Ray's own processes: "
        "OpenTelemetry off, Ray's metrics agent fails every scrape behind Ray's proxies; without "
        "the direct-ingress switches nothing listens on the direct ports). The images carry the "
        "in-replica frontend's values"
    )


def app_builder(args: dict[str, Any]) -> Application:
    """``serve run`` / KubeRay's import path: the settings from ``args``, refused (one message)
    where the Ray processes' environment cannot serve their frontend."""
    settings = Settings(**args)
    if why := environment_refusal(settings, os.environ):
        raise ValueError(why)
    return build_app(settings)
