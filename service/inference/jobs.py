"""What the inference core takes and gives: typed values holding numpy arrays, never JSON.

Each protocol adapter (``service/api/``) decodes its input once into a job and encodes the
result once into its own format — REST JSON (with PNG heatmaps), KServe v2 tensors, protobuf —
so bytes stay bytes and arrays stay arrays between the layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from service.inference.translation import Translation

#: which attention a translation keeps: none, the default map (an RNN's weights, a Transformer's
#: last layer averaged over heads), or that map plus every layer and head
TranslationAttention = Literal["none", "default", "all"]
#: which attention a classification keeps: none, the rollout map, or the rollout plus every
#: layer's raw attention
ImageAttention = Literal["none", "rollout", "all"]
HeadFusion = Literal["mean", "max", "min"]


@dataclass(frozen=True)
class TranslateJob:
    texts: list[str]
    beam_size: int = 1
    max_length: int | None = None  # target tokens; None: the model's limit
    length_penalty: float = 0.0
    attention: TranslationAttention = "none"
    #: a text over the model's source limit: cut to it (True) or refused (False)
    truncate: bool = False
    #: the request field the texts came from, as error messages name it ("text", "texts", "TEXT")
    field: str = "text"
    #: bytes per attention value of the answer as this request's protocol writes it: JSON's
    #: ~9 ("0.123456,"), KServe v2 binary and gRPC raw contents 4 (float32)
    value_bytes: int = 9


@dataclass(frozen=True)
class ClassifyJob:
    """One image: encoded bytes (PNG, JPEG, …) or raw pixel values (``[H, W]`` or ``[H, W, C]``,
    0–255) — exactly one of them."""

    image: bytes | None = None
    pixels: np.ndarray | None = field(default=None, repr=False)
    top_k: int = 5
    attention: ImageAttention = "none"
    head_fusion: HeadFusion = "mean"
    discard_ratio: float = 0.0
    #: the request field the image came from, as error messages name it ("image", "file",
    #: "pixels", "IMAGE[0]", "PIXELS[0]"); default "image" or "pixels", whichever was given
    field: str = ""
    #: how this request's protocol asks for less than every layer's attention (named when an
    #: answer with every layer would be too large)
    fewer_layers: str = "attention_layers 'rollout' (not every layer)"
    #: bytes per attention value of the answer as written (see ``TranslateJob.value_bytes``)
    value_bytes: int = 9

    def __post_init__(self) -> None:
        if not self.field:
            object.__setattr__(self, "field", "image" if self.image is not None else "pixels")


@dataclass
class Translated:
    translations: list[Translation]

    @property
    def tokens_generated(self) -> int:
        return sum(len(t.target_tokens) for t in self.translations)


@dataclass
class Classified:
    indices: np.ndarray  # (k,) class indices, most probable first
    probabilities: np.ndarray  # (k,) their probabilities
    labels: list[str]  # (k,) their names
    image: np.ndarray = field(repr=False)  # the model-sized uint8 image, for overlays
    rollout: np.ndarray | None = None  # (rows, cols) relevance of each patch
    attentions: np.ndarray | None = field(default=None, repr=False)  # (layers, heads, T, T)
    rollout_kind: str = ""  # e.g. "rollout-mean"


@dataclass(slots=True)  # one per token: a frozen dataclass is built ≈ 5 × slower
class TokenEvent:
    """One output token of a streamed translation, as the scheduler chose it."""

    text_index: int  # which of the request's texts
    index: int  # its position in that text's target_tokens
    token_id: int
    token: str  # the token as the vocabulary spells it (as target_tokens list it)
    piece: str  # the text it adds to the translation ("" for EOS)
    logprob: float
    #: when attention was asked for: this token's alignment row over the text's source tokens
    #: (S,), and with attention "all" every layer's and head's (layers, heads, S)
    alignment: np.ndarray | None = field(default=None, repr=False)
    layers: np.ndarray | None = field(default=None, repr=False)


#: a streamed translation's tokens chosen since the stream's previous item, in order: one step's,
#: or several within the stream interval (they travel and are written together)
Tokens = list[TokenEvent]


class LastTokens(list[TokenEvent]):
    """A stream's last tokens: its answer is the next item, already there, so a writer may hold
    them for the answer's write."""


@dataclass(frozen=True)
class AnswerMetrics:
    queue_wait_ms: float
    compute_ms: float
    batch_size: int
    tokens_generated: int | None
    replica: str
    node: str
    #: translations decoded by the model's scheduler: arrival → every text's first token, and
    #: the decode time per output token after it (longest text)
    time_to_first_token_ms: float | None = None
    time_per_output_token_ms: float | None = None


@dataclass
class Answer:
    """A model's result for one job, with the version that produced it and what it cost."""

    model: str
    version: int
    result: Translated | Classified
    metrics: AnswerMetrics
