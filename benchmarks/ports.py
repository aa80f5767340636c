"""Free loopback ports for the servers the benchmarks and the tests start, outside the ranges
Ray's processes take theirs from."""

from __future__ import annotations

import contextlib
import random
import socket

from service.settings import DIRECT_PORTS

#: where our servers' ports come from: above Ray's worker ports (10002–19999) and below the
#: kernel's ephemeral range (32768+), from which Ray's own processes keep taking ports — a port
#: the kernel handed us as free could be taken by one of them before our server binds it
PORTS = range(20000, 32768)


def free_port() -> int:
    for _ in range(1000):
        port = random.choice(PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {PORTS}")


def free_port_block(n: int) -> int:
    """A port p with p … p+n-1 free (ray-direct's replicas take the ports above the proxy's)."""
    for _ in range(100):
        base = free_port()
        if base + n > 65535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for p in range(base, base + n):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no block of {n} free ports")


def service_ports() -> tuple[int, int, int]:
    """Free loopback ports for a service's HTTP, gRPC and metrics, each with the
    ``DIRECT_PORTS`` above it free too: ray-direct's ingress listens there, and the settings refuse
    ports inside those ranges."""
    gap = DIRECT_PORTS + 1
    base = free_port_block(3 * gap)
    return base, base + gap, base + 2 * gap
