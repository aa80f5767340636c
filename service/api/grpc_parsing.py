"""How the gRPC services' requests are parsed, whichever server hosts them: a message protobuf
cannot parse (a string field that is not UTF-8, corrupt bytes) reaches the RPC as
:class:`Undecodable` and is answered INVALID_ARGUMENT — grpc's own parser answered UNKNOWN, and in
``ModelStreamInfer`` it ended the whole stream. :class:`Lenient` is the server as the generated
``add_*_to_server`` functions see it, passing every handler on with that parser: the in-replica
grpc.aio server registers through it (``grpc_aio.add_to_grpc_server``), and Ray's gRPC proxy
(the Ray-ingress frontends) through :func:`add_kserve_v2` and :func:`add_attention_v1`, the
functions ``grpc_servicer_functions`` names. Ray's proxy keeps a handler's request parser and
sends what it parsed to the ingress replica, where the servicer answers it.

protobuf parses on the calling thread, holding the interpreter lock throughout (a thread would
not free the event loop), and its cost is per value and per field, not per byte: 16 M one-byte
``uint_contents`` (16 MB) held every other request of a replica 0.2 s, 60 MB would have held it
≈ 0.9 s; 2 MB of empty ``inputs`` 0.1 s. So a message that could cost more than
``limits.max_grpc_value_bytes`` packed bytes' time (one larger than 1/16 of it: a byte of fields
costs at most 16) is first walked field by field (:func:`value_bytes`: tags and lengths, not
values; a few milliseconds for thousands of fields) and refused (:class:`TooCostly`,
INVALID_ARGUMENT naming the field) when it would. A bytes or string value and packed fixed-width
numbers (FP32, FP64) are copied whole and count nothing: KServe's ``raw_input_contents``,
attention.v1's image, FP32 typed contents pass at any size the message limit allows."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

from service.api.protos import attention_pb2_grpc, grpc_service_pb2_grpc
from service.errors import InvalidInput, PayloadTooLarge
from service.settings import Limits

#: the limit where no settings reach the parser (Ray's proxy reads it from this variable, which
#: ``python -m service`` sets for every Ray process)
VALUE_BYTES_VARIABLE = "ATTN_LIMITS__MAX_GRPC_VALUE_BYTES"
DEFAULT_VALUE_BYTES: int = Limits.model_fields["max_grpc_value_bytes"].default
#: packed numbers protobuf copies as they are, without a parse per value
FIXED_WIDTH = frozenset(
    getattr(FieldDescriptor, f"TYPE_{name}")
    for name in ("FLOAT", "DOUBLE", "FIXED32", "FIXED64", "SFIXED32", "SFIXED64")
)
COPIED = FIXED_WIDTH | {FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES}
#: fields :func:`value_bytes` reads one by one (a KServe BYTES tensor holds up to 4,096 elements,
#: ``limits.max_images``' ceiling, and a few fields around them); past them the rest of the message
#: counts as a field a byte
MAX_FIELDS = 5000
MAX_DEPTH = 16
#: what a field protobuf makes an object of costs, in packed-varint bytes: an empty sub-message
#: (2 bytes) took 100 ns, a packed varint byte 4 ns, so a byte that may be a field counts this many
FIELD_WEIGHT = 16


class Undecodable:
    """A request message that protobuf could not parse, handed to the RPC in its place."""

    def __init__(self, reason: str) -> None:
        self.error = InvalidInput(f"request: not a valid protobuf message ({reason})")


class TooCostly(Undecodable):
    """A request message protobuf would parse value by value beyond the limit, handed to the RPC
    unparsed (:func:`value_bytes`)."""

    def __init__(self, descriptor: Descriptor, charged: dict[str, int], limit: int) -> None:
        field = max(charged, key=charged.__getitem__)
        hint = ""
        if descriptor.full_name == "inference.ModelInferRequest":
            hint = "; send tensors as raw_input_contents (the bytes as they are), or FP32/FP64 contents"
        total = sum(charged.values())
        self.error = PayloadTooLarge(
            f"{field}: parsing would take as long as {charged[field]} bytes of packed integers "
            f"({total} for the request), over the limit of {limit} (limits.max_grpc_value_bytes){hint}"
        )


def value_bytes(descriptor: Descriptor, data: bytes) -> dict[str, int]:
    """The bytes of ``data``, a serialized ``descriptor`` message, that protobuf would parse value
    by value, by field path (``inputs.contents.uint_contents``): packed varints (integers,
    booleans, enums) by their length; past :data:`MAX_FIELDS` fields, :data:`MAX_DEPTH` levels or
    anything malformed, each byte of the rest of the message as a field (:data:`FIELD_WEIGHT`).
    Bytes, strings and packed fixed-width numbers count nothing: protobuf copies them."""
    charged: dict[str, int] = {}
    _walk(descriptor, data, 0, len(data), "", charged, [0], 0)
    return charged


def _walk(
    descriptor: Descriptor | None,
    data: bytes,
    pos: int,
    end: int,
    path: str,
    charged: dict[str, int],
    fields: list[int],
    depth: int,
) -> None:
    table = _fields(descriptor) if descriptor is not None else {}
    try:
        if depth > MAX_DEPTH:
            raise ValueError("too deep")
        while pos < end:
            fields[0] += 1
            if fields[0] > MAX_FIELDS:
                raise ValueError("too many fields")
            tag = data[pos]
            if tag < 0x80:
                pos += 1
            else:
                tag, pos = _varint(data, pos, end)
            wire = tag & 7
            if wire == 0:
                pos = _varint(data, pos, end)[1]
            elif wire == 1 or wire == 5:
                pos += 8 if wire == 1 else 4
            elif wire == 2:
                length, pos = _varint(data, pos, end)
                if pos + length > end:
                    raise ValueError("past the end")
                field = table.get(tag >> 3)
                if field is not None:
                    name, message = field
                    path_name = f"{path}.{name}" if path else name
                    if message is not None:
                        _walk(message, data, pos, pos + length, path_name, charged, fields, depth + 1)
                    else:
                        charged[path_name] = charged.get(path_name, 0) + length  # packed varints
                pos += length
            else:
                raise ValueError("a group or no wire type")  # proto3 has no groups
    except ValueError:  # the rest counts as fields (protobuf refuses what is malformed)
        charged[path or "request"] = charged.get(path or "request", 0) + (end - pos) * FIELD_WEIGHT


@functools.cache
def _fields(descriptor: Descriptor) -> dict[int, tuple[str, Descriptor | None]]:
    """By field number, what a length-delimited field of ``descriptor`` holds: a message (its
    descriptor) or packed varints (its name); copied fields (bytes, strings, fixed-width) are left
    out, as unknown numbers are."""
    return {
        f.number: (f.name, f.message_type)
        for f in descriptor.fields
        if f.message_type is not None or f.type not in COPIED
    }


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while pos < end and shift < 70:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise ValueError("an unfinished varint")


def lenient(
    parse: Callable[[bytes], Any], max_value_bytes: int = DEFAULT_VALUE_BYTES
) -> Callable[[bytes], Any]:
    """``parse`` (a message class's ``FromString``), giving an :class:`Undecodable` where protobuf
    refuses the bytes, and a :class:`TooCostly` for a message it would parse value by value beyond
    ``max_value_bytes``, without parsing it."""
    descriptor: Descriptor = parse.__self__.DESCRIPTOR  # type: ignore[attr-defined]

    def deserialize(data: bytes) -> Any:
        if len(data) * FIELD_WEIGHT > max_value_bytes:  # else within the limit, whatever it holds
            charged = value_bytes(descriptor, data)
            if sum(charged.values()) > max_value_bytes:
                return TooCostly(descriptor, charged, max_value_bytes)
        try:
            return parse(data)
        except DecodeError as exc:
            return Undecodable(str(exc))

    return deserialize


class Lenient:
    """The server as the generated ``add_*_to_server`` functions see it: each method's handler is
    passed on with a request parser that never raises (:func:`lenient`), and through ``wrap``
    (our servicers answer an :class:`Undecodable` request themselves; a servicer that is not ours
    needs a wrap that does, ``grpc_aio._refusing``). ``max_value_bytes``: :func:`lenient`'s."""

    def __init__(
        self,
        server: Any,
        wrap: Callable[[Any], Any] = lambda handler: handler,
        max_value_bytes: int = DEFAULT_VALUE_BYTES,
    ) -> None:
        self.server, self.wrap, self.max_value_bytes = server, wrap, max_value_bytes
        self.services: list[str] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Left out: rebuilt from the same handlers in :meth:`add_registered_method_handlers`."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        parsing = {}
        for name, handler in handlers.items():
            parsing[name] = self.wrap(
                handler._replace(
                    request_deserializer=lenient(handler.request_deserializer, self.max_value_bytes)
                )
            )
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, parsing),))
        self.server.add_registered_method_handlers(service, parsing)
        self.services.append(service)


def add_kserve_v2(servicer: Any, server: Any) -> None:
    """KServe v2's ``GRPCInferenceService`` on ``server`` (Ray's gRPC proxy), parsed leniently."""
    lenient_server = Lenient(server, max_value_bytes=_value_bytes_from_environment())
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, lenient_server)


def add_attention_v1(servicer: Any, server: Any) -> None:
    """``attention.v1.AttentionService`` on ``server`` (Ray's gRPC proxy), parsed leniently."""
    lenient_server = Lenient(server, max_value_bytes=_value_bytes_from_environment())
    attention_pb2_grpc.add_AttentionServiceServicer_to_server(servicer, lenient_server)


def _value_bytes_from_environment() -> int:
    """The limit ``python -m service`` gave Ray's processes, validated as the setting is."""
    limit = os.environ.get(VALUE_BYTES_VARIABLE, DEFAULT_VALUE_BYTES)
    return Limits.model_validate({"max_grpc_value_bytes": limit}).max_grpc_value_bytes
