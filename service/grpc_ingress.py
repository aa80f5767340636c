"""gRPC methods of the ingress, served by Ray Serve's gRPC proxy (port 9000 by default).

Two services share the ingress: the KServe v2 ``inference.GRPCInferenceService`` (stubs generated
from ``service/protos/grpc_service.proto``) and our typed ``attention.v1.AttentionService``. Ray
routes a call to the method of the same name. Errors carry the gRPC code from the table in
``service/errors.py``; RPCs we do not declare answer UNIMPLEMENTED from the server itself.
"""

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
from pydantic import ValidationError
from ray.serve.grpc_util import RayServegRPCContext, gRPCInputStream

from service import auth, kserve
from service.errors import InvalidInput, ServiceError, unexpected, validation_message
from service.protos import attention_pb2 as apb
from service.protos import grpc_service_pb2 as pb
from service.routing import ModelRouter
from service.schemas import ClassifyOptions, TranslateRequest

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
SERVICER_FUNCTIONS = [
    "service.protos.grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server",
    "service.protos.attention_pb2_grpc.add_AttentionServiceServicer_to_server",
]


def _abort(context: RayServegRPCContext, exc: ServiceError) -> ServiceError:
    context.set_code(getattr(grpc.StatusCode, exc.grpc_code))
    context.set_details(exc.message)
    return exc


Reply = TypeVar("Reply")
Method = Callable[[Any, Any, RayServegRPCContext], Awaitable[Reply]]


def rpc(method: Method[Reply]) -> Method[Reply]:
    """The one error mapping of the unary RPCs: a service error leaves with its gRPC code, a
    request field a schema refused with INVALID_ARGUMENT naming it, anything unexpected with
    INTERNAL and a request id that the logged traceback also carries."""

    @functools.wraps(method)  # Ray passes the context by this keyword: the name matters
    async def call(self: Any, request: Any, grpc_context: RayServegRPCContext) -> Reply:
        try:
            return await method(self, request, grpc_context)
        except ServiceError as exc:
            raise _abort(grpc_context, exc) from None
        except ValidationError as exc:
            raise _abort(grpc_context, InvalidInput(validation_message(exc))) from None
        except Exception as exc:
            raise _abort(grpc_context, unexpected(exc, f"gRPC {method.__name__}")) from None

    return call


def _parameter(p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def _inputs(request: pb.ModelInferRequest) -> list[kserve.Tensor]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"raw_input_contents: {len(raw)} entries for {len(request.inputs)} inputs")
    tensors = []
    for i, t in enumerate(request.inputs):
        shape = list(t.shape)
        if raw:
            tensors.append(kserve.from_raw(t.name, t.datatype, shape, raw[i]))
        else:
            field = _CONTENTS_FIELD.get(t.datatype)
            if field is None:
                raise InvalidInput(f"{t.name}: unsupported datatype {t.datatype!r}")
            tensors.append(kserve.from_list(t.name, t.datatype, shape, list(getattr(t.contents, field))))
    return tensors


def _response(
    name: str, version: int, request_id: str, tensors: list[kserve.Tensor]
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=name, model_version=str(version), id=request_id)
    for t in tensors:
        response.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        raw = (
            kserve.serialize_bytes(t.data)
            if t.datatype == "BYTES"
            else np.ascontiguousarray(t.data).tobytes()
        )
        response.raw_output_contents.append(raw)
    return response


def _tensor(shape: list[int], values: Any) -> apb.Tensor:
    return apb.Tensor(shape=shape, values=np.asarray(values, dtype=np.float32).ravel().tolist())


def _metrics(m: dict[str, Any], total_ms: float) -> apb.Metrics:
    return apb.Metrics(
        queue_wait_ms=m["queue_wait_ms"],
        compute_ms=m["compute_ms"],
        total_ms=total_ms,
        batch_size=m["batch_size"],
        tokens_generated=m.get("tokens_generated") or 0,
    )


class GRPCMethods(ModelRouter):
    def _authorize(self, context: RayServegRPCContext) -> None:
        """The bearer token, when one is set (service/auth.py); health RPCs do not call this."""
        auth.check_metadata(self.settings.api_token, context.invocation_metadata())

    # -- KServe v2 ------------------------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await self.is_ready())

    @rpc
    async def ModelReady(
        self, request: pb.ModelReadyRequest, grpc_context: RayServegRPCContext
    ) -> pb.ModelReadyResponse:
        self._authorize(grpc_context)
        self.resolve(request.name, None, request.version)
        return pb.ModelReadyResponse(ready=await self.is_ready())

    @rpc
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, grpc_context: RayServegRPCContext
    ) -> pb.ServerMetadataResponse:
        self._authorize(grpc_context)
        return pb.ServerMetadataResponse(
            name=kserve.SERVER_NAME, version=kserve.SERVER_VERSION, extensions=kserve.EXTENSIONS
        )

    @rpc
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, grpc_context: RayServegRPCContext
    ) -> pb.ModelMetadataResponse:
        self._authorize(grpc_context)
        meta = kserve.metadata(self.resolve(request.name, None, request.version).manifest)
        response = pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"]
        )
        for spec in meta["inputs"]:
            response.inputs.add(**spec)
        for spec in meta["outputs"]:
            response.outputs.add(**spec)
        return response

    @rpc
    async def ModelInfer(
        self, request: pb.ModelInferRequest, grpc_context: RayServegRPCContext
    ) -> pb.ModelInferResponse:
        self._authorize(grpc_context)
        return await self._model_infer(request, "grpc_infer")

    async def ModelStreamInfer(
        self, request_stream: gRPCInputStream, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Bidirectional stream: one response per request, in order; a failed request answers
        with ``error_message`` and the stream goes on (Triton's semantics)."""
        try:
            self._authorize(grpc_context)
        except ServiceError as exc:  # the whole stream is refused
            raise _abort(grpc_context, exc) from None
        async for request in request_stream:
            try:
                result = await self._model_infer(request, "grpc_stream_infer")
                yield pb.ModelStreamInferResponse(infer_response=result)
            except ServiceError as exc:
                yield pb.ModelStreamInferResponse(error_message=exc.message)
            except Exception as exc:  # logged with its traceback; the stream goes on
                error = unexpected(exc, "gRPC ModelStreamInfer")
                yield pb.ModelStreamInferResponse(error_message=error.message)

    async def _model_infer(self, request: pb.ModelInferRequest, route: str) -> pb.ModelInferResponse:
        entry = self.resolve(request.model_name, None, request.model_version)
        params = {k: _parameter(v) for k, v in request.parameters.items()}
        outputs = kserve.requested_outputs(entry.manifest, [o.name for o in request.outputs], params)
        requests = kserve.to_requests(entry.manifest, _inputs(request), params, outputs)
        _, answers, _ = await self.predict_many(entry.name, None, route, requests, request.model_version)
        return _response(
            entry.name, entry.version, request.id, kserve.to_outputs(entry.manifest, answers, outputs)
        )

    # -- attention.v1 ---------------------------------------------------------------------------

    @rpc
    async def Translate(
        self, request: apb.TranslateRequest, grpc_context: RayServegRPCContext
    ) -> apb.TranslateResponse:
        self._authorize(grpc_context)
        body = TranslateRequest(  # the request's fields, checked by the REST schema
            text=list(request.texts),
            beam_size=request.beam_size or 1,
            max_length=request.max_length or None,
            length_penalty=request.length_penalty,
            return_attention=request.return_attention,
        )
        entry, [answer], total = await self.predict_many(
            request.model, "translation", "grpc_translate", [body]
        )
        response = apb.TranslateResponse(
            model=entry.name, version=entry.version, metrics=_metrics(answer["metrics"], total)
        )
        for t in answer["translations"]:
            item = response.translations.add(
                text=t["text"],
                source_tokens=t["source_tokens"],
                target_tokens=t["target_tokens"],
                score=t["score"],
                finished=t["finished"],
            )
            if "attention" in t:
                item.attention.CopyFrom(_tensor(t["attention"]["shape"], t["attention"]["values"]))
        return response

    @rpc
    async def Classify(
        self, request: apb.ClassifyRequest, grpc_context: RayServegRPCContext
    ) -> apb.ClassifyResponse:
        self._authorize(grpc_context)
        options = ClassifyOptions(
            top_k=request.top_k or 5,
            return_attention=request.return_attention,
            head_fusion=request.head_fusion or "mean",
        )
        entry, [answer], total = await self.predict_many(
            request.model, "image-classification", "grpc_classify", [(options, request.image)]
        )
        response = apb.ClassifyResponse(
            model=entry.name, version=entry.version, metrics=_metrics(answer["metrics"], total)
        )
        for p in answer["predictions"]:
            response.predictions.add(label=p["label"], index=p["index"], probability=p["probability"])
        if "attention" in answer:
            response.rollout.CopyFrom(_tensor(answer["attention"]["shape"], answer["attention"]["values"]))
        return response
