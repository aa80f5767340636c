"""``python -m service``: start a local Ray, deploy the application, serve until interrupted."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from pydantic import ValidationError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("--repository", type=Path, help="model repository (ATTN_REPOSITORY)")
    parser.add_argument("--host", help="bind address (ATTN_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (ATTN_HTTP_PORT, default 8000)")
    args = parser.parse_args(argv)
    overrides = {
        k: v
        for k, v in {"repository": args.repository, "host": args.host, "http_port": args.port}.items()
        if v
    }

    from service.settings import Settings

    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"error: bad settings:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_worker_niceness", "0")
    os.environ["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] = str(settings.grpc_max_message_bytes)
    os.environ.update(settings.ray_environment())  # before Ray starts: its processes read them

    import ray
    from ray import serve

    from service.app import build_app
    from service.grpc_ingress import SERVICER_FUNCTIONS

    app = build_app(settings)  # validates the repository before Ray starts
    if settings.ray_address is None:  # a private Ray for this process, stopped with it
        ray.init(
            address="local", num_cpus=settings.num_cpus or os.cpu_count(), include_dashboard=False,
            _metrics_export_port=settings.metrics_port, logging_level=logging.WARNING,
        )  # fmt: skip
    else:  # a cluster started with `ray start`: its nodes export metrics on their own ports
        ray.init(address=settings.ray_address, logging_level=logging.WARNING)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        in_replica = settings.frontend == "in-replica"  # the replicas listen; no Ray proxy
        serve.start(
            proxy_location="Disabled" if in_replica else settings.proxy_location,
            logging_config=settings.serve_logging,
            http_options={"host": settings.host, "port": settings.http_port},
            grpc_options={"port": settings.grpc_port, "grpc_servicer_functions": SERVICER_FUNCTIONS},
        )
        serve.run(app, name="attention", route_prefix=None if in_replica else "/")
        print(f"serving on http://{settings.host}:{settings.http_port} (explorer at /, docs at /docs); "
              f"metrics on :{settings.metrics_port}/metrics — Ctrl-C to stop", flush=True)  # fmt: skip
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
