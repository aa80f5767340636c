"""Ceilings measured without a server: what ONNX Runtime alone does with the same graphs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from service.inference.manifest import Manifest
from service.inference.runtime import GraphSession
from service.inference.translation import Translator
from service.inference.vision import decode_image, mode_of, normalise, resize

BATCHES = (1, 8, 32, 64, 128)
TEXTS = ["5 mars 2024", "Tuesday, July 4, 1995", "31.12.1999", "12 de mayo de 2003", "3 juin 1980",
         "Samstag, 15. Mai 1976", "9/9/1986", "mar, 31 mar 2009"]  # fmt: skip


def timed(fn: Any, min_s: float = 1.0) -> float:
    """Calls per second of ``fn`` over at least ``min_s`` seconds (after one warm-up call)."""
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_s:
        fn()
        n += 1
    return n / (time.perf_counter() - start)


def vit_images_per_s(directory: Path) -> dict[str, Any]:
    manifest = Manifest.load(directory)
    graph = manifest.graphs["model"]
    session = GraphSession(directory / graph.file, graph, ["CPUExecutionProvider"], intra_op_threads=1)
    assert manifest.image is not None
    by_batch = {}
    for b in BATCHES:
        x = np.zeros(
            (b, manifest.image.channels, manifest.image.height, manifest.image.width), dtype=np.float32
        )
        by_batch[b] = b * timed(lambda x=x: session.run({"pixels": x}))
    best = max(by_batch, key=lambda b: by_batch[b])
    return {"images_per_s_by_batch": by_batch, "best_batch": best, "images_per_s": by_batch[best]}


def vit_pipeline_images_per_s(
    directory: Path,
    images: list[bytes],
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
    batches: tuple[int, ...] = BATCHES,
    min_s: float = 1.0,
) -> dict[str, Any]:
    """What one process on one ONNX Runtime thread does with encoded images and nothing else: at
    each batch size, the service's own decode + preprocess of every image, then one run for the
    logits (``raw``: the run alone, on pixels ready) — the ceiling a server's image path has
    (``providers``: on a GPU the run is CUDA's, the decode and preprocessing still this core's)."""
    manifest = Manifest.load(directory)
    graph = manifest.graphs["model"]
    session = GraphSession(directory / graph.file, graph, list(providers), intra_op_threads=1)
    spec = manifest.image
    assert spec is not None

    def pixels(batch: list[bytes]) -> np.ndarray:
        # as the service: decode and resize per image, normalise per batch
        images = [resize(decode_image(d, 1 << 30, mode_of(spec)), spec) for d in batch]
        return normalise(images, spec)

    pipeline, raw = {}, {}
    for b in batches:
        batch = (images * (b // len(images) + 1))[:b]
        x = pixels(batch)
        raw[b] = b * timed(lambda x=x: session.run({"pixels": x}, ["logits"]), min_s)
        pipeline[b] = b * timed(lambda batch=batch: session.run({"pixels": pixels(batch)}, ["logits"]), min_s)
    best, best_raw = max(pipeline, key=lambda b: pipeline[b]), max(raw, key=lambda b: raw[b])
    return {
        "pipeline_images_per_s_by_batch": pipeline, "raw_images_per_s_by_batch": raw,
        "best_batch": best, "images_per_s": pipeline[best],
        "raw_best_batch": best_raw, "raw_images_per_s": raw[best_raw],
    }  # fmt: skip


def nmt_tokens_per_s(directory: Path, batch: int = 64) -> dict[str, Any]:
    """Offline batched greedy decoding of the same graphs (one ORT thread, like a replica)."""
    translator = Translator(directory, Manifest.load(directory), ["CPUExecutionProvider"], threads=1)
    texts = (TEXTS * (batch // len(TEXTS) + 1))[:batch]
    tokens = sum(len(t.target_tokens) for t in translator.translate(texts))
    return {"batch": batch, "tokens_per_s": tokens * timed(lambda: translator.translate(texts))}


def measure(repository: Path) -> dict[str, Any]:
    return {
        "tiny-vit": vit_images_per_s(repository / "tiny-vit" / "1"),
        "fashion-vit": vit_images_per_s(repository / "fashion-vit" / "1"),
        "dates-transformer": nmt_tokens_per_s(repository / "dates-transformer" / "1"),
        "dates-bahdanau": nmt_tokens_per_s(repository / "dates-bahdanau" / "1"),
    }
