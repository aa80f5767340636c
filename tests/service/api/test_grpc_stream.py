"""One ModelStreamInfer stream's answers (``service/api/grpc_stream.py``): computed together,
plain answers in request order, decoupled responses as they come, a window counted until each
answer is written, and nothing left behind when the client leaves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from service.api.grpc_stream import answer_in_order

#: a request: (name, seconds to compute, responses it makes; several: a decoupled one)
Req = tuple[str, float, int]


def run(requests: list[Req], window: int = 8, read: int | None = None, hold_s: float = 0.0) -> dict:
    """Answer ``requests`` (sent at once); read ``read`` responses (all: None), then close."""
    started: list[str] = []
    busy = {"now": 0, "most": 0}

    async def source() -> AsyncIterator[Req]:
        for r in requests:
            yield r
        await asyncio.sleep(hold_s)  # the client keeps its side open a while

    async def replies_of(request: Req) -> AsyncIterator[str]:
        name, seconds, count = request
        started.append(name)
        busy["now"] += 1
        busy["most"] = max(busy["most"], busy["now"])
        try:
            for i in range(count):
                await asyncio.sleep(seconds / count)
                yield f"{name}.{i}" if count > 1 else name
        finally:
            busy["now"] -= 1

    async def go() -> dict:
        got: list[str] = []
        stream = answer_in_order(source(), replies_of, lambda r: r[2] > 1, lambda r, e: f"{r[0]}!", window)
        async for reply in stream:
            got.append(reply)
            if read is not None and len(got) == read:
                break
        await stream.aclose()
        await asyncio.sleep(0.05)
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return {"got": got, "started": started, "most": busy["most"], "left": left}

    async def bounded() -> dict:
        async with asyncio.timeout(10):
            return await go()

    return asyncio.run(bounded())


def test_plain_answers_go_in_request_order_while_computed_together() -> None:
    result = run([("slow", 0.3, 1), ("quick", 0.0, 1), ("mid", 0.1, 1)])
    assert result["got"] == ["slow", "quick", "mid"]
    assert result["most"] == 3  # all three computed at once


def test_decoupled_responses_go_out_as_made_past_an_earlier_plain_answer() -> None:
    result = run([("slow", 0.3, 1), ("tokens", 0.06, 3)])
    assert result["got"] == ["tokens.0", "tokens.1", "tokens.2", "slow"]


def test_the_window_counts_a_request_until_its_answer_is_written() -> None:
    """A plain answer waiting behind a slow one still holds its place: the window bounds what
    the stream holds in memory, not only what computes."""
    result = run([("slow", 0.3, 1)] + [(f"q{i}", 0.0, 1) for i in range(6)], window=3)
    assert result["got"] == ["slow"] + [f"q{i}" for i in range(6)]
    assert result["most"] <= 3
    assert result["started"][:3] == ["slow", "q0", "q1"]


@pytest.mark.parametrize("read", [1, 3])
def test_a_client_that_leaves_leaves_nothing_running(read: int) -> None:
    """Closed while requests compute, while answers wait their turn, while the reader waits for
    a place in the window: every task ends (the reader was left pending on a full queue)."""
    requests = [("slow", 0.5, 1)] + [(f"q{i}", 0.0, 1) for i in range(10)] + [("tokens", 0.5, 5)]
    result = run(requests, window=4, read=read, hold_s=5)
    assert result["got"] == (["slow", "q0", "q1"][:read])
    assert result["left"] == []


def test_a_request_cancelled_from_elsewhere_is_still_answered() -> None:
    async def go() -> list[str]:
        async def source() -> AsyncIterator[str]:
            for r in ("a", "cancelled", "b"):
                yield r

        async def replies_of(request: str) -> AsyncIterator[str]:
            if request == "cancelled":
                raise asyncio.CancelledError  # e.g. a model call cancelled by what it awaited
            yield request

        stream = answer_in_order(source(), replies_of, lambda r: False, lambda r, e: f"{r}: failed", 4)
        return [reply async for reply in stream]

    assert asyncio.run(asyncio.wait_for(go(), 5)) == ["a", "cancelled: failed", "b"]


def test_a_failing_request_stream_ends_the_answers_with_its_error() -> None:
    async def go() -> list[str]:
        got: list[str] = []

        async def source() -> AsyncIterator[str]:
            yield "a"
            raise ConnectionResetError("the client went away")

        async def replies_of(request: str) -> AsyncIterator[str]:
            yield request

        with pytest.raises(ConnectionResetError):
            async for reply in answer_in_order(source(), replies_of, lambda r: False, lambda r, e: "x", 4):
                got.append(reply)
        return got

    assert asyncio.run(asyncio.wait_for(go(), 5)) in (["a"], [])


def test_a_request_whose_computation_raises_is_answered_in_its_place() -> None:
    """Clients that match answers by order would get shifted answers: every request is answered."""

    async def go() -> list[str]:
        async def source() -> AsyncIterator[str]:
            for r in ("a", "boom", "b"):
                yield r

        async def replies_of(request: str) -> AsyncIterator[str]:
            if request == "boom":
                raise RuntimeError("what replies_of did not answer itself")
            yield request

        stream = answer_in_order(source(), replies_of, lambda r: False, lambda r, e: f"{r}: {e}", 4)
        return [reply async for reply in stream]

    assert asyncio.run(go()) == ["a", "boom: what replies_of did not answer itself", "b"]
