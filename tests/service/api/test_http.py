"""What the HTTP app (``service/api/http.py``) does for every route, on the running service:
HEAD answered as GET, and the router's slash redirects naming no host."""

from __future__ import annotations

import pytest
import requests

from tests.conftest import Service

pytestmark = pytest.mark.slow


def test_head_is_answered_as_get_without_the_body(service: Service) -> None:
    """Balancers and uptime checkers probe with HEAD: the GET routes answer it (the head alone,
    with the GET's length); a POST route says HEAD is not allowed, and which method is."""
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/v1/models", "/"):
        got = service.get(path)
        head = requests.head(service.url + path, timeout=30)
        assert (head.status_code, head.content) == (200, b""), path
        assert head.headers["content-length"] == got.headers["content-length"] == str(len(got.content)), path
        assert head.headers["content-type"] == got.headers["content-type"], path
    refused = requests.head(service.url + "/v1/models/dates-bahdanau/translate", timeout=30)
    assert (refused.status_code, refused.headers["allow"]) == (405, "POST")
    assert service.get("/healthz").json() == {"status": "live"}  # the connection pool is fine after


def test_a_trailing_slash_is_redirected_by_path_whatever_the_host_header(service: Service) -> None:
    """The redirects to the route without the slash (and to the static files' mount with one)
    name no host (it came from the request's ``Host``, which any client sets), and a client
    following them is answered."""
    redirects = (
        ("/v1/models/", "/v1/models", 200),
        ("/v2/health/ready/?x=1", "/v2/health/ready?x=1", 200),
        ("/static", "/static/", 404),
    )  # fmt: skip  (the mount: its files, no index)
    for path, location, followed in redirects:
        moved = requests.get(
            service.url + path, headers={"Host": "evil.example:666"}, allow_redirects=False, timeout=30
        )
        assert (moved.status_code, moved.headers["location"]) == (307, location), path
        assert requests.get(service.url + path, timeout=30).status_code == followed, path
