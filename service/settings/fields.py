"""Checks of single settings fields that pydantic's types do not express: a Ray address that names
a cluster, an address to listen on, a web origin, a usable bearer token. Each raises ValueError
with a message that names what to give instead (never the value of a secret)."""

from __future__ import annotations

from pydantic import SecretStr


def a_cluster(address: str | None) -> str | None:
    """``auto``, ``host:port`` or ``ray://…``: Ray reads "local" as "start a private Ray", which
    this service then took for a cluster joined (no CPUs given, metrics on Ray's own port)."""
    if address is not None and (not address.strip() or address.strip().lower() == "local"):
        raise ValueError(
            f"{address!r} names no cluster: leave ATTN_RAY_ADDRESS unset for a private Ray, or give "
            "'auto', host:port or ray://host:port"
        )
    return address


def an_address(host: str) -> str:
    """An address to listen on: empty bound every interface without saying so."""
    if not host or host != host.strip():
        raise ValueError(f"{host!r} is no address to listen on: give 0.0.0.0 for every interface")
    return host


def an_origin(origin: str) -> str:
    """``scheme://host[:port]``, as a browser's ``Origin`` header writes it (lower case)."""
    scheme, sep, rest = origin.lower().partition("://")
    if not sep or scheme not in ("http", "https") or not rest or "/" in rest:
        raise ValueError(f"{origin!r} is no origin: give scheme://host[:port], e.g. https://app.example.com")
    return origin.lower()


def token_is_usable(token: SecretStr | None) -> SecretStr | None:
    """A bearer token a client can send: 16+ characters, each printable ASCII and no space (a
    header value; a browser refuses to send other characters). The message never repeats it."""
    if token is None:
        return None
    value = token.get_secret_value()
    if len(value) < 16:
        example = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        raise ValueError(f"must be at least 16 characters, not {len(value)} (make one: {example})")
    if not all("!" <= c <= "~" for c in value):
        raise ValueError("must be printable ASCII without spaces (it travels in an HTTP header)")
    return token
