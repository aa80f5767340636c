"""The server every protocol shares, without Ray: model lookup that never touches the file system,
deadlines, a client gone (499), request metrics per status, and an atomic swap of the served set."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from service.errors import DeadlineExceeded, ModelNotFound, Overloaded, Stopping, WrongTask
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
    assert server.resolve("fake-translator", None, "01").version == 1  # a number, as Triton reads it
    for version in ("1.0", "²", " 1", "-1", "x", "1" * 4301):  # 4,301 digits: Python's int() raised
        with pytest.raises(ModelNotFound, match="no version"):
            server.resolve("fake-translator", None, version)
    # a client's long name or version is cut in the message (a gRPC status over 16 KiB never
    # reached the client)
    for name, version in (("x" * 100_000, None), ("fake-translator", "9" * 100_000)):
        with pytest.raises(ModelNotFound, match=r"… \(100000 characters\)") as refused:
            server.resolve(name, None, version)
        assert len(str(refused.value)) < 300
    with pytest.raises(
        WrongTask, match="'fake-classifier' is an image-classification model, not translation"
    ):
        server.resolve("fake-classifier", "translation")
    with pytest.raises(WrongTask, match="'fake-translator' is a translation model, not image-classification"):
        server.resolve("fake-translator", "image-classification")


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


def test_a_request_refused_in_part_stops_its_other_parts(tmp_path: Path) -> None:
    """One part of a multi-part request shed (503): the parts still waiting are cancelled, so
    they neither compute nor hold places another request would then be refused."""
    server, translator, _, recorded = fake_server(tmp_path)
    finished: list[str] = []

    async def predict(job: TranslateJob) -> Any:
        if job.texts == ["shed"]:
            raise Overloaded("model 'fake-translator' is overloaded; retry later")
        await asyncio.sleep(0.3)
        finished.append(job.texts[0])

    translator.predict = predict  # type: ignore[method-assign]
    jobs = [TranslateJob(texts=[t]) for t in ("a", "b", "shed", "c")]

    async def go() -> None:
        with pytest.raises(Overloaded):
            await server.predict_many("fake-translator", None, "t", jobs)
        await asyncio.sleep(0.5)

    asyncio.run(go())
    assert finished == [] and [r[2] for r in recorded.records] == [503]


def test_info_asked_of_a_set_a_swap_replaced_stays_with_that_set(tmp_path: Path) -> None:
    """The Ray ingress left out a model whose info call was under way (none of its versions
    loaded): the answer landed in the new set's info, and readiness (a 500 on the missing
    ``warmup_ms``) never came back."""
    server = fake_server(tmp_path)[0]
    slow = server.models["fake-translator"]

    class Slow:
        async def info(self) -> dict[str, Any]:
            await asyncio.sleep(0.1)
            return {"version": None, "rejected": {}}  # a deployment serving nothing

    async def go() -> None:
        server.serve({"fake-translator": Slow()}, dict(server.entries), {})  # type: ignore[dict-item]
        asking = asyncio.create_task(server.load_info())
        await asyncio.sleep(0.02)
        server.serve({"fake-translator": slow}, dict(server.entries), {})  # the swap, meanwhile
        await asking
        assert "version" not in server.model_info.get("fake-translator", {})
        assert await server.is_ready() and "warmup_ms" in server.model_info["fake-translator"]

    asyncio.run(go())


def test_serve_swaps_the_whole_set_at_once(tmp_path: Path) -> None:
    server = fake_server(tmp_path)[0]
    server.model_info = {"fake-translator": {"warmup_ms": 1.0}}
    server.serve({}, {}, {"x/2": "why"})
    assert server.models == {} and server.entries == {} and server.model_info == {}
    assert server.rejected == {"x/2": "why"}
    # no model left (every one refused to load: a Ray-ingress app deployed with `serve run`)
    assert not asyncio.run(server.is_ready()) and server.unready == "not ready: no model loads (see rejected)"


class Trickle:
    """A streaming model that yields an event every ``gap_s``, ``n`` of them, counting the waits
    that were cancelled."""

    def __init__(self, gap_s: float, n: int) -> None:
        self.gap_s, self.n, self.cancelled = gap_s, n, 0

    async def stream(self, job: Any) -> Any:
        for i in range(self.n):
            try:
                await asyncio.sleep(self.gap_s)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            yield i


def test_a_stream_has_one_deadline_for_all_its_waits(tmp_path: Path) -> None:
    """Waits within the deadline go on; the wait pending when it passes ends with 504; a deadline
    that passes while the reader holds an event fails the next wait at once; a reader cancelled
    meanwhile (the client left) is a 499, never a 504."""
    server, _, _, recorded = fake_server(tmp_path, limits={"request_timeout_s": 0.25})
    job = TranslateJob(texts=["ab"])

    async def read(model: Trickle, hold_s: float = 0.0) -> list[int]:
        server.models["fake-translator"] = model  # type: ignore[assignment]
        seen = []
        async for _, event, _ in server.stream("fake-translator", "translation", "s", job):
            seen.append(event)
            await asyncio.sleep(hold_s)  # the reader's own time: never cut by the deadline
        return seen

    async def go() -> None:
        assert await read(Trickle(0.02, 5)) == [0, 1, 2, 3, 4]  # well within: 5 waits, one deadline
        slow = Trickle(0.1, 5)
        with pytest.raises(DeadlineExceeded):
            await read(slow)  # the third wait is pending at 0.25 s
        assert slow.cancelled == 1
        held = Trickle(0.01, 5)
        seen: list[int] = []
        with pytest.raises(DeadlineExceeded):
            server.models["fake-translator"] = held  # type: ignore[assignment]
            async for _, event, _ in server.stream("fake-translator", "translation", "s", job):
                seen.append(event)
                await asyncio.sleep(0.3)  # past the deadline while holding the first event
        assert seen == [0] and held.cancelled == 0  # failed before waiting again, not mid-wait
        task = asyncio.create_task(read(Trickle(1.0, 2)))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()

    asyncio.run(go())
    assert [r[2] for r in recorded.records] == [200, 504, 504, 499]


def test_a_drain_answers_what_is_in_flight_and_refuses_what_comes_after(tmp_path: Path) -> None:
    """``drain`` (the Ray-ingress frontends' first step of a stop): predictions and streams
    begun before it are answered; each one after is refused with ``Stopping`` (503, UNAVAILABLE),
    counted in the metrics; readiness says no, and why; ``drain`` returns once none is in flight,
    or at its timeout with how many are left."""
    server, translator, _, recorded = fake_server(tmp_path)
    translator.delay_s = 0.3
    job = TranslateJob(texts=["ab"])

    async def go() -> None:
        assert await server.is_ready()
        loop = asyncio.get_running_loop()
        running = [
            asyncio.create_task(server.predict_many("fake-translator", None, "t", [job])) for _ in range(3)
        ]
        await asyncio.sleep(0.05)
        assert server.in_flight == 3
        start = loop.time()
        assert await server.drain(5.0, settle_s=0) == 0
        assert all(r.done() for r in running)  # waited for the three…
        assert loop.time() - start < 1.0  # …not for the timeout
        assert [len(r.result()[1]) for r in running] == [1, 1, 1]
        with pytest.raises(Stopping, match="stopping"):
            await server.predict_many("fake-translator", None, "t", [job])
        with pytest.raises(Stopping):
            async for _ in server.stream("fake-translator", None, "s", job):
                pass
        assert not await server.is_ready() and server.unready == "not ready: the service is stopping"
        assert server.in_flight == 0
        server.stopping = False
        translator.delay_s = 2.0
        slow = asyncio.create_task(server.predict_many("fake-translator", None, "t", [job]))
        await asyncio.sleep(0.05)
        start = loop.time()
        assert await server.drain(0.2, settle_s=0) == 1  # the timeout: one still in flight
        assert loop.time() - start < 0.5
        slow.cancel()

    asyncio.run(go())
    assert [r[2] for r in recorded.records] == [200, 200, 200, 503, 503, 499]
    assert Stopping.http_status == 503 and Stopping.grpc_code == "UNAVAILABLE"
