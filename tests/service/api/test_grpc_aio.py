"""The grpc.aio plumbing of the in-replica frontend (``service/api/grpc_aio.py``) that the
servicer's own tests (``test_grpc_servicer.py``) do not reach: how many calls a replica holds at
once, and whose."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api import kserve_tensors
from service.api.grpc_aio import CallLimit, GrpcHealth
from service.api.protos import grpc_service_pb2 as pb
from service.api.protos import grpc_service_pb2_grpc as pb_grpc
from tests.service.api.test_grpc_servicer import with_servicer

TOKEN = "t" * 16
WITH_TOKEN = (("authorization", f"Bearer {TOKEN}"),)
LIMIT = 3


def translate(text: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="fake-translator", id=text)
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(kserve_tensors.serialize_bytes(np.array([text.encode()], dtype=object)))
    return request


async def code_of(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_calls_in_progress_are_bounded_and_clients_without_the_token_cannot_take_them(tmp_path: Path) -> None:
    """``max_grpc_calls`` = 3 with a token set: three health ``Watch`` streams from a client
    without the token fill their own pool (a fourth is RESOURCE_EXHAUSTED) while a caller with the
    token is served and a health ``Check`` answers; three KServe streams with the token, each
    answered once and held open, take every call: one more is RESOURCE_EXHAUSTED, naming the
    limit, while a call without the token is still UNAUTHENTICATED (not counted) and ``Check``
    and ``ServerLive`` still answer; a stream closed, calls pass again. With grpc's own
    ``maximum_concurrent_rpcs`` the watches had refused everything, probes included."""
    healths: list[GrpcHealth] = []
    refusals: list[None] = []

    async def use(channel: grpc.aio.Channel) -> dict[str, Any]:
        await healths[0].serving()
        health, v2 = health_pb2_grpc.HealthStub(channel), pb_grpc.GRPCInferenceServiceStub(channel)
        seen: dict[str, Any] = {}
        watches = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(LIMIT)]
        seen["watching"] = [(await w.read()).status for w in watches]
        seen["fourth watch"] = await code_of(health.Watch(health_pb2.HealthCheckRequest()).read())
        seen["check"] = (await health.Check(health_pb2.HealthCheckRequest())).status
        seen["with the token"] = await code_of(
            v2.ServerMetadata(pb.ServerMetadataRequest(), metadata=WITH_TOKEN)
        )

        streams = [v2.ModelStreamInfer(metadata=WITH_TOKEN) for _ in range(LIMIT)]
        for i, stream in enumerate(streams):
            await stream.write(translate(f"t{i}"))
        seen["streams answered"] = [(await s.read()).infer_response.id for s in streams]
        try:
            await v2.ServerMetadata(pb.ServerMetadataRequest(), metadata=WITH_TOKEN)
        except grpc.aio.AioRpcError as error:
            seen["one more"] = (error.code(), error.details())
        seen["one more stream"] = await code_of(v2.ModelStreamInfer(metadata=WITH_TOKEN).read())
        seen["without the token"] = await code_of(v2.ServerMetadata(pb.ServerMetadataRequest()))
        seen["check, full"] = (await health.Check(health_pb2.HealthCheckRequest())).status
        seen["live, full"] = (await v2.ServerLive(pb.ServerLiveRequest())).live
        await streams[0].done_writing()
        seen["closed"] = await streams[0].code()
        seen["after"] = await code_of(v2.ServerMetadata(pb.ServerMetadataRequest(), metadata=WITH_TOKEN))
        for stream in streams[1:]:
            await stream.done_writing()
        seen["ended"] = [await s.code() for s in streams[1:]]
        for watch in watches:
            watch.cancel()
        return seen

    seen = with_servicer(
        tmp_path,
        use,
        beside=lambda grpc_server, services: healths.append(GrpcHealth(grpc_server, services)),
        refused=lambda: refusals.append(None),
        api_token=TOKEN,
        limits={"max_grpc_calls": LIMIT},
    )
    serving, ok, exhausted = (
        health_pb2.HealthCheckResponse.SERVING,
        grpc.StatusCode.OK,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert seen["watching"] == [serving] * LIMIT and seen["fourth watch"] == exhausted
    assert seen["check"] == serving and seen["with the token"] == ok
    assert seen["streams answered"] == ["t0", "t1", "t2"]
    assert seen["one more"][0] == exhausted and "limit of 3" in seen["one more"][1], seen["one more"]
    assert seen["one more stream"] == exhausted
    assert seen["without the token"] == grpc.StatusCode.UNAUTHENTICATED
    assert seen["check, full"] == serving and seen["live, full"] is True
    assert seen["closed"] == ok and seen["after"] == ok and seen["ended"] == [ok, ok]
    assert len(refusals) == 3  # the fourth watch, one more call, one more stream: counted


def test_a_call_refused_at_the_limit_has_nothing_read() -> None:
    """A unary call that finds every place taken is refused before grpc reads and parses its
    request (grpc.aio parses a unary request before calling the handler): a client retrying at
    the limit does not have megabytes parsed each time."""
    parsed: list[int] = []

    def parse(data: bytes) -> bytes:
        parsed.append(len(data))
        return data

    async def held(requests: Any, _: grpc.aio.ServicerContext) -> Any:
        async for request in requests:
            yield request

    async def unary(request: bytes, _: grpc.aio.ServicerContext) -> bytes:
        return b"%d" % len(request)

    async def scenario() -> tuple[grpc.StatusCode, list[int], bytes]:
        server = grpc.aio.server(
            interceptors=[CallLimit(1)], options=[("grpc.max_receive_message_length", 1 << 24)]
        )
        handlers = {
            "Held": grpc.stream_stream_rpc_method_handler(held, request_deserializer=parse),
            "Unary": grpc.unary_unary_rpc_method_handler(unary, request_deserializer=parse),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            options = [("grpc.max_send_message_length", 1 << 24)]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
                stream = channel.stream_stream("/t.T/Held")()
                await stream.write(b"x")
                assert await stream.read() == b"x"  # the one place is taken
                parsed.clear()
                code = await code_of(channel.unary_unary("/t.T/Unary")(b"\0" * (8 << 20), timeout=10))
                refused_parsed = parsed[:]
                await stream.done_writing()
                assert await stream.code() == grpc.StatusCode.OK
                after = await channel.unary_unary("/t.T/Unary")(b"abc", timeout=10)
                return code, refused_parsed, after
        finally:
            await server.stop(None)

    code, refused_parsed, after = asyncio.run(scenario())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and refused_parsed == [] and after == b"3"
