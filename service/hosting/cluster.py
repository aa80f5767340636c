"""Joining a Ray cluster started with ``ray start`` (``ATTN_RAY_ADDRESS``): whether a head answers,
the token authentication the head expects, and whether the cluster already serves our
application — what ``python -m service`` checks before it deploys there."""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from typing import TYPE_CHECKING

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

    deadline = time.monotonic() + settings.drain_s + 15
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
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            return None
    except OSError as exc:
        return (
            f"no Ray head answers at {host}:{port} ({exc.strerror or exc}); start one with `ray start --head`"
        )
