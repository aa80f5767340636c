"""The server every protocol shares, without Ray: model lookup that never touches the file system,
deadlines, a client gone (499), request metrics per status, and an atomic swap of the served set."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from service.errors import DeadlineExceeded, ModelNotFound, WrongTask
from service.inference.jobs import TranslateJob
from tests.service.fakes import fake_server


def test_lookup_by_name_task_and_version(tmp_path: Path) -> None:
    server = fake_server(tmp_path)[0]
    assert server.resolve("fake-translator", "translation", "1").name == "fake-translator"
    for name in ("../fake-translator", "fake-translator/../x", "%2e%2e"):
        with pytest.raises(ModelNotFound):
            server.resolve(name)
    with pytest.raises(ModelNotFound, match="no version '2'"):
        server.resolve("fake-translator", None, "2")
    with pytest.raises(WrongTask):
        server.resolve("fake-classifier", "translation")


def test_deadline_and_metrics(tmp_path: Path) -> None:
    server, translator, _, recorded = fake_server(tmp_path, limits={"request_timeout_s": 0.05})
    job = TranslateJob(texts=["ab"])

    async def go() -> None:
        entry, [answer], _ = await server.predict_many("fake-translator", "translation", "t", [job])
        assert entry.name == answer.model == "fake-translator"
        translator.delay_s = 1.0
        with pytest.raises(DeadlineExceeded):
            await server.predict_many("fake-translator", "translation", "t", [job])
        with pytest.raises(ModelNotFound):
            await server.predict_many("nope", "translation", "t", [job])
        task = asyncio.create_task(server.predict_many("fake-translator", "translation", "t", [job]))
        await asyncio.sleep(0.01)
        task.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert [r[2] for r in recorded.records] == [200, 504, 404, 499]
    assert recorded.records[2][0] == "_unknown"  # no label per unknown name: a fixed label set


def test_many_requests_go_concurrently(tmp_path: Path) -> None:
    server, translator, _, _ = fake_server(tmp_path)
    translator.delay_s = 0.2
    jobs: list[Any] = [TranslateJob(texts=[str(i)]) for i in range(10)]

    async def go() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        _, answers, _ = await server.predict_many("fake-translator", None, "t", jobs)
        assert [a.result.translations[0].text for a in answers] == [str(i) for i in range(10)]
        return loop.time() - start

    assert asyncio.run(go()) < 1.0  # not 10 × 0.2 s


def test_serve_swaps_the_whole_set_at_once(tmp_path: Path) -> None:
    server = fake_server(tmp_path)[0]
    server.model_info = {"fake-translator": {"warmup_ms": 1.0}}
    server.serve({}, {}, {"x/2": "why"})
    assert server.models == {} and server.entries == {} and server.model_info == {}
    assert server.rejected == {"x/2": "why"}
