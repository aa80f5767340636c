"""What nobody expected still leaves in the documented shape, without Ray: over HTTP a JSON 500
``{"error": …}`` naming a request id, over gRPC INTERNAL with that message, and in both cases a
log line carrying the same id and the traceback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from pydantic import BaseModel, ValidationError

from service.api import limits
from service.api.grpc_aio import add_to_grpc_server
from service.api.grpc_servicer import rpc
from service.api.http import create_app
from service.api.protos import attention_pb2 as apb
from service.api.protos import attention_pb2_grpc as apb_grpc
from service.api.schemas import ClassifyRequest, TranslateRequest
from service.errors import MAX_MESSAGE_CHARS, InvalidInput, ModelNotFound, PayloadTooLarge, validation_message
from service.settings import Limits

REQUEST_ID = re.compile(r"request id ([0-9a-f]{16})")


class BrokenServer:
    """A server whose model lookup fails in a way no handler expects (a bug, say)."""

    class settings:
        api_token = None
        trusted_origins = ()
        limits = Limits()

    in_flight = 0  # the app counts each exchange on its server (Server.drain)

    @contextlib.contextmanager
    def refusals(self, *args: Any) -> Iterator[None]:
        yield

    async def read_body(self, request: Any) -> bytes:
        return b"{}"

    def resolve(self, name: str, *args: Any) -> Any:
        if name == "missing":
            raise ModelNotFound(f"model {name!r} not found")
        raise KeyError("a bug far below the API")


async def asgi_get(path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [], "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip
    await create_app(BrokenServer())(scope, receive, send)  # type: ignore[arg-type]
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/models/anything"), ("POST", "/v1/models/anything/classify")],  # the second: the hot path
)
def test_an_unexpected_exception_is_a_json_500_with_a_logged_request_id(
    caplog: pytest.LogCaptureFixture, method: str, path: str
) -> None:
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        logging.getLogger("ray.serve").addHandler(caplog.handler)  # Ray may stop its propagation
        try:
            status, headers, body = asyncio.run(asgi_get(path, method))
        finally:
            logging.getLogger("ray.serve").removeHandler(caplog.handler)
    assert status == 500 and headers["content-type"] == "application/json"
    message = json.loads(body)["error"]
    request_id = REQUEST_ID.search(message).group(1)  # type: ignore[union-attr]
    assert headers["x-request-id"] == request_id
    record = next(r for r in caplog.records if request_id in r.getMessage())
    assert f"{method} {path}" in record.getMessage()
    assert record.exc_info and record.exc_info[0] is KeyError  # the traceback is in the log


def test_expected_errors_keep_their_status() -> None:
    status, _, body = asyncio.run(asgi_get("/v1/models/missing"))
    assert status == 404 and "not found" in json.loads(body)["error"]


class Methods:
    """gRPC methods with the service's error mapping, one of them broken."""

    METHODS = ("Translate",)

    @rpc
    async def Translate(self, request: apb.TranslateRequest, grpc_context: Any) -> apb.TranslateResponse:
        if request.model == "missing":
            raise ModelNotFound("model 'missing' not found")
        raise ZeroDivisionError("a bug far below the API")


def test_grpc_answers_internal_with_the_request_id(caplog: pytest.LogCaptureFixture) -> None:
    async def call(model: str) -> grpc.aio.AioRpcError:
        server = grpc.aio.server()
        add_to_grpc_server(server, Methods())  # type: ignore[arg-type]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = apb_grpc.AttentionServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    await stub.Translate(apb.TranslateRequest(model=model, texts=["x"]), timeout=10)
                return failure.value
        finally:
            await server.stop(None)

    logging.getLogger("ray.serve").addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.ERROR, logger="ray.serve"):
            error = asyncio.run(call("any"))
            missing = asyncio.run(call("missing"))
    finally:
        logging.getLogger("ray.serve").removeHandler(caplog.handler)
    assert error.code() == grpc.StatusCode.INTERNAL
    request_id = REQUEST_ID.search(error.details() or "").group(1)  # type: ignore[union-attr]
    record = next(r for r in caplog.records if request_id in r.getMessage())
    assert record.exc_info and record.exc_info[0] is ZeroDivisionError
    assert missing.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("model", "body", "message"),
    [
        (TranslateRequest, {"text": []}, "text: give at least one text"),
        (TranslateRequest, {"text": ["a", " "]}, "text[1]: must not be empty"),
        (ClassifyRequest, {}, "body: give exactly one of image (base64) or pixels"),
        (
            TranslateRequest,
            {"text": "x", "beam_size": 0},
            "beam_size: Input should be greater than or equal to 1",
        ),
    ],
)
def test_a_schema_error_names_its_field_without_pydantic_s_prefix(
    model: type[BaseModel], body: dict[str, Any], message: str
) -> None:
    """A request-wide check's message already names its field: no "body: Value error, " before it."""
    with pytest.raises(ValidationError) as failure:
        model.model_validate(body)
    assert validation_message(failure.value) == message


def test_a_body_that_is_not_json_is_named_as_the_body() -> None:
    with pytest.raises(ValidationError) as failure:
        TranslateRequest.model_validate_json(b"")
    assert validation_message(failure.value).startswith("body: Invalid JSON")


def test_a_long_message_is_cut() -> None:
    """An error may repeat what a client sent: a 20 KB tensor name made a gRPC status over 16 KiB,
    which reached the client as RESOURCE_EXHAUSTED instead of the error."""
    error = InvalidInput(f"input {'x' * 20_000!r}: unknown")
    assert len(error.message) < MAX_MESSAGE_CHARS + 40 and error.message.endswith("(20017 characters)")
    assert str(error) == error.message and InvalidInput("short").message == "short"


def test_a_message_names_its_first_problems_and_counts_the_rest() -> None:
    with pytest.raises(ValidationError) as failure:
        TranslateRequest.model_validate({"text": [1] * 30})  # the string variant's problem, then 30
    message = validation_message(failure.value)
    assert message.count("Input should be a valid string") == 20 and message.endswith("; 11 more problems")
    assert message.startswith("text.str: Input should be a valid string; text.list[str].0: ")


def test_a_list_of_texts_past_the_ceiling_is_refused_before_its_items_are_read() -> None:
    with pytest.raises(ValidationError) as failure:
        TranslateRequest.model_validate_json(b'{"text": [' + b",".join([b"1"] * 100_000) + b"]}")
    assert failure.value.error_count() == 2  # not one per item
    refusal = limits.over_ceiling(failure.value, Limits(max_texts=64))
    assert isinstance(refusal, PayloadTooLarge)
    assert str(refusal) == "text: 100000 texts exceed the limit of 64"
    with pytest.raises(ValidationError) as other:
        TranslateRequest.model_validate({"text": "x", "beam_size": 0})
    assert limits.over_ceiling(other.value, Limits()) is None
