"""The gRPC servicer over fake models on a real grpc.aio server, without Ray: both services' RPCs
send the core typed jobs and answer from its typed results; the bidirectional stream answers every
request in order and survives a failed one; the token; the standard health service and server
reflection beside them. What the services refuse, and with which code: ``test_grpc_refusals.py``."""

from __future__ import annotations

import asyncio
import io
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from service.api import kserve_tensors
from service.api.grpc_aio import GrpcHealth, add_reflection, add_to_grpc_server, interceptors
from service.api.grpc_servicer import GrpcServicer
from service.api.protos import attention_pb2 as apb
from service.api.protos import attention_pb2_grpc as apb_grpc
from service.api.protos import grpc_service_pb2 as pb
from service.api.protos import grpc_service_pb2_grpc as pb_grpc
from service.api.server import Server
from tests.service.fakes import fake_server


def with_servicer(
    tmp: Path,
    use: Callable[[grpc.aio.Channel], Awaitable[Any]],
    server: Server | None = None,
    beside: Callable[[grpc.aio.Server, list[str]], None] | None = None,
    refused: Callable[[], None] | None = None,
    **settings: Any,
) -> Any:
    """``use`` a channel to a started grpc.aio server with both services of ``server`` (a fake
    one with ``settings`` if none), and what ``beside`` adds given their names; ``refused()`` is
    told of each call refused at the limit."""
    server = server or fake_server(tmp, **settings)[0]

    async def go() -> Any:
        grpc_server = grpc.aio.server(
            interceptors=interceptors(
                server.settings.api_token, server.settings.limits.max_grpc_calls, refused
            )
        )
        limits = server.settings.limits
        services = add_to_grpc_server(
            grpc_server, GrpcServicer(server), limits.max_grpc_value_bytes, limits.stream_write_timeout_s
        )
        if beside is not None:
            beside(grpc_server, services)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        grpc_server.add_insecure_port(f"127.0.0.1:{port}")
        await grpc_server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await use(channel)
        finally:
            await grpc_server.stop(None)

    return asyncio.run(asyncio.wait_for(go(), 20))


def test_attention_v1_translate_and_classify(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.array([[3, 3], [3, 1]], dtype=np.uint8)).save(buffer, format="PNG")

    async def use(channel: grpc.aio.Channel) -> Any:
        stub = apb_grpc.AttentionServiceStub(channel)
        translated = await stub.Translate(
            apb.TranslateRequest(model="fake-translator", texts=["abc"], return_attention=True)
        )
        await stub.Translate(apb.TranslateRequest(model="fake-translator", texts=["abc"], truncate=True))
        classified = await stub.Classify(
            apb.ClassifyRequest(
                model="fake-classifier", image=buffer.getvalue(), top_k=1, return_attention=True,
                discard_ratio=0.5,
            )
        )  # fmt: skip
        return translated, classified

    server, translator, classifier, _ = fake_server(tmp_path)
    translated, classified = with_servicer(tmp_path, use, server)
    assert [j.truncate for j in translator.jobs] == [False, True]
    assert {j.field for j in translator.jobs} == {"texts"}  # what messages name
    assert [j.discard_ratio for j in classifier.jobs] == [0.5]
    [t] = translated.translations
    assert (t.text, t.score, list(t.attention.shape)) == ("cba", -3.0, [3, 3])
    assert list(t.attention.values) == [0, 0, 1, 0, 1, 0, 1, 0, 0]
    assert translated.model == "fake-translator" and translated.metrics.tokens_generated == 3
    assert [p.label for p in classified.predictions] == ["three"] and list(classified.rollout.shape) == [2, 2]


def test_kserve_v2_infer_and_stream(tmp_path: Path) -> None:
    def request(texts: list[str], model: str = "fake-translator") -> pb.ModelInferRequest:
        r = pb.ModelInferRequest(model_name=model, id="r")
        r.inputs.add(name="TEXT", datatype="BYTES", shape=[len(texts)])
        r.raw_input_contents.append(
            kserve_tensors.serialize_bytes(np.array([t.encode() for t in texts], dtype=object))
        )
        return r

    async def use(channel: grpc.aio.Channel) -> Any:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        single = await stub.ModelInfer(request(["ab", "cde"]))

        undecided = request(["w"])
        undecided.parameters["stream"].string_param = "maybe"  # a true/false parameter, neither

        async def requests() -> Any:
            for i, r in enumerate((request(["x"]), request(["y"], model="nope"), request(["zz"]), undecided)):
                r.id = f"r{i}"
                yield r

        streamed = [reply async for reply in stub.ModelStreamInfer(requests())]
        ready = await stub.ServerReady(pb.ServerReadyRequest())
        return single, streamed, ready

    single, streamed, ready = with_servicer(tmp_path, use)
    texts = kserve_tensors.deserialize_bytes(single.raw_output_contents[0], 2, "TRANSLATION")
    assert [bytes(t) for t in texts] == [b"ba", b"edc"] and single.model_name == "fake-translator"
    by_id = {s.infer_response.id: s for s in streamed}  # answered as each completes: matched by id
    assert sorted(by_id) == ["r0", "r1", "r2", "r3"]
    assert [bool(by_id[f"r{i}"].error_message) for i in range(4)] == [False, True, False, True]
    assert "not found" in by_id["r1"].error_message
    assert by_id["r1"].infer_response.model_name == "nope"  # an error names the request it answers
    assert "stream" in by_id["r3"].error_message and "boolean" in by_id["r3"].error_message
    assert ready.ready


def test_the_token_guards_every_rpc_but_health(tmp_path: Path) -> None:
    async def use(channel: grpc.aio.Channel) -> Any:
        stub = apb_grpc.AttentionServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.Translate(apb.TranslateRequest(model="fake-translator", texts=["x"]))
        authorized = await stub.Translate(
            apb.TranslateRequest(model="fake-translator", texts=["x"]),
            metadata=(("authorization", "Bearer " + "t" * 16),),
        )
        live = await pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest())
        return failure.value.code(), authorized.translations[0].text, live.live

    assert with_servicer(tmp_path, use, api_token="t" * 16) == (grpc.StatusCode.UNAUTHENTICATED, "x", True)


def test_the_token_is_checked_before_the_request_is_read(tmp_path: Path) -> None:
    """A request that does not parse, sent without the token, is UNAUTHENTICATED (it was
    INVALID_ARGUMENT: parsed first), on unary and streaming RPCs alike; with the token it is the
    parse error. Health stays open."""
    token = "t" * 16

    async def use(channel: grpc.aio.Channel) -> Any:
        codes = []
        for method in ("ModelInfer", "ModelMetadata"):
            raw = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
            for metadata in ((), (("authorization", f"Bearer {token}"),)):
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    await raw(b"\x0a\x03\xff\xfe\xfd", metadata=metadata)  # a name not UTF-8
                codes.append(failure.value.code())
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stream(iter([b"\x0a\x03\xff\xfe\xfd"])).read()
        codes.append(failure.value.code())
        ready = await pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(pb.ServerReadyRequest())
        return codes, ready.ready

    codes, ready = with_servicer(tmp_path, use, api_token=token)
    unauthenticated, invalid = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT
    assert codes == [unauthenticated, invalid, unauthenticated, invalid, unauthenticated] and ready


def test_model_metadata_carries_the_limits(tmp_path: Path) -> None:
    async def use(channel: grpc.aio.Channel) -> Any:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        return await stub.ModelMetadata(pb.ModelMetadataRequest(name="fake-translator"))

    meta = with_servicer(tmp_path, use, limits={"max_beam_size": 4})
    assert meta.parameters["max_beam_size"].int64_param == 4 and meta.inputs[0].name == "TEXT"


def test_model_ready_answers_false_for_a_model_or_version_not_served(tmp_path: Path) -> None:
    """As Triton's ModelReady (and HTTP's ``…/ready``, which tritonclient reads as False): not
    ready, no error, for a model or version the server does not serve."""

    async def use(channel: grpc.aio.Channel) -> list[bool]:
        v2 = pb_grpc.GRPCInferenceServiceStub(channel)
        asked = [("fake-translator", ""), ("fake-translator", "1"), ("fake-translator", "2"), ("nope", "")]
        replies = [await v2.ModelReady(pb.ModelReadyRequest(name=n, version=v)) for n, v in asked]
        return [r.ready for r in replies]

    assert with_servicer(tmp_path, use) == [True, True, False, False]


def test_grpc_health_checks_and_watches_the_server_and_each_service(tmp_path: Path) -> None:
    """grpc.health.v1 beside both services, answering as the hosting layer says: SERVING for the
    server ("") and each service once it serves, NOT_FOUND for another name, and NOT_SERVING for
    good once it stops — sent to a Watch that is open."""
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    healths: list[GrpcHealth] = []

    async def use(channel: grpc.aio.Channel) -> Any:
        [health] = healths
        assert health.names == ["", "inference.GRPCInferenceService", "attention.v1.AttentionService"]
        await health.serving()
        stub = health_pb2_grpc.HealthStub(channel)
        checks = {name: (await stub.Check(health_pb2.HealthCheckRequest(service=name))).status
                  for name in health.names}  # fmt: skip
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.Check(health_pb2.HealthCheckRequest(service="nope.Service"))
        with pytest.raises(grpc.aio.AioRpcError) as undecodable:  # the health servicer answered UNKNOWN
            await channel.unary_unary("/grpc.health.v1.Health/Check")(b"\xff\xff\xff\xff\xff")
        assert undecodable.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid protobuf message" in (undecodable.value.details() or "")
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"))
        seen = [(await watch.read()).status]
        await health.stopping()
        seen.append((await watch.read()).status)
        await health.serving()  # a stopping server stays NOT_SERVING
        after = (await stub.Check(health_pb2.HealthCheckRequest())).status
        watch.cancel()
        return checks, unknown.value.code(), seen, after

    checks, unknown, seen, after = with_servicer(
        tmp_path, use, beside=lambda grpc_server, services: healths.append(GrpcHealth(grpc_server, services))
    )
    assert set(checks.values()) == {serving} and unknown == grpc.StatusCode.NOT_FOUND
    assert seen == [serving, not_serving] and after == not_serving


def test_reflection_lists_and_describes_every_service_behind_the_token(tmp_path: Path) -> None:
    """Server reflection, as grpcurl uses it: the services listed, each one's file with its
    methods; with a token set, only for a caller that sends it."""
    token = "reflect-me-please-16"
    server = fake_server(tmp_path, api_token=token)[0]

    async def use(channel: grpc.aio.Channel) -> Any:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        refused = stub.ServerReflectionInfo()
        # nothing written: the refusal comes before any request is read, and a write racing it
        # failed now and then with INTERNAL from gRPC's core instead of the refusal's status
        with pytest.raises(grpc.aio.AioRpcError) as unauthenticated:
            await refused.read()
        call = stub.ServerReflectionInfo(metadata=[("authorization", f"Bearer {token}")])
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        listed = [s.name for s in (await call.read()).list_services_response.service]
        await call.write(
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")
        )
        files = (await call.read()).file_descriptor_response.file_descriptor_proto
        await call.done_writing()
        return unauthenticated.value.code(), listed, files

    code, listed, files = with_servicer(
        tmp_path,
        use,
        server,
        beside=add_reflection,
    )
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert sorted(listed) == ["attention.v1.AttentionService", "grpc.health.v1.Health",
                              "grpc.reflection.v1alpha.ServerReflection", "inference.GRPCInferenceService"]  # fmt: skip
    [service] = [s for f in files for s in descriptor_pb2.FileDescriptorProto.FromString(f).service]
    assert {m.name for m in service.method} >= {"ModelInfer", "ModelStreamInfer", "ServerLive"}
