from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Metrics(_message.Message):
    __slots__ = ("queue_wait_ms", "compute_ms", "total_ms", "batch_size", "tokens_generated", "time_to_first_token_ms", "time_per_output_token_ms", "replica", "node")
    QUEUE_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    TIME_PER_OUTPUT_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    queue_wait_ms: float
    compute_ms: float
    total_ms: float
    batch_size: int
    tokens_generated: int
    time_to_first_token_ms: float
    time_per_output_token_ms: float
    replica: str
    node: str
    def __init__(self, queue_wait_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., batch_size: _Optional[int] = ..., tokens_generated: _Optional[int] = ..., time_to_first_token_ms: _Optional[float] = ..., time_per_output_token_ms: _Optional[float] = ..., replica: _Optional[str] = ..., node: _Optional[str] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("shape", "values")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class TranslateRequest(_message.Message):
    __slots__ = ("model", "texts", "beam_size", "max_length", "length_penalty", "return_attention", "truncate")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    BEAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    LENGTH_PENALTY_FIELD_NUMBER: _ClassVar[int]
    RETURN_ATTENTION_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    model: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    beam_size: int
    max_length: int
    length_penalty: float
    return_attention: bool
    truncate: bool
    def __init__(self, model: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ..., beam_size: _Optional[int] = ..., max_length: _Optional[int] = ..., length_penalty: _Optional[float] = ..., return_attention: _Optional[bool] = ..., truncate: _Optional[bool] = ...) -> None: ...

class Translation(_message.Message):
    __slots__ = ("text", "source_tokens", "target_tokens", "score", "finished", "attention")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TARGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    text: str
    source_tokens: _containers.RepeatedScalarFieldContainer[str]
    target_tokens: _containers.RepeatedScalarFieldContainer[str]
    score: float
    finished: bool
    attention: Tensor
    def __init__(self, text: _Optional[str] = ..., source_tokens: _Optional[_Iterable[str]] = ..., target_tokens: _Optional[_Iterable[str]] = ..., score: _Optional[float] = ..., finished: _Optional[bool] = ..., attention: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class TranslateResponse(_message.Message):
    __slots__ = ("model", "version", "translations", "metrics")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TRANSLATIONS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    translations: _containers.RepeatedCompositeFieldContainer[Translation]
    metrics: Metrics
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., translations: _Optional[_Iterable[_Union[Translation, _Mapping]]] = ..., metrics: _Optional[_Union[Metrics, _Mapping]] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("text_index", "index", "token", "token_id", "text", "logprob", "attention")
    TEXT_INDEX_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    text_index: int
    index: int
    token: str
    token_id: int
    text: str
    logprob: float
    attention: Tensor
    def __init__(self, text_index: _Optional[int] = ..., index: _Optional[int] = ..., token: _Optional[str] = ..., token_id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ..., attention: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class TranslateEvent(_message.Message):
    __slots__ = ("token", "answer")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    token: Token
    answer: TranslateResponse
    def __init__(self, token: _Optional[_Union[Token, _Mapping]] = ..., answer: _Optional[_Union[TranslateResponse, _Mapping]] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("model", "image", "top_k", "return_attention", "head_fusion", "discard_ratio")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    RETURN_ATTENTION_FIELD_NUMBER: _ClassVar[int]
    HEAD_FUSION_FIELD_NUMBER: _ClassVar[int]
    DISCARD_RATIO_FIELD_NUMBER: _ClassVar[int]
    model: str
    image: bytes
    top_k: int
    return_attention: bool
    head_fusion: str
    discard_ratio: float
    def __init__(self, model: _Optional[str] = ..., image: _Optional[bytes] = ..., top_k: _Optional[int] = ..., return_attention: _Optional[bool] = ..., head_fusion: _Optional[str] = ..., discard_ratio: _Optional[float] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("label", "index", "probability")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    label: str
    index: int
    probability: float
    def __init__(self, label: _Optional[str] = ..., index: _Optional[int] = ..., probability: _Optional[float] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("model", "version", "predictions", "rollout", "metrics")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    rollout: Tensor
    metrics: Metrics
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., rollout: _Optional[_Union[Tensor, _Mapping]] = ..., metrics: _Optional[_Union[Metrics, _Mapping]] = ...) -> None: ...
