"""Fake models and a server over them, for the seams that need no Ray and no ONNX graph: what a
protocol adapter sends the core and what it makes of the answer.

The fake translator answers each text reversed, with a score of minus its length and an
alignment grid that points every target character at its mirrored source character; the fake
classifier scores class ``i`` by the share of pixels equal to ``i`` (or the image's byte length
modulo the class count), so every answer is predictable from the request alone.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from service.api.server import Server
from service.errors import InvalidInput
from service.inference.jobs import Answer, AnswerMetrics, Classified, ClassifyJob, Translated, TranslateJob
from service.inference.manifest import ExportInfo, ImageSpec, Manifest, TokenizerSpec, TranslationSpec
from service.inference.repository import ModelEntry
from service.inference.statistics import Snapshot, Statistics
from service.inference.translation import Translation
from service.settings import Settings

LABELS = ["zero", "one", "two", "three"]


def metrics(tokens: int | None = None) -> AnswerMetrics:
    return AnswerMetrics(queue_wait_ms=1.0, compute_ms=2.0, batch_size=1, tokens_generated=tokens,
                         replica="fake", node="node")  # fmt: skip


@dataclass
class FakeTranslator:
    name: str = "fake-translator"
    version: int = 1
    delay_s: float = 0.0
    jobs: list[TranslateJob] = field(default_factory=list)

    statistics: Statistics = field(default_factory=Statistics)

    async def stats(self) -> Snapshot:
        return self.statistics.snapshot(self.name, self.version)

    async def predict(self, job: TranslateJob) -> Answer:
        self.jobs.append(job)
        self.statistics.answered(len(job.texts), self.delay_s, 0.0, 0.0, self.delay_s)
        await asyncio.sleep(self.delay_s)
        out = []
        for text in job.texts:
            n = len(text)
            grid = np.eye(n, dtype=np.float32)[::-1]  # (T, S): target i looks at source n-1-i
            out.append(Translation(text[::-1], list(text), list(text[::-1]), -float(n), grid, True))
        result = Translated(out)
        return Answer(self.name, self.version, result, metrics(result.tokens_generated))

    async def stream(self, job: TranslateJob) -> AsyncIterator[Answer]:
        """A streamed translation without its tokens: the answer alone."""
        yield await self.predict(job)

    async def info(self) -> dict[str, Any]:
        return {"providers": ["CPUExecutionProvider"], "max_batch_size": 4, "warmup_ms": 1.0}


@dataclass
class FakeClassifier:
    name: str = "fake-classifier"
    version: int = 1
    jobs: list[ClassifyJob] = field(default_factory=list)

    statistics: Statistics = field(default_factory=Statistics)

    async def stats(self) -> Snapshot:
        return self.statistics.snapshot(self.name, self.version)

    async def predict(self, job: ClassifyJob) -> Answer:
        self.jobs.append(job)
        self.statistics.answered(1, 0.0, 0.0, 0.0, 0.0)
        if job.image is not None:
            try:
                pixels = np.asarray(Image.open(io.BytesIO(job.image)).convert("L"))
            except Exception as exc:
                raise InvalidInput("image: not a decodable image") from exc
        else:
            assert job.pixels is not None
            pixels = np.asarray(job.pixels)
        probs = np.array([(pixels == i).mean() for i in range(len(LABELS))], dtype=np.float32) + 1e-3
        probs /= probs.sum()
        top = np.argsort(-probs, kind="stable")[: job.top_k]
        result = Classified(top, probs[top], [LABELS[i] for i in top], image=pixels.astype(np.uint8))
        if job.attention != "none":
            result.rollout = np.full((2, 2), 0.25, dtype=np.float32)
            result.rollout_kind = f"rollout-{job.head_fusion}"
        if job.attention == "all":
            result.attentions = np.full((1, 1, 5, 5), 0.2, dtype=np.float32)
        return Answer(self.name, self.version, result, metrics())

    async def info(self) -> dict[str, Any]:
        return {"providers": ["CPUExecutionProvider"], "max_batch_size": 4, "warmup_ms": 1.0}


class Recorded:
    """Request metrics, kept for the test to read."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, int]] = []

    def record(self, model: str, route: str, status: int, seconds: float) -> None:
        self.records.append((model, route, status))


def entry(name: str, task: str, tmp: Path) -> ModelEntry:
    """A served entry with a manifest of the right shape; its graphs are never opened."""
    tokenizer = TokenizerSpec(file="t.json", pad_id=0, bos_id=1, eos_id=2, unk_id=3, vocab_size=10)
    translation = TranslationSpec(
        source_language="text", target_language="reversed text", source_tokenizer=tokenizer,
        target_tokenizer=tokenizer, decoder="rnn", state_size=4, max_source_tokens=8, max_target_tokens=8,
    )  # fmt: skip
    image = ImageSpec(height=4, width=4, channels=1, mean=[0.0], std=[1.0], labels=LABELS, patch_size=2,
                      num_layers=1, num_heads=1)  # fmt: skip
    manifest = Manifest.model_construct(
        name=name, version=1, task=task, family="rnn-additive" if task == "translation" else "vit",
        description="fake", graphs={}, eval={}, eval_details={}, checksums={},
        export=ExportInfo.model_construct(quantization=None),
        translation=translation if task == "translation" else None,
        image=image if task != "translation" else None,
    )  # fmt: skip
    return ModelEntry(name=name, version=1, directory=tmp, manifest=manifest)


def fake_server(tmp: Path, **settings: Any) -> tuple[Server, FakeTranslator, FakeClassifier, Recorded]:
    translator, classifier, recorded = FakeTranslator(), FakeClassifier(), Recorded()
    server = Server(Settings(repository=tmp, **settings), recorded)
    server.serve(
        {translator.name: translator, classifier.name: classifier},
        {translator.name: entry(translator.name, "translation", tmp),
         classifier.name: entry(classifier.name, "image-classification", tmp)},
        {"broken/1": "failed to load: a reason"},
    )  # fmt: skip
    return server, translator, classifier, recorded
