"""Cross-site request forgery: a web page on another site can make its visitor's browser POST to
a service on their machine or network (``127.0.0.1:8000``, no token by default) without asking
— a form, or ``fetch`` in ``no-cors`` mode, with a body of JSON and no Content-Type, which
tritonclient sends too, so the media type cannot tell them apart. It cannot read the answer, but
it can make the models compute (64 texts at beam 8, every layer's attention) as often as it likes.

What a browser says about every request decides, as Go's ``http.CrossOriginProtection`` does:
a POST (any method but GET, HEAD, OPTIONS) whose ``Sec-Fetch-Site`` is not ``same-origin`` or
``none`` (typed or bookmarked) is refused; where a browser sends no such header (before 2023, or
to a plain-HTTP address that is not localhost), one whose ``Origin`` names another host than the
``Host`` it asked (or than ``X-Forwarded-Host``, which a proxy sets and a page cannot without a
preflight this service never answers). Origins in ``ATTN_TRUSTED_ORIGINS`` pass: a page served
elsewhere, or a proxy that rewrites ``Host``. Clients that are not browsers (curl, tritonclient,
SDKs) send neither header and pass; the explorer page is same-origin.
"""

from __future__ import annotations

from starlette.types import Scope

from service.errors import CrossOrigin

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SAME = frozenset({b"same-origin", b"none"})
DEFAULT_PORTS = {b"http": b":80", b"https": b":443"}


def check(scope: Scope, trusted: frozenset[bytes] = frozenset()) -> None:
    """Raise :class:`CrossOrigin` for a browser's unsafe request from another site's page;
    ``trusted``: origins (lower case, ``scheme://host[:port]``) whose pages may."""
    if scope["method"] in SAFE_METHODS:
        return
    site = origin = None
    hosts: list[bytes] = []
    for name, value in scope["headers"]:
        if name == b"sec-fetch-site":
            site = value.lower()
        elif name == b"origin":
            origin = value.lower()
        elif name in (b"host", b"x-forwarded-host"):
            hosts.append(value.split(b",")[0].strip().lower())
    if origin is not None and origin in trusted:
        return
    if site is not None:
        if site not in SAME:
            raise CrossOrigin(
                f"sec-fetch-site: a {site.decode('latin-1')} request from a browser is refused (a page "
                "of another site cannot make its visitors use this service; ATTN_TRUSTED_ORIGINS "
                "names pages that may); send it from this service's own page, or from a client "
                "that is not a browser"
            )
        return
    if origin is not None and _host_of(origin) not in {_without_default_port(h) for h in hosts}:
        raise CrossOrigin(
            f"origin: a request from a page of {origin.decode('latin-1')!r} is refused (not this "
            "service's own host; ATTN_TRUSTED_ORIGINS names pages that may); send it from a client "
            "that is not a browser"
        )


def _host_of(origin: bytes) -> bytes:
    """``host[:port]`` of an origin, without its scheme's default port ("null" stays itself)."""
    scheme, sep, host = origin.partition(b"://")
    if not sep:
        return origin
    return _without_default_port(host, [DEFAULT_PORTS[scheme]] if scheme in DEFAULT_PORTS else [])


def _without_default_port(host: bytes, defaults: list[bytes] | None = None) -> bytes:
    """``host`` without a default port (``defaults``, else ``:80`` and ``:443``: a Host header has
    no scheme to say which): ``example.com:80`` and ``[::1]:80`` are ``example.com`` and
    ``[::1]``; ``example.com:8080`` and ``[::1]`` (its colons are no port) stay."""
    name, colon, port = host.rpartition(b":")
    ports = defaults if defaults is not None else list(DEFAULT_PORTS.values())
    if colon and port.isdigit() and not name.endswith(b":") and b":" + port in ports:
        return name
    return host
