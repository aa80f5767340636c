"""One ModelStreamInfer stream's answers (``service/api/grpc_stream.py``): computed together,
plain answers in request order, decoupled responses as they come, a window counted until each
answer is written, and nothing left behind when the client leaves — alone, then through the
servicer on a real grpc.aio server over fake models."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from service.api.grpc_stream import answer_in_order
from service.api.protos import grpc_service_pb2 as pb
from service.api.protos import grpc_service_pb2_grpc as pb_grpc
from tests.service.api.test_grpc_servicer import with_servicer
from tests.service.fakes import fake_server

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


def plain_answers(
    requests: list[str], raises: dict[str, BaseException], failed: Callable[[str, BaseException], str]
) -> list[str]:
    """Plain requests, each answered with itself, but those in ``raises`` raise that instead."""

    async def go() -> list[str]:
        async def source() -> AsyncIterator[str]:
            for r in requests:
                yield r

        async def replies_of(request: str) -> AsyncIterator[str]:
            if request in raises:
                raise raises[request]
            yield request

        stream = answer_in_order(source(), replies_of, lambda r: False, failed, 4)
        return [reply async for reply in stream]

    return asyncio.run(asyncio.wait_for(go(), 5))


def test_a_request_cancelled_from_elsewhere_is_still_answered() -> None:
    # e.g. a model call cancelled by what it awaited
    answers = plain_answers(
        ["a", "cancelled", "b"], {"cancelled": asyncio.CancelledError()}, lambda r, e: f"{r}: failed"
    )
    assert answers == ["a", "cancelled: failed", "b"]


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
    boom = RuntimeError("what replies_of did not answer itself")
    answers = plain_answers(["a", "boom", "b"], {"boom": boom}, lambda r, e: f"{r}: {e}")
    assert answers == ["a", "boom: what replies_of did not answer itself", "b"]


def test_a_stream_computes_its_requests_together_and_answers_them_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As Triton's stream handler: a quick request sent after a slow one is computed at once (it
    used to wait behind it), and answered after it, in request order; at most STREAM_WINDOW of
    one stream's requests are in the server at a time."""
    from service.api import grpc_servicer

    monkeypatch.setattr(grpc_servicer, "STREAM_WINDOW", 2)
    server, translator, classifier, _ = fake_server(tmp_path)
    translator.delay_s = 0.3
    busy = {"now": 0, "most": 0}
    predict = translator.predict

    async def counted(job: Any) -> Any:
        busy["now"] += 1
        busy["most"] = max(busy["most"], busy["now"])
        try:
            return await predict(job)
        finally:
            busy["now"] -= 1

    translator.predict = counted  # type: ignore[method-assign]

    def slow(i: int) -> pb.ModelInferRequest:
        r = pb.ModelInferRequest(model_name="fake-translator", id=f"slow{i}")
        r.inputs.add(name="TEXT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"ab")
        return r

    quick = pb.ModelInferRequest(model_name="fake-classifier", id="quick")
    quick.inputs.add(name="PIXELS", datatype="UINT8", shape=[1, 2, 2]).contents.uint_contents.extend(
        [1, 1, 2, 0]
    )

    async def use(channel: grpc.aio.Channel) -> tuple[list[str], int]:
        async def requests() -> Any:
            yield slow(0)
            yield quick
            for i in range(1, 5):
                yield slow(i)

        stream = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests())
        order, classified_while_slow = [], 0
        async for reply in stream:
            if reply.infer_response.id == "slow0":
                classified_while_slow = len(classifier.jobs)  # the quick one ran beside the slow one
            order.append(reply.infer_response.id)
        return order, classified_while_slow

    order, classified_while_slow = with_servicer(tmp_path, use, server)
    assert order == ["slow0", "quick", "slow1", "slow2", "slow3", "slow4"]
    assert classified_while_slow == 1
    assert busy["most"] == 2


def test_a_decoupled_request_s_error_is_its_final_response(tmp_path: Path) -> None:
    """A ``stream: true`` request that fails answers an error flagged ``triton_final_response``,
    as its answer would be: a client waiting for the flag on that request finishes it."""
    failing = pb.ModelInferRequest(model_name="nope", id="d")
    failing.inputs.add(name="TEXT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"ab")
    failing.parameters["stream"].bool_param = True

    async def use(channel: grpc.aio.Channel) -> list[Any]:
        async def requests() -> Any:
            yield failing

        return [r async for r in pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests())]

    [reply] = with_servicer(tmp_path, use)
    assert "not found" in reply.error_message and reply.infer_response.id == "d"
    assert reply.infer_response.parameters["triton_final_response"].bool_param


def test_a_client_cancel_that_reaches_the_model_call_first_is_not_an_internal_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Behind Ray's gRPC proxy a client's cancel reaches the model deployment's call as a
    CancelledError before the stream closes: it was logged as an unexpected internal error with a
    traceback, once per cancelled request. It is answered (nobody reads it) and not logged."""
    server, translator, _, _ = fake_server(tmp_path)

    async def cancelled(job: Any) -> Any:
        raise asyncio.CancelledError

    translator.predict = cancelled  # type: ignore[method-assign]
    request = pb.ModelInferRequest(model_name="fake-translator", id="c")
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"ab")

    async def use(channel: grpc.aio.Channel) -> list[Any]:
        async def requests() -> Any:
            yield request

        return [r async for r in pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests())]

    with caplog.at_level(logging.ERROR):
        [reply] = with_servicer(tmp_path, use, server)
    assert reply.error_message == "the request was cancelled" and reply.infer_response.id == "c"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
