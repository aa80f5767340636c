"""The environment variables every Ray process must see before it starts: Ray's metrics export
(its path and interval), Ray Serve's control loop, how long a stopped node drains, and the chosen
frontend's switches. ``python -m service`` sets them before ``ray.init``; a cluster started with
``ray start`` needs them in its environment (the images carry the ones no frontend changes, for
KubeRay; the entrypoint exports them from the same settings)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.settings.consistency import DIRECT_PORTS

if TYPE_CHECKING:
    from service.settings import Settings


def ray_environment(s: Settings) -> dict[str, str]:
    metrics = {
        "RAY_enable_open_telemetry": "1" if s.open_telemetry else "0",
        "RAY_metrics_report_interval_ms": str(round(s.metrics_export_s * 1000)),
    }
    controller = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": str(s.serve_control_loop_s)}
    # a node whose `ray start --block` gets SIGTERM (a Kubernetes pod deletion) is marked
    # draining for this long: Ray Serve starts its replicas' replacements elsewhere and stops
    # them gracefully once those run, at the latest unready_s + drain_s + 2 before the end
    node = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": f"{s.node_drain_timeout_s:g}"}
    return {**metrics, **controller, **node, **_serve_environment(s)}


def _serve_environment(s: Settings) -> dict[str, str]:
    # a stopping proxy or ingress replica waits this long for load balancers (Ray's default 30 s)
    draining = {
        "RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S": str(max(s.drain_s, 0.1)),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(s.drain_s),
    }
    if s.frontend == "ray-direct":
        return {
            **draining,
            "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            # the ingress replicas' ports: just above the proxy's, reused at once
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(s.http_port + 1),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(s.http_port + DIRECT_PORTS),
            "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(s.grpc_port + 1),
            "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(s.grpc_port + DIRECT_PORTS),
            "RAY_SERVE_PORT_QUARANTINE_S": "0",
        }
    if s.frontend == "ray-proxy":
        return draining
    if s.autoscaling is not None:  # replicas report what they hold every second, not 10 s
        return {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1"}
    return {}
