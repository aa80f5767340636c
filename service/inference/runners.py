"""Runners: the per-model compute behind a deployment, in three steps (TorchServe's handler split).

``preprocess(request) → work`` runs per request (validation, tokenising, image decoding);
``infer(works) → outputs`` runs once per formed batch — a list in, a list of the same length out;
``postprocess(work, output) → result`` turns one output into the job's typed result
(``service/inference/jobs.py``; the protocol adapters encode it).
A work larger than a batch is cut by ``split(work, units)`` into parts whose outputs
``join`` puts back together, in order. Nothing here knows about Ray; ``service/inference/worker.py``
puts a runner behind the model's own batcher (``service/inference/batcher.py``), or a translation
runner behind its scheduler (``service/inference/scheduler.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from tokenizers.decoders import DecodeStream

from service.errors import InvalidInput, ResponseTooLarge
from service.inference import attention as maps
from service.inference.batching import group_by, length_buckets
from service.inference.callers import StepToken
from service.inference.decoding import Hypothesis, Options
from service.inference.jobs import Classified, ClassifyJob, TokenEvent, Translated, TranslateJob
from service.inference.manifest import ImageSpec
from service.inference.repository import ModelEntry
from service.inference.translation import Translation, Translator
from service.inference.vision import (
    INLINE_BYTES,
    INLINE_PIXELS,
    Classifier,
    decode_cost,
    decode_resized,
    normalise,
    pixels_to_image,
    resize,
)
from service.settings import Limits


class Runner(Protocol):
    entry: ModelEntry
    providers: list[str]  # the execution providers ONNX Runtime actually chose

    def preprocess(self, request: Any) -> Any: ...
    def inline(self, request: Any) -> bool: ...
    def infer(self, works: list[Any]) -> list[Any]: ...
    def postprocess(self, work: Any, output: Any) -> Translated | Classified: ...
    def size(self, work: Any) -> int: ...
    def split(self, work: Any, units: int) -> list[Any]: ...
    def join(self, outputs: list[Any]) -> Any: ...
    def warmup(self) -> None: ...


# -- translation ---------------------------------------------------------------------------------

#: the most characters a request's texts may have to be tokenised on the event loop (about a
#: millisecond: 1.1 µs a character on the demo's tokenizer); see :meth:`TranslationRunner.inline`
INLINE_CHARS = 1024


@dataclass
class TranslateWork:
    job: TranslateJob
    ids: list[list[int]]
    tokens: list[list[str]]


@dataclass
class TokenStreams:
    """Per text of a streamed translation: its incremental detokeniser and tokens so far."""

    decoders: list[DecodeStream]
    produced: list[int]


class TranslationRunner:
    def __init__(
        self, entry: ModelEntry, providers: list[str], threads: int, limits: Limits, graphs: bool = True
    ) -> None:
        """``graphs`` false: the model decodes in a process of its own (the worker's
        :class:`~service.inference.decode_process.DecodeProcess`); this runner tokenises and
        builds answers only, and its ``providers`` are the ones that process reports."""
        self.entry = entry
        self.limits = limits
        self.translator = Translator(entry.directory, entry.manifest, providers, threads, graphs=graphs)
        self.providers = self.translator.encoder.providers if graphs else list(providers)
        self.row_by_row = batch_dependent(entry)
        self.continuous = decodes_continuously(entry)

    def options(self, job: TranslateJob) -> Options:
        tgt = self.translator.spec.target_tokenizer
        limit = self.translator.target_limit(job.max_length)
        return Options(tgt.bos_id, tgt.eos_id, limit, job.beam_size, job.length_penalty)

    def finish(self, work: TranslateWork, hypotheses: list[Hypothesis]) -> list[Translation]:
        return [self.translator.result(h, t) for h, t in zip(hypotheses, work.tokens, strict=True)]

    def token_streams(self, work: TranslateWork) -> TokenStreams:
        """What :meth:`token_event` keeps per text of a streamed translation."""
        return TokenStreams([DecodeStream(skip_special_tokens=True) for _ in work.ids], [0] * len(work.ids))

    def token_event(self, work: TranslateWork, streams: TokenStreams, token: StepToken) -> TokenEvent:
        """A token the scheduler chose → the event a client receives: its spelling, the text it
        adds (incremental detokenisation, as the whole answer's text decodes) and, when asked
        for, its attention over the text's own source tokens."""
        tokenizer = self.translator.target_tokenizer
        i = token.text
        index = streams.produced[i]
        streams.produced[i] += 1
        piece = streams.decoders[i].step(tokenizer, token.token) or ""
        alignment = layers = None
        if work.job.attention != "none":
            row = token.attention[..., : len(work.ids[i])]  # the batch's padding columns dropped
            alignment = maps.alignment(row[None])[0]
            layers = row if work.job.attention == "all" and row.ndim == 3 else None
        return TokenEvent(
            text_index=i,
            index=index,
            token_id=token.token,
            token=tokenizer.id_to_token(token.token) or "",
            piece=piece,
            logprob=token.logprob,
            alignment=alignment,
            layers=layers,
        )

    def inline(self, request: TranslateJob) -> bool:
        """Whether :meth:`preprocess` is quick enough for the event loop: texts of at most
        :data:`INLINE_CHARS` in all. More are tokenised in a thread (64 texts of 512 characters
        took 37 ms on the demo's tokenizer; Hugging Face tokenizers let go of the interpreter lock)."""
        return sum(map(len, request.texts)) <= INLINE_CHARS

    def preprocess(self, request: TranslateJob) -> TranslateWork:
        texts, field = request.texts, request.field
        if not texts:
            raise InvalidInput(f"{field}: give at least one text")
        truncate = request.truncate
        tokenized = (self.translator.tokenize(t, truncate, f"{field}[{i}]") for i, t in enumerate(texts))
        ids, tokens = zip(*tokenized, strict=True)
        self._check_answer_size(request, [len(i) for i in ids])
        return TranslateWork(request, list(ids), list(tokens))

    def _check_answer_size(self, request: TranslateJob, source_lengths: list[int]) -> None:
        """Refuse up front an answer whose attention could exceed ``limits.max_response_bytes``:
        the bound takes every text to its longest decode (``max_length`` or the model's limit)."""
        if request.attention == "none":
            return
        spec = self.translator.spec
        steps = self.translator.target_limit(request.max_length) + 1
        per_cell = 1 + (spec.num_layers * spec.num_heads if request.attention == "all" else 0)
        values = sum(steps * length * per_cell for length in source_lengths)
        smaller = "fewer texts or a smaller max_length"
        if request.attention == "all":
            smaller += ", or attention_layers 'default' (not every layer)"
        check_answer_size(values, self.limits.max_response_bytes, smaller, request.value_bytes)

    def size(self, work: TranslateWork) -> int:
        return len(work.ids)

    def split(self, work: TranslateWork, units: int) -> list[TranslateWork]:
        """Consecutive runs of at most ``units`` texts, with the request's options."""
        return [
            TranslateWork(work.job, work.ids[i : i + units], work.tokens[i : i + units])
            for i in range(0, len(work.ids), units)
        ]

    def join(self, outputs: list[list[Translation]]) -> list[Translation]:
        return [t for part in outputs for t in part]

    def infer(self, works: list[TranslateWork]) -> list[list[Translation]]:
        """Flatten every text of every request, group by decoding options, bucket by length."""
        flat = [(w, i) for w, work in enumerate(works) for i in range(len(work.ids))]
        results: dict[tuple[int, int], Translation] = {}

        def options(item: tuple[int, int]) -> tuple[int, int | None, float]:
            r = works[item[0]].job
            return r.beam_size, r.max_length, r.length_penalty

        for group in group_by(flat, options):
            beam, max_length, penalty = options(flat[group[0]])
            lengths = [len(works[flat[g][0]].ids[flat[g][1]]) for g in group]
            for bucket in length_buckets(lengths, max_size=1 if self.row_by_row else None):
                members = [flat[group[b]] for b in bucket]
                out = self.translator.translate_ids(
                    [works[w].ids[i] for w, i in members],
                    [works[w].tokens[i] for w, i in members],
                    beam,
                    max_length,
                    penalty,
                )
                results.update(zip(members, out, strict=True))
        return [[results[(w, i)] for i in range(len(work.ids))] for w, work in enumerate(works)]

    def postprocess(self, work: TranslateWork, output: list[Translation]) -> Translated:
        if work.job.attention == "none":  # nobody asked for the maps: let them go with the work
            output = [dataclasses.replace(t, attention=np.empty((0, 0), np.float32)) for t in output]
        return Translated(output)

    def warmup(self) -> None:
        self.translator.warmup()


# -- image classification ------------------------------------------------------------------------


@dataclass
class ClassifyWork:
    job: ClassifyJob
    image: np.ndarray  # the model-sized uint8 image (H, W[, C]): normalised per batch, and for overlays


class ClassificationRunner:
    def __init__(self, entry: ModelEntry, providers: list[str], threads: int, limits: Limits) -> None:
        self.entry = entry
        self.limits = limits
        self.classifier = Classifier(entry.directory, entry.manifest, providers, threads)
        self.spec = self.classifier.spec
        self.providers = self.classifier.session.providers
        self.row_by_row = batch_dependent(entry)

    def inline(self, job: ClassifyJob) -> bool:
        """Whether :meth:`preprocess` is quick enough for the event loop: an image of at most
        :data:`INLINE_BYTES` and :data:`INLINE_PIXELS` (read from its header). A larger one is
        preprocessed in a thread (4096 × 4096 pixels take 50–300 ms to decode and resize; 64 of
        them in one KServe request held every model and protocol of the replica for seconds)."""
        if job.image is not None:
            return len(job.image) <= INLINE_BYTES and decode_cost(job.image) <= INLINE_PIXELS
        return job.pixels is None or job.pixels.size <= INLINE_PIXELS * 3  # the values of RGB pixels

    def preprocess(self, job: ClassifyJob) -> ClassifyWork:
        """Decode the image bytes or take the pixel array, under the limits; resize (the batch is
        normalised in :meth:`infer`). Thread-safe: a large image comes here in a thread
        (:meth:`inline`)."""
        if (job.image is None) == (job.pixels is None):
            raise InvalidInput("image: give exactly one of an encoded image or pixels")
        if job.image is None:
            resized = resize(pixels_to_image(self._pixel_array(job.pixels, job.field), job.field), self.spec)
        else:
            resized = decode_resized(job.image, self.limits.max_image_pixels, self.spec, job.field)
        if job.attention != "none":
            values = image_answer_values(self.spec, job.attention)
            check_answer_size(values, self.limits.max_response_bytes, job.fewer_layers, job.value_bytes)
        return ClassifyWork(job, resized)

    def _pixel_array(self, pixels: Any, field: str) -> np.ndarray:
        try:
            array = np.asarray(pixels, dtype=np.float64)
        except (ValueError, TypeError, OverflowError) as exc:
            raise InvalidInput(f"{field}: must be a rectangular array of numbers") from exc
        return array

    def size(self, work: ClassifyWork) -> int:
        return 1

    def split(self, work: ClassifyWork, units: int) -> list[ClassifyWork]:
        return [work]  # one image is one unit: never larger than a batch

    def join(self, outputs: list[Any]) -> Any:
        [output] = outputs
        return output

    def infer(self, works: list[ClassifyWork]) -> list[Any]:
        if self.row_by_row:
            return [self._classify([w], w.job.attention != "none")[0] for w in works]
        attention = any(w.job.attention != "none" for w in works)  # else: logits alone
        return self._classify(works, attention)

    def _classify(self, works: list[ClassifyWork], attention: bool) -> list[Any]:
        pixels = normalise([w.image for w in works], self.spec)  # (B, C, H, W)
        return list(self.classifier.classify(pixels, attention))

    def postprocess(self, work: ClassifyWork, output: Any) -> Classified:
        job = work.job
        probs = output.probabilities
        top = output.ranked[: min(job.top_k, len(probs))]
        result = Classified(
            indices=top, probabilities=probs[top], labels=[self.spec.labels[i] for i in top], image=work.image
        )
        if job.attention != "none":
            assert output.attentions is not None  # its batch asked for attention
            result.rollout = maps.rollout(
                output.attentions, job.head_fusion, job.discard_ratio, self.spec.prefix_tokens
            ).reshape(self.spec.grid)
            result.rollout_kind = f"rollout-{job.head_fusion}"
        if job.attention == "all":
            result.attentions = output.attentions
        return result

    def warmup(self) -> None:
        """Run a batch and lay its map on the patch grid: a manifest whose labels, ``prefix_tokens``
        or grid does not fit the graph's outputs fails here, at start, not on every request."""
        blank = np.zeros((2, self.spec.channels, self.spec.height, self.spec.width), dtype=np.float32)
        output = self.classifier.classify(blank)[0]
        if len(output.probabilities) != len(self.spec.labels):
            raise ValueError(
                f"{self.entry.name}: the graph scores {len(output.probabilities)} classes, the manifest "
                f"names {len(self.spec.labels)} labels"
            )
        attentions = output.attentions  # (layers, heads, T, T)
        assert attentions is not None
        rows, cols = self.spec.grid
        if attentions.shape[-1] != self.spec.prefix_tokens + rows * cols:
            raise ValueError(
                f"{self.entry.name}: attention covers {attentions.shape[-1]} tokens, the manifest's image "
                f"section says {self.spec.prefix_tokens} + {rows}×{cols} patches"
            )


def batch_dependent(entry: ModelEntry) -> bool:
    """Whether a row's output depends on the other rows of its graph call. ONNX Runtime's dynamic
    quantization computes each activation's int8 scale over the whole tensor, batch included, so
    in a batch one request's answer would move with its neighbours' (by ~1e-3 on fashion-vit-int8).
    Such models run one row per graph call — still queued and batched per model — so every answer
    equals the one the request gets alone."""
    quantization = entry.manifest.export.quantization
    return bool(quantization and "dynamic" in quantization.lower())


#: JSON bytes per attention value as answered ("0.123456," — rounded to 6 decimals); a KServe v2
#: binary or gRPC answer writes 4 (float32)
BYTES_PER_VALUE = 9
RAW_BYTES_PER_VALUE = 4


def image_answer_values(spec: ImageSpec, attention: str) -> int:
    """The attention values one image's answer carries: none, its rollout (a value per patch),
    and with ``"all"`` every layer's and head's token-by-token map too."""
    if attention == "none":
        return 0
    patches = spec.grid[0] * spec.grid[1]
    tokens = spec.prefix_tokens + patches
    return patches + (spec.num_layers * spec.num_heads * tokens * tokens if attention == "all" else 0)


def check_answer_size(values: int, limit: int, smaller: str, value_bytes: int = BYTES_PER_VALUE) -> None:
    """Refuse an answer of ``values`` attention values written ``value_bytes`` each over ``limit``."""
    if values * value_bytes > limit:
        raise ResponseTooLarge(
            f"attention: the answer could reach {values * value_bytes:,} bytes, over the service's "
            f"limits.max_response_bytes ({limit:,}; ATTN_LIMITS__MAX_RESPONSE_BYTES); ask for {smaller}"
        )


def decodes_continuously(entry: ModelEntry) -> bool:
    """A translation model whose rows carry their own state and position, so the scheduler can mix
    them at every step (the whole-prefix ``transformer`` contract cannot; a batch-dependent graph
    must not)."""
    spec = entry.manifest.translation
    return spec is not None and spec.decoder != "transformer" and not batch_dependent(entry)


def make_runner(
    entry: ModelEntry, providers: list[str], threads: int, limits: Limits, graphs: bool = True
) -> Runner:
    if entry.manifest.task == "translation":
        return TranslationRunner(entry, providers, threads, limits, graphs)
    return ClassificationRunner(entry, providers, threads, limits)
