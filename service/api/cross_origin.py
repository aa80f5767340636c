"""Cross-site request forgery: a web page on another site can make its visitor's browser POST to
a service on their machine or network (``127.0.0.1:8000``, no token by default) without asking
— a form, or ``fetch`` in ``no-cors`` mode, with a body of JSON and no Content-Type, which
tritonclient sends too, so the media type cannot tell them apart. It cannot read the answer, but
it can make the models compute (64 texts at beam 8, every layer's attention) as often as it likes.

What a browser says about every request decides, as Go's ``http.CrossOriginProtection`` does:
a POST (any method but GET, HEAD, OPTIONS) whose ``Sec-Fetch-Site`` is not ``same-origin`` or
``none`` (typed or bookmarked) is refused; from a browser without that header (before 2023), one
whose ``Origin`` names another host than its ``Host``. Clients that are not browsers (curl,
tritonclient, SDKs) send neither and pass. The service answers no CORS preflight, so a page on
another origin could not have used its answers anyway; the explorer page is same-origin.
"""

from __future__ import annotations

from starlette.types import Scope

from service.errors import CrossOrigin

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SAME = frozenset({b"same-origin", b"none"})


def check(scope: Scope) -> None:
    """Raise :class:`CrossOrigin` for a browser's unsafe request from another site's page."""
    if scope["method"] in SAFE_METHODS:
        return
    site = origin = host = None
    for name, value in scope["headers"]:
        if name == b"sec-fetch-site":
            site = value
        elif name == b"origin":
            origin = value
        elif name == b"host":
            host = value
    if site is not None:
        if site.lower() not in SAME:
            raise CrossOrigin(
                f"sec-fetch-site: a {site.decode('latin-1')} request from a browser is refused (a page "
                "of another site cannot make its visitors use this service); send it from this "
                "service's own page, or from a client that is not a browser"
            )
        return
    if origin is not None and (host is None or origin.split(b"://", 1)[-1].lower() != host.lower()):
        raise CrossOrigin(
            f"origin: a request from a page of {origin.decode('latin-1')!r} is refused (not this "
            "service's own host); send it from a client that is not a browser"
        )
