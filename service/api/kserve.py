"""The KServe v2 (Open Inference Protocol) tensor contract of our models, transport-free.

HTTP (``service/api/kserve_http.py``) and gRPC (``service/api/grpc_servicer.py``) decode their wire
formats into :class:`Tensor` objects (``service/api/kserve_tensors.py``), call :func:`prepare` to
get the core's jobs (their options checked by the REST API's schemas), and encode the answers with
:func:`to_outputs`.

Translation models
    inputs   ``TEXT`` BYTES [-1] (or [-1, 1], the shape Triton's configuration implies)
    outputs  ``TRANSLATION`` BYTES [-1], ``SCORE`` FP32 [-1],
             ``SOURCE_TOKENS`` / ``TARGET_TOKENS`` BYTES [-1, -1] (padded with ""),
             ``ATTENTION`` FP32 [-1, -1, -1] (target × source, zero-padded; on request)
    params   ``beam_size``, ``max_length``, ``length_penalty``, ``truncate``, ``return_attention``
Image classifiers
    inputs   ``IMAGE`` BYTES [-1] or [-1, 1] (encoded images), or ``PIXELS`` UINT8/FP32 [-1, H, W(, C)]
    outputs  ``LABELS`` BYTES [-1, k], ``INDICES`` INT64 [-1, k], ``PROBABILITIES`` FP32 [-1, k],
             ``ROLLOUT`` FP32 [-1, rows, cols] and ``ATTENTIONS`` FP32 [-1, L, H, T, T] (on request)
    params   ``top_k``, ``head_fusion``, ``discard_ratio``, ``return_attention``; on ``PROBABILITIES``
             Triton's ``classification`` (BYTES ``"<score>:<index>:<label>"``, :func:`class_count`)

Attention outputs are computed only when the request names them in ``outputs`` or sets
``return_attention``. A request that names no outputs gets every output but the attention maps
(the protocol's "all outputs"), and with ``return_attention`` the maps too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import TypeAdapter, ValidationError

from service.api.kserve_tensors import DATATYPE_BY_DTYPE, Tensor
from service.api.limits import request_limits
from service.api.rest_codec import classify_job, translate_job
from service.api.schemas import ClassifyOptions, TranslateRequest, text_problem
from service.errors import InvalidInput, PayloadTooLarge, validation_message
from service.inference import attention as maps
from service.inference.jobs import Answer, Classified, ClassifyJob, TokenEvent, Translated, TranslateJob
from service.inference.manifest import Manifest
from service.inference.runners import RAW_BYTES_PER_VALUE
from service.settings import Limits

SERVER_NAME = "attention-serve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = [
    "binary_tensor_data", "classification", "model_configuration", "statistics", "parameters",
    "model_repository_metadata", "attention_maps",
]  # fmt: skip
PLATFORM = "onnxruntime_onnx"

TRANSLATION_OUTPUTS = ["TRANSLATION", "SCORE", "SOURCE_TOKENS", "TARGET_TOKENS", "ATTENTION"]
IMAGE_OUTPUTS = ["LABELS", "PROBABILITIES", "INDICES", "ROLLOUT", "ATTENTIONS"]
ATTENTION_OUTPUTS = {"ATTENTION", "ROLLOUT", "ATTENTIONS"}
#: a v2 request asks for every layer's attention by naming ATTENTIONS: the way to less
FEWER_LAYERS = "the ROLLOUT output instead of ATTENTIONS (not every layer)"


def metadata(manifest: Manifest, limits: Limits) -> dict[str, Any]:
    """``GET /v2/models/{name}``: the model's tensors in v2 terms, and under ``parameters`` the
    limits the service enforces on a request to it (the same ``Settings.limits`` the REST
    schemas show in the OpenAPI document)."""
    if manifest.task == "translation":
        inputs = [{"name": "TEXT", "datatype": "BYTES", "shape": [-1]}]
        outputs = [
            {"name": "TRANSLATION", "datatype": "BYTES", "shape": [-1]},
            {"name": "SCORE", "datatype": "FP32", "shape": [-1]},
            {"name": "SOURCE_TOKENS", "datatype": "BYTES", "shape": [-1, -1]},
            {"name": "TARGET_TOKENS", "datatype": "BYTES", "shape": [-1, -1]},
            {"name": "ATTENTION", "datatype": "FP32", "shape": [-1, -1, -1]},
        ]
    else:
        assert manifest.image is not None
        img = manifest.image
        rows, cols = img.grid
        tokens = rows * cols + img.prefix_tokens
        inputs = [
            {"name": "IMAGE", "datatype": "BYTES", "shape": [-1]},
            {"name": "PIXELS", "datatype": "UINT8", "shape": [-1, img.height, img.width]},
        ]
        outputs = [
            {"name": "LABELS", "datatype": "BYTES", "shape": [-1, -1]},
            {"name": "PROBABILITIES", "datatype": "FP32", "shape": [-1, -1]},
            {"name": "INDICES", "datatype": "INT64", "shape": [-1, -1]},
            {"name": "ROLLOUT", "datatype": "FP32", "shape": [-1, rows, cols]},
            {
                "name": "ATTENTIONS",
                "datatype": "FP32",
                "shape": [-1, img.num_layers, img.num_heads, tokens, tokens],
            },
        ]
    return {
        "name": manifest.name,
        "versions": [str(manifest.version)],
        "platform": PLATFORM,
        "inputs": inputs,
        "outputs": outputs,
        "parameters": request_limits(manifest.task, limits),
    }


_BOOL = TypeAdapter(bool)


def flag(params: dict[str, Any], name: str, where: str = "parameters") -> bool:
    """A boolean parameter (absent: false), read as the REST schemas read a boolean field:
    ``true``/``false``, ``1``/``0``, ``"true"``/``"false"``…; anything else is refused naming it
    (``"false"`` is not true)."""
    try:
        return _BOOL.validate_python(params.get(name, False))
    except ValidationError as exc:
        raise InvalidInput(f"{where}: {name}: {exc.errors()[0]['msg']}") from exc


@dataclass
class Prepared:
    """A v2 request decoded for the core: its jobs, and how their answers become its outputs."""

    jobs: list[TranslateJob] | list[ClassifyJob]
    outputs: list[str]
    #: ``PROBABILITIES`` as Triton's class strings, the best this many (:func:`class_count`)
    classes: int | None = None
    #: how many classes ``LABELS`` and ``INDICES`` keep where the jobs rank more for ``classes``
    top_k: int | None = None


def prepare(
    manifest: Manifest,
    inputs: list[Tensor],
    params: dict[str, Any],
    names: list[str],
    classification: dict[str, Any] | None = None,
    limits: Limits | None = None,
    binary: Callable[[str], bool] | None = None,
) -> Prepared:
    """A decoded v2 request → the core's jobs and the outputs to answer with. ``binary``: whether
    an output is written as raw bytes (the binary extension; gRPC's raw contents: always), so an
    answer's attention is sized at 4 bytes a value, not JSON's 9, against
    ``limits.max_response_bytes``. Triton's
    classification changes only the output it is set on: the jobs rank as many classes as it
    asks (when that is more than ``top_k``; at most ``limits.max_top_k``), and the other outputs
    keep ``top_k``. A batch of more than ``limits.max_images`` rows is refused before a job is
    made for each."""
    outputs = requested_outputs(manifest, names, params, classification)
    jobs = to_requests(manifest, inputs, params, outputs, limits)
    attention = [o for o in outputs if o in ATTENTION_OUTPUTS]
    if attention and binary is not None and all(binary(o) for o in attention):
        jobs = [dataclasses.replace(job, value_bytes=RAW_BYTES_PER_VALUE) for job in jobs]  # type: ignore[assignment]
    if not classification:
        return Prepared(jobs, outputs)
    classes = class_count(manifest, classification, limits.max_top_k if limits else None)
    shown = min(job.top_k for job in jobs if isinstance(job, ClassifyJob))
    if classes <= shown:
        return Prepared(jobs, outputs, classes)
    widened = [dataclasses.replace(job, top_k=classes) for job in jobs if isinstance(job, ClassifyJob)]
    return Prepared(widened, outputs, classes, shown)


def requested_outputs(
    manifest: Manifest, names: list[str], params: dict[str, Any], classification: dict[str, Any] | None = None
) -> list[str]:
    """The outputs to answer with, in order. ``classification``: the outputs whose own
    parameters carry one, with its value (checked by :func:`class_count`)."""
    known = TRANSLATION_OUTPUTS if manifest.task == "translation" else IMAGE_OUTPUTS
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InvalidInput(f"outputs: unknown output tensor(s) {unknown}; this model has {known}")
    if len(set(names)) != len(names):
        raise InvalidInput(f"outputs: each output named once, got {names}")
    if classification:
        class_count(manifest, classification)
    attention = flag(params, "return_attention")  # checked when outputs are named too
    if names:
        return names
    return [name for name in known if attention or name not in ATTENTION_OUTPUTS]


def class_count(manifest: Manifest, classification: dict[str, Any], max_top_k: int | None = None) -> int:
    """Triton's classification extension: an output's ``classification`` parameter (tritonclient's
    ``class_count``) asks for its best k classes as BYTES ``"<score>:<index>:<label>"``, best
    first — what Triton's image_client prints. Here on an image model's ``PROBABILITIES``; any
    other use is refused naming the output."""
    for name in classification:
        if name != "PROBABILITIES" or manifest.task != "image-classification":
            raise InvalidInput(f"{name}: classification applies to an image model's PROBABILITIES output")
    count = classification["PROBABILITIES"]
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise InvalidInput(f"PROBABILITIES: classification must be a positive integer, got {count!r}")
    if max_top_k is not None and count > max_top_k:  # named here: the jobs' top_k would name top_k
        raise InvalidInput(f"PROBABILITIES: classification {count} exceeds the limit of {max_top_k}")
    return count


def to_requests(
    manifest: Manifest,
    inputs: list[Tensor],
    params: dict[str, Any],
    outputs: list[str],
    limits: Limits | None = None,
) -> list[TranslateJob] | list[ClassifyJob]:
    """v2 inputs + parameters → the core's jobs (one per batch row for images, one multi-text job
    for translation); the options are checked by the REST API's schemas, the same limits. More
    texts or images than ``limits`` allow are refused before a job is made of them."""
    by_name = {t.name: t for t in inputs}
    if len(by_name) != len(inputs):
        raise InvalidInput("inputs: duplicate input names")
    attention = bool(ATTENTION_OUTPUTS & set(outputs))
    try:
        if manifest.task == "translation":
            return [_translate_job(by_name, params, attention, limits.max_texts if limits else None)]
        max_images = limits.max_images if limits else None
        return _classify_jobs(by_name, params, attention, "ATTENTIONS" in outputs, max_images)
    except ValidationError as exc:
        raise InvalidInput(f"parameters: {validation_message(exc)}") from exc


def _translate_job(
    by_name: dict[str, Tensor], params: dict[str, Any], attention: bool, max_texts: int | None
) -> TranslateJob:
    text = _only_input(by_name, ["TEXT"])
    column = _one_per_row(text.data)
    if text.datatype != "BYTES" or column is None:
        raise InvalidInput(
            f"TEXT: expected BYTES with shape [-1] or [-1, 1], got {text.datatype} {text.shape}"
        )
    if max_texts is not None and len(column) > max_texts:  # else the schema's ceiling (256) named text
        raise PayloadTooLarge(f"TEXT: {len(column)} texts exceed the limit of {max_texts}")
    texts = [_utf8(item, "TEXT") for item in column]
    if (problem := text_problem(texts, "TEXT")) is not None:  # the schema's would name REST's text
        raise InvalidInput(problem)
    options = {k: params[k] for k in ("beam_size", "max_length", "length_penalty", "truncate") if k in params}
    return translate_job(TranslateRequest(text=texts, return_attention=attention, **options), "TEXT")


def _classify_jobs(
    by_name: dict[str, Tensor], params: dict[str, Any], attention: bool, raw: bool, max_images: int | None
) -> list[ClassifyJob]:
    tensor = _only_input(by_name, ["IMAGE", "PIXELS"])
    if 0 in tensor.shape:
        raise InvalidInput(
            f"{tensor.name}: give at least one image of at least one pixel, got shape {tensor.shape}"
        )
    if tensor.shape and max_images is not None and tensor.shape[0] > max_images:
        count = tensor.shape[0]  # before a job per row: a [2000000, 1, 1] PIXELS fits the body limit
        raise PayloadTooLarge(f"{tensor.name}: {count} images exceed the limit of {max_images} per request")
    given = {k: params[k] for k in ("top_k", "head_fusion", "discard_ratio") if k in params}
    options = ClassifyOptions(
        **given, return_attention=attention, attention_layers="all" if raw else "rollout"
    )
    if tensor.name == "IMAGE":
        column = _one_per_row(tensor.data)
        if tensor.datatype != "BYTES" or column is None:
            raise InvalidInput(
                f"IMAGE: expected BYTES with shape [-1] or [-1, 1], got {tensor.datatype} {tensor.shape}"
            )
        images = enumerate(column)  # errors name IMAGE[i], not the REST field
        return [
            classify_job(options, image=bytes(item), field=f"IMAGE[{i}]", fewer_layers=FEWER_LAYERS)
            for i, item in images
        ]
    if tensor.datatype not in ("UINT8", "FP32") or tensor.data.ndim not in (3, 4):
        raise InvalidInput(
            f"PIXELS: expected UINT8 or FP32 [-1, H, W(, C)], got {tensor.datatype} {tensor.shape}"
        )
    rows = enumerate(tensor.data)
    return [
        classify_job(options, pixels=row, field=f"PIXELS[{i}]", fewer_layers=FEWER_LAYERS) for i, row in rows
    ]


def _one_per_row(data: np.ndarray) -> np.ndarray | None:
    """An element per batch row: ``[N]``, or ``[N, 1]`` — what Triton's configuration of such a
    tensor (``dims: [1]`` reshaped to ``[]``, :mod:`service.api.triton_extensions`) asks clients
    to send. Another shape: None."""
    if data.ndim == 2 and data.shape[1] == 1:
        return data[:, 0]
    return data if data.ndim == 1 else None


def _only_input(by_name: dict[str, Tensor], allowed: list[str]) -> Tensor:
    names = sorted(by_name)
    if len(names) != 1 or names[0] not in allowed:
        raise InvalidInput(f"inputs: expected exactly one of {allowed}, got {names}")
    return by_name[names[0]]


def _utf8(item: Any, name: str) -> str:
    try:
        return bytes(item).decode("utf-8") if not isinstance(item, str) else item
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{name}: element is not valid UTF-8") from exc


def to_outputs(answers: list[Answer], prepared: Prepared) -> list[Tensor]:
    """The core's answers → the requested v2 output tensors, in the requested order; with
    ``prepared.classes`` (:func:`class_count`), ``PROBABILITIES`` as Triton's class strings."""
    results = [a.result for a in answers]
    if all(isinstance(r, Translated) for r in results):
        [translated] = results
        assert isinstance(translated, Translated)
        values = _translation_values(translated)
    else:
        classified = [r for r in results if isinstance(r, Classified)]
        values = _image_values(classified, prepared.top_k)
        if prepared.classes:  # Triton's format: the score as C's "%f", the index, the label; best first
            values["PROBABILITIES"] = _bytes([
                [f"{p:f}:{i}:{name}" for p, i, name in zip(r.probabilities, r.indices, r.labels, strict=True)]
                [: prepared.classes]
                for r in classified
            ])  # fmt: skip
    return [_tensor(name, values[name]) for name in prepared.outputs]


def token_outputs(event: TokenEvent, attention: bool) -> list[Tensor]:
    """A streamed token (a decoupled response, ``parameters: {"stream": true}``) as v2 outputs:
    ``TOKEN`` — the text it adds — ``TOKEN_ID``, ``TEXT_INDEX``, ``LOGPROB`` and, when the request
    asked for ``ATTENTION``, its alignment row ``[1, source]``."""
    tensors = [
        _tensor("TOKEN", _bytes([event.piece])),
        _tensor("TOKEN_ID", np.array([event.token_id], dtype=np.int64)),
        _tensor("TEXT_INDEX", np.array([event.text_index], dtype=np.int32)),
        _tensor("LOGPROB", np.array([event.logprob], dtype=np.float32)),
    ]
    if attention and event.alignment is not None:
        tensors.append(_tensor("ATTENTION", event.alignment[None].astype(np.float32)))
    return tensors


def _translation_values(result: Translated) -> dict[str, np.ndarray]:
    items = result.translations
    width_s = max(len(t.source_tokens) for t in items)
    width_t = max(len(t.target_tokens) for t in items)
    attention = np.zeros((len(items), width_t, width_s), dtype=np.float32)
    for i, t in enumerate(items):
        if t.attention.size:
            grid = maps.alignment(t.attention)
            attention[i, : grid.shape[0], : grid.shape[1]] = grid
    return {
        "TRANSLATION": _bytes([t.text for t in items]),
        "SCORE": np.array([t.score for t in items], dtype=np.float32),
        "SOURCE_TOKENS": _bytes([_pad(t.source_tokens, width_s) for t in items]),
        "TARGET_TOKENS": _bytes([_pad(t.target_tokens, width_t) for t in items]),
        "ATTENTION": attention,
    }


def _image_values(results: list[Classified], top_k: int | None = None) -> dict[str, np.ndarray]:
    """``top_k``: how many of each result's classes to keep (None: all it ranked)."""
    values = {
        "LABELS": _bytes([r.labels[:top_k] for r in results]),
        "PROBABILITIES": np.array([r.probabilities[:top_k] for r in results], dtype=np.float32),
        "INDICES": np.array([r.indices[:top_k] for r in results], dtype=np.int64),
    }
    rollouts = [r.rollout for r in results if r.rollout is not None]
    if len(rollouts) == len(results):
        values["ROLLOUT"] = np.stack(rollouts).astype(np.float32)
    layers = [r.attentions for r in results if r.attentions is not None]
    if len(layers) == len(results):
        values["ATTENTIONS"] = np.stack(layers).astype(np.float32)
    return values


def _pad(tokens: list[str], width: int) -> list[str]:
    return tokens + [""] * (width - len(tokens))


def _bytes(values: list[Any]) -> np.ndarray:
    """Strings (nested lists of one shape) → a BYTES tensor of their UTF-8 encodings."""
    array = np.array(values, dtype=np.object_)
    out = np.empty(array.shape, dtype=np.object_)
    out.reshape(-1)[:] = [s.encode("utf-8") for s in array.reshape(-1)]  # np.vectorize cost more
    return out


def _tensor(name: str, data: np.ndarray) -> Tensor:
    datatype = DATATYPE_BY_DTYPE[data.dtype]
    return Tensor(name, datatype, list(data.shape), data)
