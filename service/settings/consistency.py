"""Settings that each pass their own bounds but not together: what :class:`Settings` refuses at
start, each with a message naming the settings, rather than a replica that fails later — a wait
that always ends in 504, a port Ray cannot bind, a placement ignored without a word."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.settings import Settings

#: ray-direct: the ingress listens on one of this many ports above ATTN_HTTP_PORT and above
#: ATTN_GRPC_PORT (Ray's RAY_SERVE_DIRECT_INGRESS_MIN/MAX_*_PORT)
DIRECT_PORTS = 10
#: the largest port there is
MAX_PORT = 65535


def direct_port_clash(settings: Settings) -> str | None:
    """ray-direct's ingress replica listens on one of the :data:`DIRECT_PORTS` ports above
    ATTN_HTTP_PORT and above ATTN_GRPC_PORT (``Settings._serve_environment``; a restarted one may
    take the next while the old one's is held): those ranges must exist and hold no other port."""
    ranges = {"ATTN_HTTP_PORT": settings.http_port, "ATTN_GRPC_PORT": settings.grpc_port}
    ports = {**ranges, "ATTN_METRICS_PORT": settings.metrics_port}
    for name, base in ranges.items():
        if base + DIRECT_PORTS > MAX_PORT:
            return (
                f"ray-direct: the ingress takes {name}+1 … +{DIRECT_PORTS}, past port {MAX_PORT}; "
                f"set {name} to at most {MAX_PORT - DIRECT_PORTS}"
            )
        inside = [
            other for other, port in ports.items() if other != name and base <= port <= base + DIRECT_PORTS
        ]
        if inside:
            return (
                f"ray-direct: the ingress takes {name}+1 … +{DIRECT_PORTS} "
                f"({base + 1}–{base + DIRECT_PORTS}), which holds {', '.join(inside)}; move it at least "
                f"{DIRECT_PORTS + 1} away"
            )
    return None


def batching_conflict(settings: Settings) -> str | None:
    """A batch wait that reaches the request timeout, for the global batching or a model's
    override: a lone request would wait it out and be answered 504."""
    limits = settings.limits
    for model in ["", *settings.model_overrides]:
        named = f"model_overrides.{model}." if model else "batching."
        wait = settings.batching_for(model).batch_wait_timeout_s
        if wait >= limits.request_timeout_s:
            return (
                f"{named}batch_wait_timeout_s ({wait} s) must be shorter than "
                f"limits.request_timeout_s ({limits.request_timeout_s} s): a lone request would wait it out"
            )
    return None


def placement_conflict(settings: Settings) -> str | None:
    """A model's own placement (``num_replicas``, ``num_gpus_per_replica``) where nothing places
    it: the in-replica frontend's replicas each hold every model (it was silently ignored there,
    once), and autoscaling replaces each model deployment's replica count."""
    overrides = settings.model_overrides.items()
    placed = sorted(
        f"{model}.{key}"
        for model, override in overrides
        for key in ("num_replicas", "num_gpus_per_replica")
        if getattr(override, key) is not None
    )
    if placed and settings.frontend == "in-replica":
        return (
            f"model_overrides: {', '.join(placed)} place a model's own deployment (ATTN_FRONTEND "
            "ray-proxy or ray-direct); the in-replica frontend's replicas each hold every model: "
            "set ATTN_NUM_REPLICAS / ATTN_NUM_GPUS_PER_REPLICA instead"
        )
    counted = sorted(m for m, o in overrides if o.num_replicas is not None)
    if settings.autoscaling is not None and counted:
        return (
            f"model_overrides: {', '.join(f'{m}.num_replicas' for m in counted)} with ATTN_AUTOSCALING: "
            "autoscaling sets every model's replica count (min_replicas … max_replicas); "
            "leave one of them out"
        )
    return None
