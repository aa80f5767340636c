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
from ray.serve._private.grpc_util import gRPCGenericServer

from service.api import grpc_parsing
from service.api.grpc_parsing import Undecodable
from service.api.grpc_servicer import SERVICER_FUNCTIONS, GrpcServicer
from service.api.protos import attention_pb2 as apb
from service.api.protos import grpc_service_pb2 as pb
from service.errors import ServiceError
from tests.service.fakes import fake_server


class AnyServicer:
    """What Ray's proxy passes the functions: a servicer whose every method is a placeholder."""

    def __getattr__(self, name: str) -> Any:
        return None


def test_ray_s_proxy_keeps_the_lenient_parser_of_every_method() -> None:
    """Ray's gRPCGenericServer replaces each handler's behaviour by its routing to the ingress
    replica and keeps the request parser: with grpc_servicer_functions' functions, that parser
    gives an Undecodable for broken bytes and the message for good ones, for every method."""
    assert SERVICER_FUNCTIONS == [
        "service.api.grpc_parsing.add_kserve_v2",
        "service.api.grpc_parsing.add_attention_v1",
    ]

    async def registered() -> dict[str, Any]:  # a grpc.aio server is made on an event loop
        server = gRPCGenericServer(lambda service_method, streaming_type: None)
        grpc_parsing.add_kserve_v2(AnyServicer(), server)
        grpc_parsing.add_attention_v1(AnyServicer(), server)
        return {
            m: h for [generic] in server.generic_rpc_handlers for m, h in generic._method_handlers.items()
        }

    handlers = asyncio.run(registered())
    services = [*pb.DESCRIPTOR.services_by_name.values(), *apb.DESCRIPTOR.services_by_name.values()]
    assert set(handlers) == {f"/{s.full_name}/{m.name}" for s in services for m in s.methods}
    for method, handler in handlers.items():
        assert isinstance(handler.request_deserializer(b"\xff\xff\xff\xff\x0f"), Undecodable), method
    good = apb.TranslateRequest(model="m", texts=["a"]).SerializeToString()
    assert handlers["/attention.v1.AttentionService/Translate"].request_deserializer(good).texts == ["a"]


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
