"""gRPC over one :class:`~service.api.server.Server`: the KServe v2 ``inference.GRPCInferenceService``
(stubs generated from ``service/api/protos/grpc_service.proto``) and our typed
``attention.v1.AttentionService``, both in :class:`GrpcServicer`.

The hosting layer serves it with grpc.aio (:func:`add_to_grpc_server`, in-replica) or lets Ray's
gRPC proxy call its methods by name (Ray ingress). Errors carry the gRPC code from the table in
``service/errors.py`` (:func:`rpc`); RPCs we do not declare answer UNIMPLEMENTED.
"""

import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from pydantic import SecretStr, ValidationError

from service.api import auth, kserve
from service.api import grpc_codec as codec
from service.api.protos import attention_pb2 as apb
from service.api.protos import attention_pb2_grpc, grpc_service_pb2_grpc
from service.api.protos import grpc_service_pb2 as pb
from service.api.rest_codec import classify_job
from service.api.schemas import ClassifyOptions
from service.api.server import Server
from service.errors import InvalidInput, ServiceError, unexpected, validation_message
from service.inference.jobs import Answer, Classified

SERVICER_FUNCTIONS = [
    "service.api.protos.grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server",
    "service.api.protos.attention_pb2_grpc.add_AttentionServiceServicer_to_server",
]


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


def _stream_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    """A failed request's answer in a stream, naming the request (its id, model and version)."""
    which = pb.ModelInferResponse(
        id=request.id, model_name=request.model_name, model_version=request.model_version
    )
    return pb.ModelStreamInferResponse(error_message=message, infer_response=which)


Method = Callable[[Any, Any, GrpcContext], Awaitable[Reply]]


def rpc(method: Method[Reply]) -> Method[Reply]:
    """The one error mapping of the unary RPCs: a service error leaves with its gRPC code, a
    request field a schema refused with INVALID_ARGUMENT naming it, anything unexpected with
    INTERNAL and a request id that the logged traceback also carries."""

    @functools.wraps(method)  # Ray passes the context by this keyword: the name matters
    async def call(self: Any, request: Any, grpc_context: GrpcContext) -> Reply:
        try:
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
        "ModelStreamInfer", "Translate", "TranslateStream", "Classify",
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
        self.server.resolve(request.name, None, request.version)
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
        """Bidirectional stream: one response per request, in order; a failed request answers
        with ``error_message`` and the stream goes on (Triton's semantics). A translation request
        with the parameter ``stream: true`` is answered as a decoupled model does in Triton: one
        response per output token as it is chosen (``kserve.token_outputs``), then the whole
        answer, each flagged ``triton_final_response`` (true on the last)."""
        try:
            self._authorize(grpc_context)
        except ServiceError as exc:  # the whole stream is refused
            raise _abort(grpc_context, exc) from None
        async for request in request_stream:
            if isinstance(request, Undecodable):  # this message only: the stream goes on
                yield pb.ModelStreamInferResponse(error_message=request.error.message)
                continue
            try:
                stream = request.parameters.get("stream")
                if stream is not None and kserve.flag({"stream": codec.parameter(stream)}, "stream"):
                    async for response in self._model_stream(request):
                        yield pb.ModelStreamInferResponse(infer_response=response)
                    continue
                result = await self._model_infer(request, "grpc_stream_infer")
                yield pb.ModelStreamInferResponse(infer_response=result)
            except ServiceError as exc:
                yield _stream_error(request, exc.message)
            except Exception as exc:  # logged with its traceback; the stream goes on
                yield _stream_error(request, unexpected(exc, "gRPC ModelStreamInfer").message)

    async def _model_infer(self, request: pb.ModelInferRequest, route: str) -> pb.ModelInferResponse:
        with self.server.refusals(request.model_name, route):
            entry = self.server.resolve(request.model_name, None, request.model_version)
            params = {k: codec.parameter(v) for k, v in request.parameters.items()}
            classes = codec.classification(request)
            outputs = kserve.requested_outputs(
                entry.manifest, [o.name for o in request.outputs], params, classes
            )
            requests = kserve.to_requests(entry.manifest, codec.inputs(request), params, outputs)
        _, answers, _ = await self.server.predict_many(
            entry.name, None, route, requests, request.model_version
        )
        tensors = kserve.to_outputs(entry.manifest, answers, outputs, bool(classes))
        return codec.response(entry.name, entry.version, request.id, tensors)

    async def _model_stream(self, request: pb.ModelInferRequest) -> AsyncIterator[pb.ModelInferResponse]:
        """A translation's decoupled responses: a token each, then the whole answer."""
        route, version = "grpc_stream_infer", request.model_version
        with self.server.refusals(request.model_name, route):
            entry = self.server.resolve(request.model_name, "translation", version)
            params = {k: codec.parameter(v) for k, v in request.parameters.items() if k != "stream"}
            names, classes = [o.name for o in request.outputs], codec.classification(request)
            outputs = kserve.requested_outputs(entry.manifest, names, params, classes)  # refuses classes
            [job] = kserve.to_requests(entry.manifest, codec.inputs(request), params, outputs)
        attention = "ATTENTION" in outputs
        async for _, event, _ in self.server.stream(entry.name, "translation", route, job, version):
            final = isinstance(event, Answer)
            for tensors in (
                [kserve.to_outputs(entry.manifest, [event], outputs)]
                if isinstance(event, Answer)
                else [kserve.token_outputs(token, attention) for token in event]
            ):
                response = codec.response(entry.name, entry.version, request.id, tensors)
                response.parameters["triton_final_response"].bool_param = final
                yield response

    # -- attention.v1 ---------------------------------------------------------------------------

    @rpc
    async def Translate(
        self, request: apb.TranslateRequest, grpc_context: GrpcContext
    ) -> apb.TranslateResponse:
        self._authorize(grpc_context)
        with self.server.refusals(request.model, "grpc_translate"):
            job = codec.translate_job(request)
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
            with self.server.refusals(request.model, "grpc_translate_stream"):
                job = codec.translate_job(request)
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
            response.rollout.CopyFrom(codec.tensor(result.rollout))
        return response


# -- grpc.aio --------------------------------------------------------------------------------------


def add_to_grpc_server(grpc_server: grpc.aio.Server, servicer: GrpcServicer) -> list[str]:
    """Serve both services of ``servicer`` on a grpc.aio server; their full names. The RPCs set
    the error's code on their context and raise it; grpc.aio needs ``abort`` to send it. A request
    protobuf cannot parse (a string field that is not UTF-8, a corrupt message) reaches the RPC as
    :class:`Undecodable` and is answered INVALID_ARGUMENT — grpc's own parser answered UNKNOWN,
    and in ``ModelStreamInfer`` ended the whole stream."""
    kserve_v2, attention_v1 = grpc_service_pb2_grpc, attention_pb2_grpc
    services = []
    for base, add in (
        (kserve_v2.GRPCInferenceServiceServicer, kserve_v2.add_GRPCInferenceServiceServicer_to_server),
        (attention_v1.AttentionServiceServicer, attention_v1.add_AttentionServiceServicer_to_server),
    ):
        overrides = {}
        for name, _ in inspect.getmembers(base, inspect.isfunction):
            if name in servicer.METHODS:
                impl = getattr(servicer, name)
                overrides[name] = (
                    _aio_streaming(impl) if inspect.isasyncgenfunction(impl) else _aio_unary(impl)
                )
        lenient = _Lenient(grpc_server)
        add(type(base.__name__, (base,), overrides)(), lenient)
        if not lenient.services:  # stubs from grpcio-tools < 1.62 register generic handlers only
            raise RuntimeError(f"{add.__name__} registered no methods: regenerate the stubs (make protos)")
        services += lenient.services
    return services


def add_reflection(grpc_server: grpc.aio.Server, services: list[str], token: SecretStr | None) -> None:
    """gRPC server reflection (``grpc.reflection.v1alpha``, grpcio-reflection's) for ``services``,
    the health service and itself: grpcurl, grpcui, Postman and ghz list and call the services
    without their ``.proto`` files. Behind the token when one is set, as every RPC but health."""
    names = [*services, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(_Reflection(names, token), grpc_server)


class _Reflection(reflection.aio.ReflectionServicer):
    def __init__(self, names: list[str], token: SecretStr | None) -> None:
        super().__init__(names)
        self.token = token

    async def ServerReflectionInfo(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        try:
            auth.check_metadata(self.token, context.invocation_metadata())
        except ServiceError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.grpc_code), exc.message)
        async for response in super().ServerReflectionInfo(request_iterator, context):
            yield response


class GrpcHealth:
    """The standard gRPC health service, ``grpc.health.v1.Health`` (grpcio-health-checking's),
    on a grpc.aio server: what Kubernetes' ``grpc`` probes, grpc-health-probe, Envoy's and most
    gRPC load balancers' health checks call. ``Check`` / ``Watch`` for the server (``""``) and for
    each of ``services``; another name is NOT_FOUND. Answered without a token, as ServerLive.
    The hosting layer says when the server serves (:meth:`serving`) and when it stops
    (:meth:`stopping`: NOT_SERVING for good, sent to every ``Watch`` before the drain)."""

    def __init__(self, grpc_server: grpc.aio.Server, services: list[str]) -> None:
        self.servicer = health.aio.HealthServicer()
        self.names = ["", *services]
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, grpc_server)

    async def serving(self) -> None:
        for name in self.names:
            await self.servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stopping(self) -> None:
        await self.servicer.enter_graceful_shutdown()


class Undecodable:
    """A request message that protobuf could not parse, handed to the RPC in its place."""

    def __init__(self, reason: str) -> None:
        self.error = InvalidInput(f"request: not a valid protobuf message ({reason})")


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return Undecodable(str(exc))

    return deserialize


class _Lenient:
    """The server as the generated ``add_*_to_server`` functions see it: each method's handler is
    passed on with a request parser that never raises (:func:`_lenient`)."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self.server = server
        self.services: list[str] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Left out: rebuilt from the same handlers in :meth:`add_registered_method_handlers`."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        lenient = {}
        for name, handler in handlers.items():
            lenient[name] = handler._replace(request_deserializer=_lenient(handler.request_deserializer))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, lenient),))
        self.server.add_registered_method_handlers(service, lenient)
        self.services.append(service)


def _aio_unary(impl: Callable[..., Any]) -> Callable[..., Any]:
    async def call(_: object, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, Undecodable):
                raise request.error
            return await impl(request, context)
        except ServiceError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.grpc_code), exc.message)

    return call


def _aio_streaming(impl: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def call(_: object, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(requests, Undecodable):  # the one request of a server-streaming RPC
                raise requests.error
            async for response in impl(requests, context):
                yield response
        except ServiceError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.grpc_code), exc.message)
        except Exception as exc:
            error = unexpected(exc, f"gRPC {impl.__name__}")
            await context.abort(grpc.StatusCode.INTERNAL, error.message)

    return call
