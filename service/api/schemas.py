"""The REST API contract: request and response models with their limits.

The ``Field`` limits here are hard ceilings. What a deployment enforces is ``Settings.limits``
(at most these ceilings), applied at the API edge by ``service/api/limits.py``, which also writes
the served limits into these schemas in the OpenAPI document.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_IMAGE_B64 = 48 * 1024 * 1024
#: texts in one request (``Limits.max_texts`` at most this): pydantic checks a list's length before
#: its items, so a body of millions of items is refused at once, not item by item
MAX_TEXTS = 256
MAX_PIXEL_SIDE = 4096

AttentionFormat = Literal["array", "png"]
HeadFusion = Literal["mean", "max", "min"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TranslateRequest(_Request):
    text: str | Annotated[list[str], Field(max_length=MAX_TEXTS)] = Field(
        description="One text or a list of texts (each at most 4096 characters; at most 256 texts)."
    )
    beam_size: int = Field(1, ge=1, description="1 = greedy decoding")
    max_length: int | None = Field(
        None, ge=1, le=1024, description="max target tokens (default: the model's)"
    )
    length_penalty: float = Field(
        0.0, ge=0.0, le=4.0, allow_inf_nan=False, description="GNMT length-penalty alpha for beam search"
    )
    truncate: bool = Field(
        False,
        description="a text longer than the model's source limit (max_source_tokens, /v1/models): "
        "translate its first tokens only; false: answer 413",
    )
    return_attention: bool = False
    attention_format: AttentionFormat = "array"
    attention_layers: Literal["default", "all"] = Field(
        "default",
        description="Transformer: 'default' = last layer, heads averaged; 'all' adds every layer and head",
    )
    stream: bool = Field(
        False,
        description="answer text/event-stream: a 'token' event per output token as it is chosen (greedy; "
        "beam search sends the answer alone), then an 'answer' event with the whole answer",
    )

    @model_validator(mode="after")
    def _texts(self) -> TranslateRequest:
        if (problem := text_problem(self.texts, "text")) is not None:
            raise ValueError(problem)
        return self

    @property
    def texts(self) -> list[str]:
        return [self.text] if isinstance(self.text, str) else list(self.text)


def text_problem(texts: Sequence[str], field: str) -> str | None:
    """What is wrong with a request's texts, named as its protocol names them (``text`` here,
    ``texts`` in gRPC, ``TEXT`` in KServe v2), or None. How many and how long: ``limits.check``
    (413, the served limits)."""
    if not texts:
        return f"{field}: give at least one text"
    for i, t in enumerate(texts):
        if not t.strip():
            return f"{field}[{i}]: must not be empty"
    return None


class ClassifyOptions(_Request):
    top_k: int = Field(5, ge=1)  # ≤ limits.max_top_k, named by limits.check (as beam_size)
    return_attention: bool = False
    attention_format: AttentionFormat = "array"
    head_fusion: HeadFusion = "mean"
    discard_ratio: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        allow_inf_nan=False,
        description="rollout: share of weakest links dropped per layer",
    )
    attention_layers: Literal["rollout", "all"] = Field(
        "rollout", description="'all' adds the raw attention of every layer and head [layers, heads, T, T]"
    )
    overlay_opacity: float = Field(
        0.5, ge=0.0, le=1.0, allow_inf_nan=False, description="PNG overlay: heatmap opacity"
    )


class ClassifyRequest(ClassifyOptions):
    image: str | None = Field(None, max_length=MAX_IMAGE_B64, description="base64 PNG/JPEG/… bytes")
    pixels: list | None = Field(
        None, description="raw pixel values 0–255, shape [H, W], [H, W, 3] or [H, W, 4]"
    )

    @model_validator(mode="after")
    def _one_input(self) -> ClassifyRequest:
        if (self.image is None) == (self.pixels is None):
            raise ValueError("body: give exactly one of image (base64) or pixels")
        return self


class Metrics(BaseModel):
    queue_wait_ms: float = Field(
        description="time from arrival at the model replica to the start of its batch"
    )
    compute_ms: float = Field(description="inference time of the batch it ran in")
    total_ms: float = Field(description="time spent in the service, as measured at the ingress")
    batch_size: int = Field(
        description="sequences or images in the batch it ran in; for a translation decoded by the model's "
        "scheduler, the mean number of decoder rows per step it shared"
    )
    tokens_generated: int | None = None
    time_to_first_token_ms: float | None = Field(
        None, description="translation: arrival at the model to the step that gave every text its first token"
    )
    time_per_output_token_ms: float | None = Field(
        None, description="translation: decode time per output token after the first (longest text)"
    )
    replica: str | None = None
    node: str | None = Field(None, description="the Ray node the replica runs on (first 12 hex digits)")


class AttentionMap(BaseModel):
    """An attention map as numbers and/or a PNG. ``shape`` is the shape of ``values``."""

    kind: str
    shape: list[int]
    values: list | None = None
    png_base64: str | None = None
    layers: list | None = Field(None, description="every layer and head, when asked for")


class TranslationOut(BaseModel):
    text: str
    source_tokens: list[str]
    target_tokens: list[str]
    score: float
    finished: bool
    attention: AttentionMap | None = None


class TranslateResponse(BaseModel):
    model: str
    version: int
    translations: list[TranslationOut]
    metrics: Metrics


class Prediction(BaseModel):
    label: str
    index: int
    probability: float


class ClassifyResponse(BaseModel):
    model: str
    version: int
    predictions: list[Prediction]
    attention: AttentionMap | None = None
    metrics: Metrics


class ModelInfo(BaseModel):
    name: str
    version: int
    task: str
    family: str
    description: str
    labels: list[str] | None = None
    languages: dict[str, str] | None = None
    #: translation: the longest text it reads (longer ones: 413, or cut with "truncate") and the
    #: most tokens it writes per text
    max_source_tokens: int | None = None
    max_target_tokens: int | None = None
    eval: dict[str, float]
    providers: list[str] | None = None
    max_batch_size: int | None = None


class ModelList(BaseModel):
    models: list[ModelInfo]
    rejected: dict[str, str] = Field(
        default_factory=dict, description="model directories refused at load, and why"
    )


class ErrorBody(BaseModel):
    error: str
