"""A page of another site cannot make its visitor's browser use the service
(``service/api/cross_origin.py``): a browser's POST says where it comes from (``Sec-Fetch-Site``,
or ``Origin`` before 2023) and one from another site is refused 403 on every route — REST,
KServe v2 with no Content-Type (what ``fetch`` in ``no-cors`` mode sends, and tritonclient too);
same-origin pages (the explorer), typed URLs and clients that are not browsers pass."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from service.api.http import create_app
from tests.service.api.test_rest import call
from tests.service.fakes import fake_server

TRANSLATE = "/v1/models/fake-translator/translate"
V2 = "/v2/models/fake-translator/infer"
V2_BODY = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["abc"]}]}


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 200),  # curl, tritonclient, SDKs
        ({"sec-fetch-site": "same-origin", "origin": "http://127.0.0.1:8000"}, 200),  # the explorer
        ({"sec-fetch-site": "none"}, 200),  # typed in the address bar
        ({"sec-fetch-site": "cross-site", "origin": "https://evil.example"}, 403),
        ({"sec-fetch-site": "same-site", "origin": "http://other.localhost:8000"}, 403),
        ({"sec-fetch-site": "Cross-Site"}, 403),
        # a browser from before Sec-Fetch-Site: its Origin against the Host it asked
        ({"origin": "http://127.0.0.1:8000", "host": "127.0.0.1:8000"}, 200),
        ({"origin": "https://evil.example", "host": "127.0.0.1:8000"}, 403),
        ({"origin": "null", "host": "127.0.0.1:8000"}, 403),  # a sandboxed page, a data: URL
        # the same host however written: case, a default port, IPv6
        ({"origin": "HTTP://Example.COM", "host": "example.com:80"}, 200),
        ({"origin": "https://example.com:443", "host": "example.com"}, 200),
        ({"origin": "http://[::1]:8000", "host": "[::1]:8000"}, 200),
        ({"origin": "http://example.com:8080", "host": "example.com:80"}, 403),
        # behind a proxy that rewrites Host (nginx's default) but says the one asked for
        ({"origin": "http://models.lan", "host": "backend:8000", "x-forwarded-host": "models.lan"}, 200),
        # a page elsewhere the operator trusts (ATTN_TRUSTED_ORIGINS)
        ({"sec-fetch-site": "cross-site", "origin": "https://app.example.com"}, 200),
        ({"origin": "https://app.example.com", "host": "backend:8000"}, 200),
    ],
)
def test_a_browser_s_post_from_another_site_is_refused(tmp_path: Path, headers: dict, status: int) -> None:
    server, translator, _, _ = fake_server(tmp_path, trusted_origins=["https://app.example.com"])
    app = create_app(server)
    rest = call(app, "POST", TRANSLATE, json.dumps({"text": "abc"}).encode(), headers)
    v2 = call(app, "POST", V2, json.dumps(V2_BODY).encode(), headers)  # no Content-Type, as tritonclient
    for got, _, content in (rest, v2):
        assert got == status, content
        if status == 403:
            message = json.loads(content)["error"]
            assert message.startswith(("sec-fetch-site:", "origin:")) and "refused" in message
    assert len(translator.jobs) == (2 if status == 200 else 0)  # refused before any work


def test_a_trusted_origin_is_an_origin() -> None:
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match="is no origin"):
        Settings(repository=Path("."), trusted_origins=["app.example.com"])
    assert Settings(repository=Path("."), trusted_origins=["HTTPS://App.example.com"]).trusted_origins == [
        "https://app.example.com"
    ]


def test_reading_is_not_refused(tmp_path: Path) -> None:
    """GET and HEAD change nothing (and without CORS headers the page cannot read the answer)."""
    app: Any = create_app(fake_server(tmp_path)[0])
    got, _, _ = call(app, "GET", "/v1/models", headers={"sec-fetch-site": "cross-site"})
    assert got == 200
