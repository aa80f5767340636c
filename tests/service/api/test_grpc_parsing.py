"""Lenient parsing of the gRPC services' requests (``service/api/grpc_parsing.py``) as Ray's gRPC
proxy registers them, and the servicer's answer to what could not be parsed — the path of the
Ray-ingress frontends, where a broken message was UNKNOWN and ended a ``ModelStreamInfer`` stream
(the in-replica grpc.aio path: ``test_grpc_refusals.py``; live through Ray's proxy:
``tests/service/hosting/test_ray_ingress.py``)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ray.serve._private.grpc_util import gRPCGenericServer

from service.api import grpc_parsing
from service.api.grpc_parsing import TooCostly, Undecodable, value_bytes
from service.api.grpc_servicer import SERVICER_FUNCTIONS, GrpcServicer
from service.api.protos import attention_pb2 as apb
from service.api.protos import grpc_service_pb2 as pb
from service.errors import ServiceError
from tests.service.fakes import fake_server


class AnyServicer:
    """What Ray's proxy passes the functions: a servicer whose every method is a placeholder."""

    def __getattr__(self, name: str) -> Any:
        return None


def registered_handlers() -> dict[str, Any]:
    """Every method's handler as Ray's proxy registers it (``grpc_servicer_functions``)."""

    async def registered() -> dict[str, Any]:  # a grpc.aio server is made on an event loop
        server = gRPCGenericServer(lambda service_method, streaming_type: None)
        grpc_parsing.add_kserve_v2(AnyServicer(), server)
        grpc_parsing.add_attention_v1(AnyServicer(), server)
        return {
            m: h for [generic] in server.generic_rpc_handlers for m, h in generic._method_handlers.items()
        }

    return asyncio.run(registered())


def test_ray_s_proxy_keeps_the_lenient_parser_of_every_method() -> None:
    """Ray's gRPCGenericServer replaces each handler's behaviour by its routing to the ingress
    replica and keeps the request parser: with grpc_servicer_functions' functions, that parser
    gives an Undecodable for broken bytes and the message for good ones, for every method."""
    assert SERVICER_FUNCTIONS == [
        "service.api.grpc_parsing.add_kserve_v2",
        "service.api.grpc_parsing.add_attention_v1",
    ]
    handlers = registered_handlers()
    services = [*pb.DESCRIPTOR.services_by_name.values(), *apb.DESCRIPTOR.services_by_name.values()]
    assert set(handlers) == {f"/{s.full_name}/{m.name}" for s in services for m in s.methods}
    for method, handler in handlers.items():
        assert isinstance(handler.request_deserializer(b"\xff\xff\xff\xff\x0f"), Undecodable), method
    good = apb.TranslateRequest(model="m", texts=["a"]).SerializeToString()
    assert handlers["/attention.v1.AttentionService/Translate"].request_deserializer(good).texts == ["a"]


def test_ray_s_proxy_refuses_what_would_be_parsed_value_by_value_beyond_the_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The proxy's parser takes the limit from the variable ``python -m service`` sets for Ray's
    processes: typed UINT8 contents over it are refused unparsed; as FP32 contents or raw bytes,
    the same tensor is parsed."""
    monkeypatch.setenv("ATTN_LIMITS__MAX_GRPC_VALUE_BYTES", "65536")
    parse = registered_handlers()["/inference.GRPCInferenceService/ModelInfer"].request_deserializer
    typed = pb.ModelInferRequest(model_name="m")
    typed.inputs.add(name="PIXELS", datatype="UINT8").contents.uint_contents.extend([7] * 70_000)
    refused = parse(typed.SerializeToString())
    assert isinstance(refused, TooCostly) and refused.error.grpc_code == "INVALID_ARGUMENT"
    assert refused.error.message.startswith(
        "inputs.contents.uint_contents: parsing would take as long as 70000 bytes of packed integers"
    )
    floats = pb.ModelInferRequest(model_name="m")
    floats.inputs.add(name="PIXELS", datatype="FP32").contents.fp32_contents.extend([7.0] * 70_000)
    raw = pb.ModelInferRequest(model_name="m", raw_input_contents=[bytes(300_000)])
    raw.inputs.add(name="PIXELS", datatype="UINT8", shape=[300_000])
    for message in (floats, raw):
        assert parse(message.SerializeToString()) == message


def test_value_bytes_counts_packed_varints_by_field_and_copied_fields_not_at_all() -> None:
    """Packed integers and booleans count their bytes, under their field's path; bytes, strings,
    FP32 / FP64 contents and map entries' strings count nothing."""
    request = pb.ModelInferRequest(model_name="m" * 1000, id="i", raw_input_contents=[bytes(10_000)])
    request.parameters["key"].string_param = "v" * 1000
    first = request.inputs.add(name="A", datatype="INT64", shape=[3])
    first.contents.int64_contents.extend([1, 300, 2**40])  # 1 + 2 + 6 bytes as varints
    second = request.inputs.add(name="B", datatype="BOOL", shape=[5])
    second.contents.bool_contents.extend([True] * 5)
    second.contents.fp64_contents.extend([0.5] * 1000)
    second.contents.bytes_contents.extend([b"x" * 100] * 10)
    request.outputs.add(name="O").parameters["n"].int64_param = 5
    assert value_bytes(pb.ModelInferRequest.DESCRIPTOR, request.SerializeToString()) == {
        "inputs.shape": 2,
        "inputs.contents.int64_contents": 9,
        "inputs.contents.bool_contents": 5,
    }
    texts = apb.TranslateRequest(model="m", texts=["word " * 800] * 256)
    assert value_bytes(apb.TranslateRequest.DESCRIPTOR, texts.SerializeToString()) == {}


def test_value_bytes_counts_the_rest_as_fields_past_its_fields_limit_or_where_malformed() -> None:
    """Millions of short texts (each parsed into its own string) or empty sub-messages are not
    walked one by one: past MAX_FIELDS fields each byte of the rest of the message counts as a
    field (FIELD_WEIGHT), as does what follows a length running past the end."""
    many = apb.TranslateRequest(model="m", texts=["a"] * 100_000).SerializeToString()
    fields, weight = grpc_parsing.MAX_FIELDS, grpc_parsing.FIELD_WEIGHT
    counted = value_bytes(apb.TranslateRequest.DESCRIPTOR, many)
    rest = len(many) - 3 - 3 * (fields - 1)  # "m", then fields - 1 texts
    assert counted == {"request": rest * weight}
    cut = b"\x2a\xff\xff\x7f" + bytes(100)  # inputs: a length of 2 MiB over 100 bytes
    assert value_bytes(pb.ModelInferRequest.DESCRIPTOR, cut) == {"request": 100 * weight}


def test_many_fields_are_refused_from_a_sixteenth_of_the_limit_and_a_bytes_tensor_passes() -> None:
    """2 MB of empty inputs took protobuf 0.1 s, as long as 25 MB of packed integers: a message
    larger than 1/16 of the limit is walked, and refused past it; 4,096 encoded images as BYTES
    contents (max_images' ceiling) are parsed."""
    parse = grpc_parsing.lenient(pb.ModelInferRequest.FromString, max_value_bytes=65_536)
    refused = parse(b"\x2a\x00" * 40_000)  # 80 kB: 40,000 empty inputs
    assert isinstance(refused, TooCostly) and refused.error.message.startswith("request: parsing would take")
    images = pb.ModelInferRequest(model_name="m")
    images.inputs.add(name="IMAGE", datatype="BYTES", shape=[4096]).contents.bytes_contents.extend(
        [bytes(100)] * 4096
    )
    assert parse(images.SerializeToString()) == images


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_value_bytes_reads_any_bytes_and_counts_at_most_each_as_a_field(data: bytes) -> None:
    for descriptor in (pb.ModelInferRequest.DESCRIPTOR, apb.TranslateRequest.DESCRIPTOR):
        assert sum(value_bytes(descriptor, data).values()) <= len(data) * grpc_parsing.FIELD_WEIGHT


class Context:
    """Ray's proxy's context, as the servicer uses it."""

    def __init__(self, metadata: list[tuple[str, str]]) -> None:
        self.metadata, self.code, self.details = metadata, None, ""

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self.metadata

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


@pytest.mark.parametrize(("metadata", "code"), [
    ([("authorization", "Bearer s3cret-s3cret-s3cret")], grpc.StatusCode.INVALID_ARGUMENT),
    ([], grpc.StatusCode.UNAUTHENTICATED),  # without the token, nothing about the message
])  # fmt: skip
@pytest.mark.parametrize("rpc", ["Translate", "ModelInfer", "TranslateStream"])
def test_the_servicer_answers_an_undecodable_request_invalid_argument(
    tmp_path: Path, rpc: str, metadata: list[tuple[str, str]], code: grpc.StatusCode
) -> None:
    servicer = GrpcServicer(fake_server(tmp_path, api_token="s3cret-s3cret-s3cret")[0])
    context = Context(metadata)

    async def call() -> Any:
        method = getattr(servicer, rpc)
        if rpc == "TranslateStream":
            return [event async for event in method(Undecodable("bad"), context)]
        return await method(Undecodable("bad"), context)

    with pytest.raises(ServiceError):
        asyncio.run(call())
    assert context.code == code
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert context.details == "request: not a valid protobuf message (bad)"
