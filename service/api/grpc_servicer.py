"""gRPC over one :class:`~service.api.server.Server`: the KServe v2 ``inference.GRPCInferenceService``
(stubs generated from ``service/api/protos/grpc_service.proto``) and our typed
``attention.v1.AttentionService``, both in :class:`GrpcServicer`.

The hosting layer serves it with grpc.aio (``service/api/grpc_aio.py``, in-replica) or lets Ray's
gRPC proxy call its methods by name (Ray ingress). Errors carry the gRPC code from the table in
``service/errors.py`` (:func:`rpc`); RPCs we do not declare answer UNIMPLEMENTED.
"""

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf import json_format
from pydantic import ValidationError

from service.api import auth, grpc_stream, kserve, triton_extensions
from service.api import grpc_codec as codec
from service.api.grpc_parsing import Undecodable
from service.api.limits import tensor_items
from service.api.protos import attention_pb2 as apb
from service.api.protos import grpc_service_pb2 as pb
from service.api.rest_codec import classify_job
from service.api.schemas import ClassifyOptions
from service.api.server import Server
from service.errors import InvalidInput, ModelNotFound, ServiceError, unexpected, validation_message
from service.inference.jobs import Answer, Classified

#: what Ray's gRPC proxy registers (the Ray-ingress frontends): both services, parsed leniently
SERVICER_FUNCTIONS = ["service.api.grpc_parsing.add_kserve_v2", "service.api.grpc_parsing.add_attention_v1"]


class GrpcContext(Protocol):
    """What the RPCs use of their context: grpc.aio's (in-replica) and Ray's proxy's both have it."""

    def set_code(self, code: grpc.StatusCode) -> None: ...
    def set_details(self, details: str) -> None: ...
    def invocation_metadata(self) -> Any: ...


def _abort(context: GrpcContext, exc: ServiceError) -> ServiceError:
    context.set_code(getattr(grpc.StatusCode, exc.grpc_code))
    context.set_details(exc.message)
    return exc


Reply = TypeVar("Reply")
#: requests of one ``ModelStreamInfer`` stream in the server at a time (its first ones take a
#: model's queue places like as many unary clients: ``limits.max_queued_requests`` is 128)
STREAM_WINDOW = 16


def _raw(output: str) -> bool:
    """Every output of a KServe v2 gRPC answer is written as raw bytes (``raw_output_contents``)."""
    return True


def _stream_error(
    request: pb.ModelInferRequest, message: str, decoupled: bool = False
) -> pb.ModelStreamInferResponse:
    """A failed request's answer in a stream, naming the request (its id, model and version); a
    decoupled request's is its last response, flagged ``triton_final_response`` like an answer."""
    which = pb.ModelInferResponse(
        id=request.id, model_name=request.model_name, model_version=request.model_version
    )
    if decoupled:
        which.parameters["triton_final_response"].bool_param = True
    return pb.ModelStreamInferResponse(error_message=message, infer_response=which)


Method = Callable[[Any, Any, GrpcContext], Awaitable[Reply]]


def rpc(method: Method[Reply]) -> Method[Reply]:
    """The one error mapping of the unary RPCs: a service error leaves with its gRPC code, a
    request field a schema refused with INVALID_ARGUMENT naming it, anything unexpected with
    INTERNAL and a request id that the logged traceback also carries."""

    @functools.wraps(method)  # Ray passes the context by this keyword: the name matters
    async def call(self: Any, request: Any, grpc_context: GrpcContext) -> Reply:
        try:
            if isinstance(request, Undecodable):  # parsed by Ray's proxy (grpc.aio's: grpc_aio)
                self._authorize(grpc_context)  # a caller without the token learns only that
                raise request.error
            return await method(self, request, grpc_context)
        except ServiceError as exc:
            raise _abort(grpc_context, exc) from None
        except ValidationError as exc:
            raise _abort(grpc_context, InvalidInput(validation_message(exc))) from None
        except Exception as exc:
            raise _abort(grpc_context, unexpected(exc, f"gRPC {method.__name__}")) from None

    return call


class GrpcServicer:
    """Both gRPC services over one :class:`Server`: the hosting layer serves an instance with
    grpc.aio (in-replica) or lets Ray's gRPC proxy call its methods (Ray ingress). Every RPC
    takes ``(request, grpc_context)`` — Ray passes the context by that keyword."""

    #: the RPCs implemented here; the others answer UNIMPLEMENTED from the generated base classes
    METHODS = (
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
        "ModelStreamInfer", "ModelConfig", "ModelStatistics", "RepositoryIndex", "Translate",
        "TranslateStream", "Classify",
    )  # fmt: skip

    def __init__(self, server: Server) -> None:
        self.server = server

    def _authorize(self, context: GrpcContext) -> None:
        """The bearer token, when one is set (service/api/auth.py); health RPCs do not call this."""
        auth.check_metadata(self.server.settings.api_token, context.invocation_metadata())

    # -- KServe v2 ------------------------------------------------------------------------------

    @rpc
    async def ServerLive(
        self, request: pb.ServerLiveRequest, grpc_context: GrpcContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc
    async def ServerReady(
        self, request: pb.ServerReadyRequest, grpc_context: GrpcContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await self.server.is_ready())

    @rpc
    async def ModelReady(
        self, request: pb.ModelReadyRequest, grpc_context: GrpcContext
    ) -> pb.ModelReadyResponse:
        self._authorize(grpc_context)
        try:  # Triton's answer for a model or version it does not serve: not ready, no error
            self.server.resolve(request.name, None, request.version)
        except ModelNotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=await self.server.is_ready())

    @rpc
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, grpc_context: GrpcContext
    ) -> pb.ServerMetadataResponse:
        self._authorize(grpc_context)
        return pb.ServerMetadataResponse(
            name=kserve.SERVER_NAME, version=kserve.SERVER_VERSION, extensions=kserve.EXTENSIONS
        )

    @rpc
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, grpc_context: GrpcContext
    ) -> pb.ModelMetadataResponse:
        self._authorize(grpc_context)
        entry = self.server.resolve(request.name, None, request.version)
        meta = kserve.metadata(entry.manifest, self.server.settings.limits)
        response = pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"]
        )
        for spec in meta["inputs"]:
            response.inputs.add(**spec)
        for spec in meta["outputs"]:
            response.outputs.add(**spec)
        for key, value in meta["parameters"].items():
            response.parameters[key].int64_param = value
        return response

    @rpc
    async def ModelInfer(
        self, request: pb.ModelInferRequest, grpc_context: GrpcContext
    ) -> pb.ModelInferResponse:
        self._authorize(grpc_context)
        return await self._model_infer(request, "grpc_infer")

    async def ModelStreamInfer(
        self, request_stream: AsyncIterator[pb.ModelInferRequest], grpc_context: GrpcContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Bidirectional stream, with Triton's semantics (``service/api/grpc_stream.py``): the
        requests are computed concurrently as they arrive, up to :data:`STREAM_WINDOW` at a time,
        and answered in the order they came; a failed request answers with ``error_message`` and
        the stream goes on. A translation request with the parameter ``stream: true`` is answered
        as a decoupled model does in Triton, as its responses are made: one per output token
        (``kserve.token_outputs``), then the whole answer, each flagged ``triton_final_response``
        (true on the last)."""
        try:
            self._authorize(grpc_context)
        except ServiceError as exc:  # the whole stream is refused
            raise _abort(grpc_context, exc) from None
        replies = grpc_stream.answer_in_order(
            request_stream, self._stream_replies, _decoupled, _failed, STREAM_WINDOW
        )
        async with contextlib.aclosing(replies):  # closed with this RPC: its requests are cancelled
            async for reply in replies:
                yield reply

    async def _stream_replies(
        self, request: "pb.ModelInferRequest | Undecodable"
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """One request of a ``ModelStreamInfer`` stream: its answer, its tokens then its answer
        (``stream: true``), or its error."""
        if isinstance(request, Undecodable):  # this message only: the stream goes on
            yield pb.ModelStreamInferResponse(error_message=request.error.message)
            return
        decoupled = False
        try:
            with self.server.refusals(request.model_name, "grpc_stream_infer"):  # counted, as refused
                decoupled = _stream_flag(request)  # a flag neither true nor false: an error
            if decoupled:
                async for response in self._model_stream(request):
                    yield pb.ModelStreamInferResponse(infer_response=response)
                return
            result = await self._model_infer(request, "grpc_stream_infer")
            yield pb.ModelStreamInferResponse(infer_response=result)
        except ServiceError as exc:
            yield _stream_error(request, exc.message, decoupled)
        except Exception as exc:  # logged with its traceback; the stream goes on
            yield _stream_error(request, unexpected(exc, "gRPC ModelStreamInfer").message, decoupled)

    # -- Triton's extensions (service/api/triton_extensions.py): the HTTP routes' dicts, parsed

    @rpc
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, grpc_context: GrpcContext
    ) -> pb.ModelConfigResponse:
        self._authorize(grpc_context)
        config = await triton_extensions.served_config(self.server, request.name, request.version)
        return pb.ModelConfigResponse(config=json_format.ParseDict(config, pb.ModelConfig()))

    @rpc
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, grpc_context: GrpcContext
    ) -> pb.ModelStatisticsResponse:
        self._authorize(grpc_context)
        stats = await triton_extensions.served_statistics(self.server, request.name or None, request.version)
        return json_format.ParseDict(stats, pb.ModelStatisticsResponse())

    @rpc
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, grpc_context: GrpcContext
    ) -> pb.RepositoryIndexResponse:
        self._authorize(grpc_context)
        index = await triton_extensions.served_index(self.server, request.ready)
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**m) for m in index])

    async def _model_infer(self, request: pb.ModelInferRequest, route: str) -> pb.ModelInferResponse:
        with self.server.refusals(request.model_name, route):
            entry = self.server.resolve(request.model_name, None, request.model_version)
            codec.check_counts(request)
            params = {k: codec.parameter(v) for k, v in request.parameters.items()}
            names, classes = [o.name for o in request.outputs], codec.classification(request)
            limits = self.server.settings.limits
            inputs = codec.inputs(request, tensor_items(limits))
            prepared = kserve.prepare(entry.manifest, inputs, params, names, classes, limits, _raw)
        _, answers, _ = await self.server.predict_many(
            entry.name, None, route, prepared.jobs, request.model_version
        )
        tensors = kserve.to_outputs(answers, prepared)
        # the version that answered: a newer one may have been swapped in since the lookup above
        return codec.response(entry.name, answers[0].version, request.id, tensors)

    async def _model_stream(self, request: pb.ModelInferRequest) -> AsyncIterator[pb.ModelInferResponse]:
        """A translation's decoupled responses: a token each, then the whole answer."""
        route, version = "grpc_stream_infer", request.model_version
        with self.server.refusals(request.model_name, route):
            entry = self.server.resolve(request.model_name, "translation", version)
            codec.check_counts(request)
            params = {k: codec.parameter(v) for k, v in request.parameters.items() if k != "stream"}
            names, classes = [o.name for o in request.outputs], codec.classification(request)
            limits = self.server.settings.limits
            inputs = codec.inputs(request, tensor_items(limits))
            prepared = kserve.prepare(entry.manifest, inputs, params, names, classes, limits, _raw)
        attention = "ATTENTION" in prepared.outputs
        [job] = prepared.jobs  # a translation's texts are one job
        async for served, event, _ in self.server.stream(entry.name, "translation", route, job, version):
            final = isinstance(event, Answer)
            for tensors in (
                [kserve.to_outputs([event], prepared)]
                if isinstance(event, Answer)
                else [kserve.token_outputs(token, attention) for token in event]
            ):
                # the answer names the version that computed it (a swap since the lookup: a newer one)
                answered = event.version if isinstance(event, Answer) else served.version
                response = codec.response(served.name, answered, request.id, tensors)
                response.parameters["triton_final_response"].bool_param = final
                yield response

    # -- attention.v1 ---------------------------------------------------------------------------

    @rpc
    async def Translate(
        self, request: apb.TranslateRequest, grpc_context: GrpcContext
    ) -> apb.TranslateResponse:
        self._authorize(grpc_context)
        with self.server.refusals(request.model, "grpc_translate"):
            job = codec.translate_job(request, self.server.settings.limits.max_texts)
        entry, [answer], total = await self.server.predict_many(
            request.model, "translation", "grpc_translate", [job]
        )
        return codec.translate_response(entry.name, entry.version, answer, total, request.return_attention)

    async def TranslateStream(
        self, request: apb.TranslateRequest, grpc_context: GrpcContext
    ) -> AsyncIterator[apb.TranslateEvent]:
        """Server streaming: a ``Token`` per output token as it is chosen, then the ``answer``."""
        try:
            self._authorize(grpc_context)
            if isinstance(request, Undecodable):  # parsed by Ray's proxy (grpc.aio's: grpc_aio)
                raise request.error
            with self.server.refusals(request.model, "grpc_translate_stream"):
                job = codec.translate_job(request, self.server.settings.limits.max_texts)
            events = self.server.stream(request.model, "translation", "grpc_translate_stream", job)
            async for entry, event, total in events:
                if isinstance(event, Answer):
                    answer = codec.translate_response(
                        entry.name, entry.version, event, total, request.return_attention
                    )
                    yield apb.TranslateEvent(answer=answer)
                else:
                    for token in event:
                        yield apb.TranslateEvent(token=codec.token(token))
        except ServiceError as exc:
            raise _abort(grpc_context, exc) from None
        except ValidationError as exc:
            raise _abort(grpc_context, InvalidInput(validation_message(exc))) from None

    @rpc
    async def Classify(self, request: apb.ClassifyRequest, grpc_context: GrpcContext) -> apb.ClassifyResponse:
        self._authorize(grpc_context)
        with self.server.refusals(request.model, "grpc_classify"):
            options = ClassifyOptions(
                top_k=request.top_k or 5,
                head_fusion=request.head_fusion or "mean",
                discard_ratio=request.discard_ratio,
                return_attention=request.return_attention,
            )
            job = classify_job(options, image=request.image)
        entry, [answer], total = await self.server.predict_many(
            request.model, "image-classification", "grpc_classify", [job]
        )
        result = answer.result
        assert isinstance(result, Classified)
        response = apb.ClassifyResponse(
            model=entry.name, version=entry.version, metrics=codec.metrics(answer.metrics, total)
        )
        for label, index, probability in zip(
            result.labels, result.indices, result.probabilities, strict=True
        ):
            response.predictions.add(label=label, index=int(index), probability=float(probability))
        if result.rollout is not None:
            response.rollout.MergeFromString(codec.tensor_bytes(result.rollout))
        return response


def _stream_flag(request: pb.ModelInferRequest) -> bool:
    """The request's ``stream`` parameter (absent: false); neither true nor false: InvalidInput
    naming it."""
    stream = request.parameters.get("stream")
    return stream is not None and kserve.flag({"stream": codec.parameter(stream)}, "stream")


def _decoupled(request: "pb.ModelInferRequest | Undecodable") -> bool:
    """A ``stream: true`` request, answered token by token as the tokens come; one whose flag
    cannot be read is a plain request (its answer is the error naming it)."""
    if isinstance(request, Undecodable):
        return False
    try:
        return _stream_flag(request)
    except ServiceError:
        return False


def _failed(request: "pb.ModelInferRequest | Undecodable", exc: BaseException) -> pb.ModelStreamInferResponse:
    """The answer of a stream's request whose computation raised what ``_stream_replies`` does not
    answer itself. A ``CancelledError`` is the client's cancel reaching the model call before the
    stream closes (Ray passes it on to the model deployment): answered, not logged as an error."""
    if isinstance(exc, asyncio.CancelledError):
        message = "the request was cancelled"
    else:
        message = unexpected(exc, "gRPC ModelStreamInfer").message
    if isinstance(request, Undecodable):
        return pb.ModelStreamInferResponse(error_message=message)
    return _stream_error(request, message, _decoupled(request))
