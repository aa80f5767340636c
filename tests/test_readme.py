"""The README's Python clients run as written — only the address changes — against the service:
a snippet that no longer runs (a renamed field, a missing package) fails here, not for a reader."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from tests.conftest import Service

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(marker: str) -> str:
    """The README's one ``python`` block that contains ``marker``."""
    [block] = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if marker in b]
    return block


def run(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {})
    return out.getvalue()


def test_the_streaming_http_client(service: Service) -> None:
    code = snippet("httpx.stream").replace("http://127.0.0.1:8000", service.url)
    assert service.url in code
    out = run(code)
    tokens, answer = out.rsplit("\n", 1)[0].split("\n")
    assert re.fullmatch(r"([01] '[^']*' \| )+", tokens), tokens  # text index and piece per token
    assert tokens.count("0 '' |") == tokens.count("1 '' |") == 1  # each text's "</s>" adds ""
    texts, first_token_ms = answer.strip().rsplit(" ", 1)
    assert re.fullmatch(r"\['[^']*', '[^']*'\]", texts) and float(first_token_ms) > 0


def test_the_streaming_grpc_client(service: Service) -> None:
    code = snippet("TranslateStream").replace('"127.0.0.1:9000"', f'"{service.grpc_target}"')
    assert service.grpc_target in code
    pieces, answer = run(code).split(" → ")
    text, first_token_ms = answer.split()
    assert pieces == text and float(first_token_ms) > 0  # the tokens spell the answer's text
