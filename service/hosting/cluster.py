"""Joining a Ray cluster started with ``ray start`` (``ATTN_RAY_ADDRESS``): whether a head answers,
the token authentication the head expects, and whether the cluster already serves our
application — what ``python -m service`` checks before it deploys there; and the driver's own calls
to our application there (asking it, deleting it)."""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.settings import Settings

APP = "attention"
AUTH_HINT = (
    " — if the cluster uses token authentication (Ray 2.60's `ray start --head` turns it on where "
    "a token exists), this process needs its token: RAY_AUTH_MODE=token with RAY_AUTH_TOKEN, or the "
    "head's ~/.ray/auth_token (`ray get-auth-token` on the head prints it)"
)


def token_auth_as_ray_start_does(address: str) -> None:
    """``ray start --head`` turns token authentication on where a token exists and RAY_AUTH_MODE
    is unset; ``ray.init`` with an explicit address never does, so a driver beside such a head
    sent no token and, after 20 s of retries, Ray said only "Failed to connect". For a head on
    this machine (an address of this machine; ``auto`` is Ray's own case) the driver takes the
    head's rule; a remote head is never sent this machine's token unasked (it may be another
    cluster's): set RAY_AUTH_MODE=token for it. A Ray without token authentication: nothing to do."""
    if "RAY_AUTH_MODE" in os.environ or address == "auto" or not on_this_machine(address):
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def on_this_machine(address: str) -> bool:
    """Whether a ``host:port`` Ray address names this machine: loopback, or one of its addresses."""
    import psutil

    host = address.rpartition(":")[0].strip("[]")
    if "://" in address or not host:
        return False
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    mine = {a.address.split("%")[0] for nic in psutil.net_if_addrs().values() for a in nic}
    return all(ipaddress_is_loopback(str(ip)) or ip in mine for ip in resolved)


def app_already_served(settings: Settings) -> str | None:
    """Why a cluster we joined cannot take our app: it serves one of the same name already
    (another ``python -m service``, ``serve run``, KubeRay), which deploying would replace and our
    stop would delete. An app still being deleted (a stop just before this start) is waited for."""
    from ray import serve

    deadline = time.monotonic() + settings.unready_s + settings.drain_s + 15
    while (app := serve.status().applications.get(APP)) is not None:
        status = str(getattr(app.status, "value", app.status))
        if status != "DELETING" or time.monotonic() > deadline:
            return (
                f"this cluster already serves an application named {APP!r} ({status}; another "
                "attention-serve?), which this start would replace and its stop delete. Stop that one "
                f"first (Ctrl-C where it runs), or delete it: {delete_command(settings.ray_address)}"
            )
        time.sleep(0.5)
    return None


def delete_command(address: str | None) -> str:
    """The command that deletes our app from the cluster at ``address`` (``serve delete`` needs
    the head's dashboard, which the entrypoint's head runs without)."""
    return (
        f"`python -c \"import ray; from ray import serve; ray.init(address='{address}'); "
        f"serve.delete('{APP}')\"`"
    )


def ipaddress_is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def unreachable(address: str) -> str | None:
    """Why nothing answers at a ``host:port`` Ray address (its GCS), or None (it answers, or the
    address is another form — ``auto``, ``ray://`` — that ray.init resolves and reports itself)."""
    host, _, port = address.rpartition(":")
    if "://" in address or not port.isdigit():
        return None
    try:  # an IPv6 address comes in brackets ("[::1]:6379"), which a socket does not take
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=5):
            return None
    except OSError as exc:
        return (
            f"no Ray head answers at {host}:{port} ({exc.strerror or exc}); start one with `ray start --head`"
        )


def answer(response: Any, within_s: float) -> Any:
    """A driver's handle call's answer, once Ray Serve is done with the call. Ray Serve (2.60)
    takes a unary call's answer from a stream and, in a readiness callback on another thread,
    advances the stream once more after the answer is ready: a ``ray.shutdown`` that comes before
    that callback logs ``ERROR ... failed to consume generator ref after _on_ready`` and a
    traceback. The callback clears the result's ``_cancel_consume_wait``; this waits for that, half
    a second at most (a Ray without the attribute: no wait). Best effort: the attribute is cleared
    as the callback starts, so a shutdown can still fall inside it (a window of microseconds, not
    the milliseconds before it runs); and where Ray ran the callback at once, before the attribute
    was stored, it stays set and this waits the whole half second."""
    result = response.result(timeout_s=within_s)
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        replica_result = getattr(response, "_replica_result", None)
        if getattr(replica_result, "_cancel_consume_wait", None) is None:
            break
        time.sleep(0.005)
    return result


def delete_app(within_s: float) -> bool:
    """Delete our application and wait up to ``within_s`` for it to go (its replicas drain
    meanwhile); whether it went. ``serve.delete``'s own wait gives up after 60 s, and Ray was then
    shut down under replicas still draining, where ``drain_s`` allows 600."""
    from ray import serve

    serve.delete(APP, _blocking=False)
    deadline = time.monotonic() + within_s
    while APP in serve.status().applications:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
