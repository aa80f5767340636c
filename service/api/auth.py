"""The optional bearer token: one check for HTTP (an ASGI middleware) and gRPC (metadata).

Off unless ``ATTN_API_TOKEN`` is set. Health endpoints stay open so that orchestrators can probe
without the secret; metrics are served by Ray's metrics agent on its own port, outside the app.
Tokens are compared in constant time; the token never appears in logs or answers.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import SecretStr

from service.errors import Unauthorized

#: HTTP paths answered without a token: health, and the explorer page and its files (the page
#: asks for the token and sends it with its API calls)
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/"})
OPEN_PREFIXES = ("/static/",)
#: gRPC methods answered without a token (the KServe v2 health RPCs)
OPEN_METHODS = frozenset({"ServerLive", "ServerReady"})


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def check(token: SecretStr | None, authorization: str | None) -> None:
    """Raise :class:`Unauthorized` unless ``authorization`` is ``Bearer <token>`` (or no token is set)."""
    if token is None:
        return
    if not authorization:
        raise Unauthorized("authorization: a bearer token is required")
    scheme, _, given = authorization.partition(" ")
    expected = token.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
        raise Unauthorized("authorization: the bearer token is not valid")


def check_metadata(token: SecretStr | None, metadata: Iterable[tuple[str, Any]] | None) -> None:
    """The gRPC form: the ``authorization`` metadata entry."""
    if token is None:
        return
    values = [v for k, v in metadata or () if k.lower() == "authorization"]
    check(token, values[0] if values else None)


def header(scope: Mapping[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None
