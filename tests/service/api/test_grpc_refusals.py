"""What the gRPC services refuse, on a real grpc.aio server over fake models (``with_servicer``):
each refusal's status code and a message naming the field as gRPC names it, bounds checked
before a request's repeated fields are walked, messages protobuf cannot parse or would parse
value by value beyond the limit, and every refusal counted in the request metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from service.api import kserve_tensors
from service.api.protos import attention_pb2 as apb
from service.api.protos import attention_pb2_grpc as apb_grpc
from service.api.protos import grpc_service_pb2 as pb
from service.api.protos import grpc_service_pb2_grpc as pb_grpc
from tests.service.api.test_grpc_servicer import with_servicer
from tests.service.fakes import fake_server


def _infer(name: str, datatype: str, shape: list[int], raw: bytes = b"", outputs: int = 0) -> Any:
    request = pb.ModelInferRequest(model_name="fake-classifier")
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    for _ in range(outputs):
        request.outputs.add()
    return lambda channel: pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)


def _typed(datatype: str, field: str, values: list[int]) -> Any:
    """A ModelInfer whose PIXELS come in the typed ``contents`` field ``field``."""
    request = pb.ModelInferRequest(model_name="fake-classifier")
    tensor = request.inputs.add(name="PIXELS", datatype=datatype, shape=[1, 1, len(values)])
    getattr(tensor.contents, field).extend(values)
    return lambda channel: pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)


def _translate(texts: list[str]) -> Any:
    request = apb.TranslateRequest(model="fake-translator", texts=texts)
    return lambda channel: apb_grpc.AttentionServiceStub(channel).Translate(request)


@pytest.mark.parametrize(
    ("call", "code", "words"),
    [
        (
            lambda c: apb_grpc.AttentionServiceStub(c).Translate(
                apb.TranslateRequest(model="nope", texts=["x"])
            ),
            grpc.StatusCode.NOT_FOUND,
            "model 'nope' not found",
        ),
        # named as gRPC names the field (the REST schema's message said text[0])
        (_translate([""]), grpc.StatusCode.INVALID_ARGUMENT, "texts[0]: must not be empty"),
        (_translate([]), grpc.StatusCode.INVALID_ARGUMENT, "texts: give at least one text"),
        # refused from the count, before millions of short texts are read
        (
            _translate(["a"] * 65),
            grpc.StatusCode.INVALID_ARGUMENT,
            "texts: 65 texts exceed the limit of 64",
        ),
        (
            lambda c: apb_grpc.AttentionServiceStub(c).Translate(
                apb.TranslateRequest(model="fake-classifier", texts=["x"])
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "not translation",
        ),
        (
            lambda c: apb_grpc.AttentionServiceStub(c).Classify(
                apb.ClassifyRequest(model="fake-classifier", image=b"junk")
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "image: not a decodable image",
        ),
        # beside a zero the product of the dimensions passed, and numpy's refusal was INTERNAL
        (_infer("PIXELS", "UINT8", [0, 1 << 62, 2]), grpc.StatusCode.INVALID_ARGUMENT, "PIXELS: shape"),
        (
            _infer("IMAGE", "BYTES", [7_000_000]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "IMAGE: shape holds 7000000",
        ),
        (
            _infer("PIXELS", "UINT8", [2_000_000, 1, 1], bytes(2_000_000)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "PIXELS: 2000000 images exceed the limit of 64 per request",
        ),
        # a zero beside dimensions numpy cannot address together
        (
            _infer("PIXELS", "UINT8", [0, 1 << 26, 1 << 26, 1 << 26]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "PIXELS: shape",
        ),
        # a narrower type than its field: numpy's cast wrapped 999 to a pixel of 231
        (
            _typed("UINT8", "uint_contents", [1, 2, 3, 999]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "PIXELS: values outside the range of UINT8 (0 to 255)",
        ),
        (
            _typed("INT16", "int_contents", [-40_000, 5]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "PIXELS: values outside the range of INT16 (-32768 to 32767)",
        ),
        # counted before they are walked: thousands of empty outputs fit in a message
        (
            _infer("PIXELS", "UINT8", [1, 2, 2], bytes(4), outputs=6000),
            grpc.StatusCode.INVALID_ARGUMENT,
            "outputs: 6000 entries, at most 16 per request",
        ),
        # and 100,000 (200 kB) would hold the event loop while protobuf parses them: not parsed
        (
            _infer("PIXELS", "UINT8", [1, 2, 2], bytes(4), outputs=100_000),
            grpc.StatusCode.INVALID_ARGUMENT,
            "request: parsing would take as long as",
        ),
    ],
)
def test_errors_carry_their_codes(tmp_path: Path, call: Any, code: grpc.StatusCode, words: str) -> None:
    async def use(channel: grpc.aio.Channel) -> Any:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call(channel)
        return failure.value

    error = with_servicer(tmp_path, use)
    assert error.code() == code and words in error.details(), error.details()


def test_contents_beside_raw_input_contents_are_refused(tmp_path: Path) -> None:
    """Triton: "contents field must not be specified when using raw_input_contents" — one of the
    two would be dropped without a word."""
    request = pb.ModelInferRequest(model_name="fake-translator", id="both")
    text = request.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(b"junk")
    request.raw_input_contents.append(kserve_tensors.serialize_bytes(np.array([b"ab"], dtype=object)))

    async def use(channel: grpc.aio.Channel) -> Any:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
        return failure.value

    error = with_servicer(tmp_path, use)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "TEXT: contents must not be given with raw_input_contents"


def test_requests_refused_while_decoded_are_counted(tmp_path: Path) -> None:
    """A schema refusal (an empty text) or an unknown model, before the request reaches Server's
    own recording: counted with its status like every other refusal."""
    server, _, _, recorded = fake_server(tmp_path)

    async def use(channel: grpc.aio.Channel) -> None:
        stub = apb_grpc.AttentionServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Translate(apb.TranslateRequest(model="fake-translator", texts=[""]))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Classify(apb.ClassifyRequest(model="fake-classifier", top_k=5000, image=b"x"))
        v2 = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError):
            await v2.ModelInfer(pb.ModelInferRequest(model_name="nope"))
        unreadable = pb.ModelInferRequest(model_name="fake-translator")  # a stream flag that is no flag
        unreadable.parameters["stream"].string_param = "maybe"

        async def one() -> Any:
            yield unreadable

        [reply] = [r async for r in v2.ModelStreamInfer(one())]
        assert "stream" in reply.error_message

    with_servicer(tmp_path, use, server)
    assert recorded.records == [
        ("fake-translator", "grpc_translate", 422),
        ("fake-classifier", "grpc_classify", 422),
        ("_unknown", "grpc_infer", 404),
        ("fake-translator", "grpc_stream_infer", 422),
    ]


def test_a_request_protobuf_cannot_parse_is_invalid_argument(tmp_path: Path) -> None:
    """A string field that is not UTF-8: INVALID_ARGUMENT naming the request (grpc's own parser
    answered UNKNOWN), and in ModelStreamInfer an error for that message while the stream goes on."""
    model = b"fake-translator"
    bad = b"\x0a" + bytes([len(model)]) + model + b"\x12\x02\xff\xfe"  # texts: ["\xff\xfe"]
    good = pb.ModelInferRequest(model_name="fake-translator", id="g")
    good.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
    good.raw_input_contents.append(kserve_tensors.serialize_bytes(np.array([b"ab"], dtype=object)))
    bad_infer = b"\x0a\x02\xff\xfe"  # model_name: "\xff\xfe"

    async def use(channel: grpc.aio.Channel) -> Any:
        translate = channel.unary_unary("/attention.v1.AttentionService/Translate")
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await translate(bad)
        streamed = channel.unary_stream("/attention.v1.AttentionService/TranslateStream")
        with pytest.raises(grpc.aio.AioRpcError) as stream_failure:
            [reply async for reply in streamed(bad)]

        async def requests() -> Any:
            for message in (good.SerializeToString(), bad_infer, good.SerializeToString()):
                yield message

        infer = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        replies = [pb.ModelStreamInferResponse.FromString(r) async for r in infer(requests())]
        return failure.value, stream_failure.value, replies

    error, stream_error, replies = with_servicer(tmp_path, use)
    for e in (error, stream_error):
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid protobuf message" in e.details()
    assert [r.error_message != "" for r in replies] == [False, True, False]
    assert replies[2].infer_response.id == "g"


def test_a_request_protobuf_would_parse_value_by_value_beyond_the_limit_is_refused_unparsed(
    tmp_path: Path,
) -> None:
    """Typed UINT8 contents over ``limits.max_grpc_value_bytes`` (64 KiB here): INVALID_ARGUMENT
    naming the field and the limit, and in ModelStreamInfer an error for that message while the
    stream goes on; the same values as raw_input_contents, FP32 contents of the same byte size
    and a message of long texts are served."""
    values = 100_000  # each 200 (two bytes as a varint): 200,000 bytes, over 65,536
    typed = pb.ModelInferRequest(model_name="fake-classifier", id="typed")
    pixels = typed.inputs.add(name="PIXELS", datatype="UINT8", shape=[1, 250, 400])
    pixels.contents.uint_contents.extend([200] * values)
    raw = pb.ModelInferRequest(model_name="fake-classifier", id="raw")
    raw.inputs.add(name="PIXELS", datatype="UINT8", shape=[1, 250, 400])
    raw.raw_input_contents.append(bytes([200]) * values)
    floats = pb.ModelInferRequest(model_name="fake-classifier", id="fp32")
    floats.inputs.add(name="PIXELS", datatype="FP32", shape=[1, 250, 400])
    floats.inputs[0].contents.fp32_contents.extend([0.5] * values)
    texts = apb.TranslateRequest(model="fake-translator", texts=["ab " * 1300] * 64)  # 64 × 3,900 chars
    assert min(len(m.SerializeToString()) for m in (typed, raw, floats, texts)) > 65_536

    async def use(channel: grpc.aio.Channel) -> Any:
        v2 = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await v2.ModelInfer(typed)
        served = [(await v2.ModelInfer(m)).id for m in (raw, floats)]
        translated = await apb_grpc.AttentionServiceStub(channel).Translate(texts)

        async def requests() -> Any:
            for message in (raw, typed, floats):
                yield message

        replies = [r async for r in v2.ModelStreamInfer(requests())]
        return failure.value, served, len(translated.translations), replies

    error, served, translations, replies = with_servicer(
        tmp_path, use, limits={"max_grpc_value_bytes": 65_536, "max_text_chars": 4096}
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(
        "inputs.contents.uint_contents: parsing would take as long as 200000 bytes of packed integers "
        "(200005 for the request), over the limit of 65536 (limits.max_grpc_value_bytes); send "
        "tensors as raw_input_contents"
    ), error.details()
    assert served == ["raw", "fp32"] and translations == 64
    assert [r.error_message[:29] for r in replies] == ["", "inputs.contents.uint_contents", ""]
    assert [r.infer_response.id for r in replies] == ["raw", "", "fp32"]
