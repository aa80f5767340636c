"""The driver's calls to our application (``service.hosting.cluster``)."""

from __future__ import annotations

import inspect

import pytest
from ray.serve._private.replica_result import ActorReplicaResult
from ray.serve.handle import DeploymentResponse


def test_the_wait_for_ray_serves_readiness_callback_still_has_its_attributes() -> None:
    """``answer`` waits until Ray Serve's readiness callback has advanced a unary call's stream (a
    ``ray.shutdown`` before it logs an ERROR and a traceback, as the stop test saw), and finds that
    moment through two private attributes; without them it would not wait at all. A Ray upgrade
    that renames them fails here, not as a rare error line while stopping."""
    assert "self._replica_result = None" in inspect.getsource(DeploymentResponse.__init__).replace(
        ": Optional[ReplicaResult]", ""
    )
    result_source = inspect.getsource(ActorReplicaResult)
    assert "self._cancel_consume_wait = _consume_generator_ref_when_ready(self)" in result_source
    assert "replica_result._cancel_consume_wait = None" in inspect.getsource(
        inspect.getmodule(ActorReplicaResult)
    )


def test_a_bracketed_ipv6_address_is_reached() -> None:
    """``[::1]:6379`` was refused as "no Ray head answers" (the brackets went to the socket)."""
    import socket

    from service.hosting.cluster import unreachable

    try:
        server = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with server:
        port = server.getsockname()[1]
        assert unreachable(f"[::1]:{port}") is None
    assert unreachable(f"[::1]:{port}") is not None  # closed now: said so
