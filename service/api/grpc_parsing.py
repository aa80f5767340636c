"""How the gRPC services' requests are parsed, whichever server hosts them: a message protobuf
cannot parse (a string field that is not UTF-8, corrupt bytes) reaches the RPC as
:class:`Undecodable` and is answered INVALID_ARGUMENT — grpc's own parser answered UNKNOWN, and in
``ModelStreamInfer`` it ended the whole stream. :class:`Lenient` is the server as the generated
``add_*_to_server`` functions see it, passing every handler on with that parser: the in-replica
grpc.aio server registers through it (``grpc_aio.add_to_grpc_server``), and Ray's gRPC proxy
(the Ray-ingress frontends) through :func:`add_kserve_v2` and :func:`add_attention_v1`, the
functions ``grpc_servicer_functions`` names. Ray's proxy keeps a handler's request parser and
sends what it parsed to the ingress replica, where the servicer answers it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from service.api.protos import attention_pb2_grpc, grpc_service_pb2_grpc
from service.errors import InvalidInput


class Undecodable:
    """A request message that protobuf could not parse, handed to the RPC in its place."""

    def __init__(self, reason: str) -> None:
        self.error = InvalidInput(f"request: not a valid protobuf message ({reason})")


def lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """``parse``, giving an :class:`Undecodable` where protobuf refuses the bytes."""

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return Undecodable(str(exc))

    return deserialize


class Lenient:
    """The server as the generated ``add_*_to_server`` functions see it: each method's handler is
    passed on with a request parser that never raises (:func:`lenient`), and through ``wrap``
    (our servicers answer an :class:`Undecodable` request themselves; a servicer that is not ours
    needs a wrap that does, ``grpc_aio._refusing``)."""

    def __init__(self, server: Any, wrap: Callable[[Any], Any] = lambda handler: handler) -> None:
        self.server, self.wrap = server, wrap
        self.services: list[str] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Left out: rebuilt from the same handlers in :meth:`add_registered_method_handlers`."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        parsing = {}
        for name, handler in handlers.items():
            parsing[name] = self.wrap(
                handler._replace(request_deserializer=lenient(handler.request_deserializer))
            )
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, parsing),))
        self.server.add_registered_method_handlers(service, parsing)
        self.services.append(service)


def add_kserve_v2(servicer: Any, server: Any) -> None:
    """KServe v2's ``GRPCInferenceService`` on ``server`` (Ray's gRPC proxy), parsed leniently."""
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, Lenient(server))


def add_attention_v1(servicer: Any, server: Any) -> None:
    """``attention.v1.AttentionService`` on ``server`` (Ray's gRPC proxy), parsed leniently."""
    attention_pb2_grpc.add_AttentionServiceServicer_to_server(servicer, Lenient(server))
