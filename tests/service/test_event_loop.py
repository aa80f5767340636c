"""The replica's event loop serves every model and protocol: work that takes a request's own CPU
time in proportion to what it asked for runs off it, so other requests are answered meanwhile."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import Service

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stream", [False, True])
def test_heat_maps_are_drawn_while_the_replica_answers_other_requests(service: Service, stream: bool) -> None:
    """64 texts with PNG heat maps, answered whole or as a token stream: the drawing (milliseconds
    a text) runs in a thread, so requests sent meanwhile are answered at once, not after it (on the
    event loop they waited for all 64)."""
    texts = [f"{d} {m} {1950 + d}" for d in range(1, 29) for m in ("janvier", "mars", "mai")][:64]
    heavy = {"text": texts, "return_attention": True, "attention_format": "png", "stream": stream}
    service.post("/v1/models/dates-transformer/translate", json=heavy)  # warm
    with ThreadPoolExecutor(1) as pool:
        began = time.perf_counter()
        answer = pool.submit(service.post, "/v1/models/dates-transformer/translate", json=heavy)
        waits = []
        while not answer.done():
            sent = time.perf_counter()
            assert service.get("/v1/models").status_code == 200
            waits.append(time.perf_counter() - sent)
        if stream:  # the stream's last event: "event: answer\ndata: {...}"
            last = answer.result().text.strip().split("\n\n")[-1]
            assert last.startswith("event: answer\n")
            body = json.loads(last.split("data: ", 1)[1])
        else:
            body = answer.result().json()
    drawing = time.perf_counter() - began - body["metrics"]["total_ms"] / 1000  # after the model answered
    assert len(body["translations"]) == 64 and all(
        "png_base64" in t["attention"] for t in body["translations"]
    )
    assert drawing > 0.1, drawing  # long enough to tell
    assert max(waits) < drawing / 2, (max(waits), drawing)
