"""``python -m service``: start a local Ray, deploy the application, serve until interrupted."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from service.hosting import gpus
from service.hosting.cluster import (
    APP,
    AUTH_HINT,
    answer,
    app_already_served,
    delete_app,
    delete_command,
    ipaddress_is_loopback,
    token_auth_as_ray_start_does,
    unreachable,
)

if TYPE_CHECKING:
    from service.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("--repository", type=Path, help="model repository (ATTN_REPOSITORY)")
    parser.add_argument("--host", help="bind address (ATTN_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (ATTN_HTTP_PORT, default 8000)")
    parser.add_argument(
        "--ray-environment", action="store_true",
        help="print what Ray's processes must find in their environment for these settings, as shell "
        "`export` lines, and exit (for a Ray started before the service: deploy/entrypoint.sh)",
    )  # fmt: skip
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
        print(f"error: bad settings:\n{settings_errors(exc)}", file=sys.stderr)
        return 2
    if args.ray_environment:
        for key, value in ray_processes_environment(settings).items():
            print(f"export {key}={shlex.quote(value)}")
        return 0
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.use_gpu and settings.ray_address is None and (why := gpus.no_local_gpu()):
        settings = gpus.on_the_cpu(settings, why)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_worker_niceness", "0")
    os.environ.update(ray_processes_environment(settings))  # before Ray starts: its processes read them

    from service.hosting.app import NoModels, build_app

    busy = ports_in_use(settings)
    if busy:
        print(f"error: {busy}", file=sys.stderr)
        return 2
    try:
        app = build_app(settings)  # validates the repository before Ray starts
    except NoModels as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if why := placement_refusal(settings):
        print(f"error: {why}", file=sys.stderr)
        return 2
    return serve_until_stopped(settings, app)


def serve_until_stopped(settings: Settings, app: Any) -> int:
    """Start Ray (:func:`start_ray`), deploy ``app`` (:func:`deploy`) and serve until SIGINT or
    SIGTERM; then stop what this process started. 2 (after one ``error:`` line) when it cannot
    start, 0 otherwise."""
    stop, serving, in_ray_init = threading.Event(), threading.Event(), threading.Event()
    ours = False

    def on_signal(*_: object) -> None:
        again = stop.is_set()
        stop.set()
        # still starting: interrupt it, and `finally` stops what has started — except inside
        # ray.init, where an interrupt left half-started Ray processes running on (they held the
        # metrics port for a minute): there the stop waits until ray.init returns, unless asked
        # twice (a ray.init that hangs)
        if not serving.is_set() and (not in_ray_init.is_set() or again):
            raise KeyboardInterrupt

    def refused(why: str) -> int:
        serving.set()  # from here a signal only asks again: the stop in `finally` runs whole
        print(f"error: {why}", file=sys.stderr)
        return 2

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        in_ray_init.set()
        with our_sigterm_handler_through_ray_init():
            if why := start_ray(settings):
                return refused(why)
        in_ray_init.clear()
        for sig in (signal.SIGINT, signal.SIGTERM):  # ours again: ray.init installs its own
            signal.signal(sig, on_signal)
        if stop.is_set():  # a signal came during ray.init
            raise KeyboardInterrupt
        if why := start_serve(settings):
            return refused(why)  # and the other's app is left alone: not ours to stop
        ours = True  # from here on, the app named "attention" on this Ray is this process's
        if why := deploy(settings, app):
            return refused(why)
        serving.set()
        announce(settings)
        stop.wait()
    except (KeyboardInterrupt, SystemExit) as exc:
        # SystemExit: ray.init's own SIGTERM handler, should it be installed after all
        # (our_sigterm_handler_through_ray_init); stop_serving ends what ray.init started
        if isinstance(exc, SystemExit) and not in_ray_init.is_set():
            raise
        print("interrupted while starting; stopping", file=sys.stderr, flush=True)
    finally:
        serving.set()  # a signal now only asks again: the stop below is bounded, and runs whole
        stop_serving(settings, ours)
    return 0


def start_ray(settings: Settings) -> str | None:
    """A private Ray for this process (stopped with it), or the cluster ``ATTN_RAY_ADDRESS`` names;
    why not, if it cannot be joined."""
    import ray

    if settings.ray_address is None:
        ray.init(
            address="local", num_cpus=settings.num_cpus or os.cpu_count(), include_dashboard=False,
            _metrics_export_port=settings.metrics_port, logging_level=logging.WARNING,
        )  # fmt: skip
        return None
    # a cluster started with `ray start`: its nodes export metrics on their own ports
    token_auth_as_ray_start_does(settings.ray_address)
    try:
        ray.init(address=settings.ray_address, logging_level=logging.WARNING)
    except ValueError as exc:  # an address Ray cannot read ("foo")
        return f"ATTN_RAY_ADDRESS={settings.ray_address}: {exc}"
    except ConnectionError as exc:  # "auto" with no cluster running here, a token missing
        hint = AUTH_HINT if settings.ray_address != "auto" else ""
        return f"ATTN_RAY_ADDRESS={settings.ray_address}: {exc}{hint}"
    return None


def start_serve(settings: Settings) -> str | None:
    """Ray Serve on this Ray (no Ray proxy for the in-replica frontend: the replicas listen);
    why not, if a cluster already serves an app of this name (another service's)."""
    from ray import serve

    from service.api.grpc_servicer import SERVICER_FUNCTIONS

    serve.start(
        proxy_location="Disabled" if settings.frontend == "in-replica" else settings.proxy_location,
        logging_config=settings.serve_logging,
        http_options={"host": settings.host, "port": settings.http_port},
        grpc_options={"port": settings.grpc_port, "grpc_servicer_functions": SERVICER_FUNCTIONS},
    )
    if settings.ray_address is not None and (why := app_already_served(settings)):
        return f"ATTN_RAY_ADDRESS={settings.ray_address}: {why}"
    return None


def deploy(settings: Settings, app: Any) -> str | None:
    """Run ``app`` as this Ray's app :data:`APP`; why not, if no replica could start (every model
    refused to load: their reasons are in the log)."""
    from ray import serve

    try:
        serve.run(app, name=APP, route_prefix=None if settings.frontend == "in-replica" else "/")
    except Exception as exc:  # RuntimeError, or Ray Serve's own (a route another app holds)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"the replicas could not start ({first}); their reasons are logged above"
    if settings.frontend != "in-replica":  # a model deployment none of whose versions loads
        # stays up serving nothing (ModelDeployment): the ingress leaves it out, as an in-replica
        # replica leaves such a model out; a start where every model is left out is refused
        try:
            served, rejected = answer(serve.get_app_handle(APP).served.remote(), 60)
        except Exception as exc:  # the ingress did not answer in time
            return f"the ingress did not say which models it serves ({type(exc).__name__}: {exc})"
        if not served:
            why = f"no model could be loaded: {rejected}"
            return f"the replicas could not start ({why}); their reasons are logged above"
    return None


def announce(settings: Settings) -> None:
    """Where the service answers (and a warning where Ray's gRPC proxy listens wider than asked)."""
    warn = settings.frontend != "in-replica" and settings.api_token is None
    if warn and ipaddress_is_loopback(settings.host):
        logging.getLogger("service").warning(
            "gRPC listens on every interface (port %d and up): Ray's gRPC proxy takes no host, "
            "unlike ATTN_HOST=%s; set ATTN_API_TOKEN or firewall it", settings.grpc_port, settings.host,
        )  # fmt: skip
    host = f"[{settings.host}]" if ":" in settings.host else settings.host  # an IPv6 address
    print(f"serving on http://{host}:{settings.http_port} (explorer at /, docs at /docs); "
          f"metrics on :{settings.metrics_port}/metrics — Ctrl-C to stop", flush=True)  # fmt: skip


def placement_refusal(settings: Settings) -> str | None:
    """Why the replicas could never be placed, said before Ray starts (None: they can be): on a
    cluster, an address where nothing answers (ray.init would retry for good, deaf to the first
    Ctrl-C); on the private Ray, :func:`service.hosting.app.private_ray_refusal`. What autoscaling
    could never reach there is logged as a warning."""
    from service.hosting.app import private_ray_refusal, private_ray_warning

    if settings.ray_address is not None:
        why = unreachable(settings.ray_address)
        return f"ATTN_RAY_ADDRESS={settings.ray_address}: {why}" if why else None
    cpus = settings.num_cpus or os.cpu_count() or 1
    if refusal := private_ray_refusal(settings, cpus, gpus.local_gpus() if settings.use_gpu else 0):
        return refusal
    if warning := private_ray_warning(settings, cpus):
        logging.getLogger("service").warning("%s", warning)
    return None


def settings_errors(exc: ValidationError) -> str:
    """Each refused setting by its environment variable, with pydantic's reason — never the value:
    pydantic's own text repeats the input, and the whole input (the API token included) for a
    check across settings."""
    lines = []
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        where = (
            "ATTN_" + "__".join(str(part) for part in error["loc"]).upper() if error["loc"] else "settings"
        )
        lines.append(f"  {where}: {error['msg']}")
    return "\n".join(lines)


def ray_processes_environment(settings: Settings) -> dict[str, str]:
    """What every Ray process must see when it starts: the gRPC proxy's message limits, Ray's
    metrics export and the frontend's switches (``Settings.ray_environment``)."""
    from service.api.grpc_parsing import VALUE_BYTES_VARIABLE

    grpc = {
        "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(settings.grpc_max_message_bytes),
        VALUE_BYTES_VARIABLE: str(settings.limits.max_grpc_value_bytes),  # read by grpc_parsing
    }
    return {**grpc, **settings.ray_environment()}


def stop_serving(settings: Settings, ours: bool = True) -> None:
    """Stop what we started, within ``unready_s`` + ``drain_s`` + a few seconds: our
    application's replicas drain (``ServingReplica.__del__``; the Ray-ingress frontends'
    ``IngressReplica.drain``), then the driver leaves Ray — and our private Ray stops with it.
    On a cluster we joined (a container's own head, a shared cluster), only our application goes:
    Serve's detached controller and proxies belong to the cluster. ``ours``: whether this process
    deployed the app (not when it found another's and refused to start)."""
    import ray
    from ray import serve

    log = logging.getLogger("service")
    if not ray.is_initialized():  # stopped before Ray was up (serve.delete would start a Ray)
        stop_what_ray_init_started()
        return
    if not ours:  # another's app, or none deployed: nothing of ours to drain or delete
        ray.shutdown()
        return
    if settings.frontend == "in-replica":
        started = time.monotonic()
        with contextlib.suppress(Exception):  # nothing deployed yet: nothing to drain
            delete_app(settings.unready_s + settings.drain_s + 5)
        log.info("stopping: the replicas drained and left in %.1f s", time.monotonic() - started)
    else:
        # Ray's proxy answers a deleted app's routes with a plain-text 404 until it stops itself:
        # the ingress drains first (new requests 503, those in flight answered); then our private
        # Ray stops whole, its proxy with it (new connections are refused), with nothing left in
        # flight for a delete to wait for. On a cluster we joined, only our app goes.
        started = time.monotonic()
        with contextlib.suppress(Exception):  # nothing deployed yet: nothing to drain
            answer(serve.get_app_handle(APP).drain.remote(), settings.drain_s + 5)
        log.info("stopping: the ingress drained in %.1f s", time.monotonic() - started)
        if settings.ray_address is not None:
            try:
                if not delete_app(settings.unready_s + settings.drain_s + 5):
                    raise TimeoutError(f"still there after {settings.unready_s + settings.drain_s + 5:.0f} s")
            except Exception as exc:  # its ingress drained: it answers 503 "stopping" until deleted
                log.warning(
                    "the app %r was not deleted from the cluster (%s); delete it with %s",
                    APP,
                    exc,
                    delete_command(settings.ray_address),
                )
    started = time.monotonic()
    ray.shutdown()
    log.info("stopping: Ray stopped in %.1f s", time.monotonic() - started)


@contextlib.contextmanager
def our_sigterm_handler_through_ray_init() -> Iterator[None]:
    """ray.init first replaces the SIGTERM handler with one that exits at once: a SIGTERM during
    the start (what Docker and Kubernetes send) stopped ray.init part-way and left its raylet's
    agents running, holding the metrics port. Ours stays instead and defers the stop until
    ray.init returns, as for SIGINT. Ray installs its handler through
    ``ray._private.utils.set_sigterm_handler``; should that move, Ray's handler applies and
    :func:`stop_what_ray_init_started` cleans up after it."""
    import ray._private.utils as ray_utils

    real = getattr(ray_utils, "set_sigterm_handler", None)
    if real is None:
        yield
        return
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = real


def stop_what_ray_init_started() -> None:
    """A ray.init stopped part-way (a SIGTERM lands in Ray's own handler, which exits): shut down
    what it started of a node, then end any of those processes that outlived it — the raylet's
    agents were left running for a minute, holding the metrics port. Only this process's own
    descendants, by PID."""
    import psutil
    import ray

    started = psutil.Process().children(recursive=True)
    ray.shutdown()
    _, alive = psutil.wait_procs(started, timeout=5)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=5)


def ports_in_use(settings: Settings) -> str | None:
    """Which configured port another process already listens on, if any. Replicas share their
    port with SO_REUSEPORT, so a second service would otherwise join the first one's port and
    split its traffic; this probe binds without it (SO_REUSEADDR only: a port with connections
    in TIME_WAIT is free) and fails on any listener."""
    ports = [("HTTP", settings.http_port), ("gRPC", settings.grpc_port)]
    if settings.ray_address is None:  # our own Ray exports metrics here
        ports.append(("metrics", settings.metrics_port))
    for what, port in ports:
        host = settings.host if what != "metrics" else "0.0.0.0"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return (
                        f"the {what} port {host}:{port} is taken ({exc.strerror}); is another service "
                        "running? (ports: ATTN_HTTP_PORT, ATTN_GRPC_PORT, ATTN_METRICS_PORT)"
                    )
                why = exc.strerror or exc
                return f"cannot listen on {host}:{port} ({why}): is ATTN_HOST an address of this machine?"
    return None


if __name__ == "__main__":
    sys.exit(main())
