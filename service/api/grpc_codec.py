"""The gRPC codec: KServe v2 protobuf messages into the core's tensors and back, and the typed
``attention.v1`` messages into jobs and from answers — once each way, as ``rest_codec.py`` does
for REST. ``grpc_servicer.py`` holds the RPCs."""

from typing import Any

import numpy as np

from service.api import kserve_tensors
from service.api.protos import attention_pb2 as apb
from service.api.protos import grpc_service_pb2 as pb
from service.api.rest_codec import translate_job as rest_translate_job
from service.api.schemas import TranslateRequest, text_problem
from service.errors import InvalidInput, PayloadTooLarge
from service.inference import attention as maps
from service.inference.jobs import Answer, AnswerMetrics, TokenEvent, Translated, TranslateJob

_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
#: what Ray's gRPC proxy registers (``grpc_servicer_functions``)


def parameter(p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def classification(request: pb.ModelInferRequest) -> dict[str, Any]:
    """Output name → its ``classification`` parameter (Triton's extension), where one is given."""
    return {
        o.name: parameter(o.parameters["classification"])
        for o in request.outputs
        if "classification" in o.parameters
    }


def check_counts(request: pb.ModelInferRequest) -> None:
    """Inputs, outputs and parameters within their bounds, before any is read: repeated fields of
    millions of empty entries fit in a message (walking 33 million outputs took ≈ 14 s)."""
    kserve_tensors.check_counts(len(request.inputs), len(request.outputs), len(request.parameters))


def inputs(request: pb.ModelInferRequest, max_items: int) -> list[kserve_tensors.Tensor]:
    """The request's tensors; ``max_items``: the most elements a BYTES input may hold
    (``limits.tensor_items``)."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"raw_input_contents: {len(raw)} entries for {len(request.inputs)} inputs")
    tensors = []
    for i, t in enumerate(request.inputs):
        shape = list(t.shape[: kserve_tensors.MAX_DIMS + 1])  # one more is refused as it is
        if raw:
            if t.HasField("contents"):  # Triton refuses both: which one would be the data?
                raise InvalidInput(f"{t.name}: contents must not be given with raw_input_contents")
            tensors.append(kserve_tensors.from_raw(t.name, t.datatype, shape, raw[i], max_items))
        else:
            field = _CONTENTS_FIELD.get(t.datatype)
            if field is None:
                raise InvalidInput(f"{t.name}: unsupported datatype {t.datatype!r}")
            contents = getattr(t.contents, field)  # read by numpy as it is, not as a list
            if t.datatype in _NARROWER:
                contents = _in_range(t.name, t.datatype, contents)
            tensors.append(kserve_tensors.from_list(t.name, t.datatype, shape, contents, max_items))
    return tensors


#: integer datatypes carried in a wider field (int_contents: int32, uint_contents: uint32)
_NARROWER = {"INT8", "INT16", "UINT8", "UINT16"}


def _in_range(name: str, datatype: str, contents: Any) -> np.ndarray:
    """A narrower datatype's values from its wider field, refused outside its range: numpy's cast
    would wrap them (999 as UINT8 read 231, a pixel the client never sent), where the same values
    as HTTP JSON are refused."""
    wide = np.asarray(contents, dtype=np.int64)
    info = np.iinfo(kserve_tensors.NUMPY_OF[datatype])
    if wide.size and (wide.min() < info.min or wide.max() > info.max):
        raise InvalidInput(f"{name}: values outside the range of {datatype} ({info.min} to {info.max})")
    return wide


def response(
    name: str, version: int, request_id: str, tensors: list[kserve_tensors.Tensor]
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=name, model_version=str(version), id=request_id)
    for t in tensors:
        response.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        raw = (
            kserve_tensors.serialize_bytes(t.data)
            if t.datatype == "BYTES"
            else np.ascontiguousarray(t.data).tobytes()
        )
        response.raw_output_contents.append(raw)
    return response


#: the tag of ``Tensor.values`` (packed floats: length-delimited)
_VALUES_TAG = bytes([apb.Tensor.DESCRIPTOR.fields_by_name["values"].number << 3 | 2])


def tensor_bytes(values: np.ndarray) -> bytes:
    """An ``attention.v1.Tensor`` of ``values`` as wire bytes, its floats written as they lie
    (little-endian float32, the packed encoding): protobuf copies them whole when it reads them,
    where a list of floats was built and read value by value (64 maps of 128 × 64 held the event
    loop 49 ms that way, 2 ms this way)."""
    floats = np.ascontiguousarray(values, dtype="<f4").tobytes()
    shape = apb.Tensor(shape=list(values.shape)).SerializeToString()
    return shape + _VALUES_TAG + varint(len(floats)) + floats


def varint(n: int) -> bytes:
    """``n`` (≥ 0) as a protobuf varint: seven bits a byte, the lowest first."""
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def metrics(m: AnswerMetrics, total_ms: float) -> apb.Metrics:
    return apb.Metrics(
        queue_wait_ms=m.queue_wait_ms,
        compute_ms=m.compute_ms,
        total_ms=total_ms,
        batch_size=m.batch_size,
        tokens_generated=m.tokens_generated or 0,
        time_to_first_token_ms=m.time_to_first_token_ms or 0.0,
        time_per_output_token_ms=m.time_per_output_token_ms or 0.0,
        replica=m.replica,
        node=m.node,
    )


def translate_job(request: apb.TranslateRequest, max_texts: int) -> TranslateJob:
    """The request's fields, checked by the REST schema; messages name its ``texts``. More than
    ``max_texts`` texts are refused before any is read (a message holds millions of short ones)."""
    if len(request.texts) > max_texts:
        raise PayloadTooLarge(f"texts: {len(request.texts)} texts exceed the limit of {max_texts}")
    if (problem := text_problem(request.texts, "texts")) is not None:
        raise InvalidInput(problem)
    return rest_translate_job(
        TranslateRequest(
            text=list(request.texts),
            beam_size=request.beam_size or 1,
            max_length=request.max_length or None,
            length_penalty=request.length_penalty,
            return_attention=request.return_attention,
            truncate=request.truncate,
        ),
        "texts",
    )


def translate_response(
    name: str, version: int, answer: Answer, total: float, attention: bool
) -> apb.TranslateResponse:
    assert isinstance(answer.result, Translated)
    response = apb.TranslateResponse(model=name, version=version, metrics=metrics(answer.metrics, total))
    for t in answer.result.translations:
        item = response.translations.add(
            text=t.text,
            source_tokens=t.source_tokens,
            target_tokens=t.target_tokens,
            score=t.score,
            finished=t.finished,
        )
        if attention:
            item.attention.MergeFromString(tensor_bytes(maps.alignment(t.attention)))
    return response


def token(event: TokenEvent) -> apb.Token:
    token = apb.Token(
        text_index=event.text_index, index=event.index, token=event.token, token_id=event.token_id,
        text=event.piece, logprob=event.logprob,
    )  # fmt: skip
    if event.alignment is not None:
        token.attention.MergeFromString(tensor_bytes(event.alignment))
    return token
