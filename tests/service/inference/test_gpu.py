"""On a CUDA GPU (skipped elsewhere): the built demo models on CUDA against the CPU provider.

Needs no PyTorch, so ``benchmarks/gpu_check.sh`` runs it from ``.venv-gpu`` (onnxruntime-gpu) on
the repository ``make models`` wrote (``GPU_TEST_REPOSITORY``, default ``model_repository``; not
ATTN_-prefixed: the service's settings refuse unknown ATTN_ variables).
fp32 on CUDA, as served, matches CPU within 1e-3 (the sessions turn off TF32, which ONNX Runtime's
CUDA provider allows by default: its matmuls then round inputs to 10-bit mantissas); the resident
decoder loop decodes the same tokens as the numpy loop on CPU, for every translation model of the
repository; an fp16 variant stays within its export tolerance.
"""

from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from service.inference.decode_process import DecodeProcess
from service.inference.jobs import Classified, ClassifyJob, Translated, TranslateJob
from service.inference.manifest import Manifest
from service.inference.repository import load_entry
from service.inference.runners import TranslationRunner
from service.inference.runtime import GraphSession
from service.inference.scheduler import TranslationScheduler
from service.inference.translation import Translator
from service.inference.worker import ModelWorker
from service.settings import Settings

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        "CUDAExecutionProvider" not in ort.get_available_providers(),
        reason="needs onnxruntime-gpu and a CUDA GPU",
    ),
]
CUDA, CPU = ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]
TEXTS = ["3 mars 2011", "Saturday, January 22, 1994", "1. Dezember 1987", "el 7 de julio de 2020", "9/9/86"]


@pytest.fixture(scope="module")
def repository() -> Path:
    path = Path(os.environ.get("GPU_TEST_REPOSITORY", "model_repository"))
    if not (path / "fashion-vit" / "1" / "manifest.json").exists():
        pytest.skip(f"no built demo models in {path} (make models)")
    return path


def test_the_vit_on_cuda_matches_cpu(repository: Path) -> None:
    directory = repository / "fashion-vit" / "1"
    graph = Manifest.load(directory).graphs["model"]
    pixels = np.random.default_rng(0).standard_normal((64, 1, 48, 48)).astype(np.float32)
    want = GraphSession(directory / graph.file, graph, CPU).run({"pixels": pixels})
    served = GraphSession(directory / graph.file, graph, CUDA)
    assert served.on_gpu
    got = served.run({"pixels": pixels})
    np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-3)  # 1.3e-3 with TF32
    np.testing.assert_allclose(got["attentions"], want["attentions"], atol=1e-3)


#: French verses for bible-fr-en-transformer (``make models-real``), beside the dates
VERSES = [
    "Au commencement, Dieu créa les cieux et la terre.",
    "Et Dieu dit: Que la lumière soit! Et la lumière fut.",
    "Heureux ceux qui procurent la paix, car ils seront appelés fils de Dieu!",
]


@pytest.mark.parametrize("name", ["dates-transformer", "dates-bahdanau", "bible-fr-en-transformer"])
@pytest.mark.parametrize("beam", [1, 3])
def test_the_resident_loop_on_cuda_decodes_as_the_cpu(repository: Path, name: str, beam: int) -> None:
    """On a real-sized model too: with TF32 allowed, bible-fr-en-transformer decoded one text in
    eight to other tokens on CUDA."""
    directory = repository / name / "1"
    if not directory.exists():
        pytest.skip(f"{name} not built (make models-real)")
    manifest = Manifest.load(directory)
    gpu = Translator(directory, manifest, CUDA)
    assert gpu.ops is not None and gpu.ops.device == "cuda"
    cpu = Translator(directory, manifest, CPU)
    texts = TEXTS + VERSES
    for a, b in zip(cpu.translate(texts, beam), gpu.translate(texts, beam), strict=True):
        assert a.target_tokens == b.target_tokens
        np.testing.assert_allclose(a.attention, b.attention, atol=1e-2)


@pytest.mark.parametrize("name", ["fashion-vit-fp16", "dates-transformer-fp16"])
def test_fp16_variants_on_cuda_stay_near_fp32(repository: Path, name: str) -> None:
    directory = repository / name / "1"
    if not directory.exists():
        pytest.skip(f"{name} not exported (export --precision fp16)")
    manifest = Manifest.load(directory)
    base = repository / name.removesuffix("-fp16") / "1"
    if manifest.task == "image-classification":
        graph, fp32 = manifest.graphs["model"], Manifest.load(base).graphs["model"]
        pixels = np.random.default_rng(0).standard_normal((32, 1, 48, 48)).astype(np.float32)
        got = GraphSession(directory / graph.file, graph, CUDA).run({"pixels": pixels}, ["logits"])["logits"]
        want = GraphSession(base / fp32.file, fp32, CPU).run({"pixels": pixels}, ["logits"])["logits"]
        assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95
        np.testing.assert_allclose(
            got.astype(np.float32), want, atol=3e-2 * max(1.0, float(np.abs(want).max()))
        )
    else:
        halves = Translator(directory, manifest, CUDA).translate(TEXTS)
        singles = Translator(base, Manifest.load(base), CPU).translate(TEXTS)
        same = sum(a.target_tokens == b.target_tokens for a, b in zip(halves, singles, strict=True))
        assert same >= len(TEXTS) - 1


def worker(
    repository: Path, name: str, decode_process: bool = True, providers: list[str] = CUDA
) -> ModelWorker:
    """The model's worker as a replica holds it, on CUDA (or ``providers``)."""
    settings = Settings(repository=repository, providers=providers, decode_process=decode_process)
    return ModelWorker(load_entry(repository, name, 1), settings, "gpu", "local")


@pytest.mark.parametrize("process", [True, False], ids=["decode-process", "thread"])
def test_the_served_decode_loop_on_cuda_answers_as_each_text_alone_on_cpu(
    repository: Path, process: bool
) -> None:
    """40 concurrent greedy and beam requests through the worker's scheduler — in a decode process
    of its own (the default: the child picks CUDA and the resident loop itself) or on a thread —
    each equal to its text decoded alone on the CPU."""
    served = worker(repository, "dates-transformer", decode_process=process)
    try:
        if process:
            assert isinstance(served.scheduler, DecodeProcess)
            assert served.scheduler.providers[0] == "CUDAExecutionProvider"
        else:
            assert isinstance(served.scheduler, TranslationScheduler)
            assert isinstance(served.runner, TranslationRunner)
            assert served.runner.translator.ops is not None  # resident on the GPU
        directory = repository / "dates-transformer" / "1"
        cpu = Translator(directory, Manifest.load(directory), CPU)
        jobs = [TranslateJob(texts=[t], beam_size=b) for _ in range(4) for b in (1, 3) for t in TEXTS]

        async def everyone() -> list:
            return await asyncio.gather(*(served.predict(j) for j in jobs))

        for job, answer in zip(jobs, asyncio.run(everyone()), strict=True):
            assert isinstance(answer.result, Translated)
            [alone] = cpu.translate(job.texts, job.beam_size)
            assert answer.result.translations[0].target_tokens == alone.target_tokens, job
    finally:
        served.close()


def test_the_image_worker_batches_concurrent_requests_on_cuda(repository: Path) -> None:
    """64 concurrent PNGs through the ViT's worker on CUDA: batched (the metrics say so), each
    answer's classes those of the CPU provider."""
    rng = np.random.default_rng(1)
    pngs = []
    for i in range(64):
        buffer = io.BytesIO()
        size = 28 if i % 2 else 48
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), "L").save(buffer, "PNG")
        pngs.append(buffer.getvalue())
    jobs = [ClassifyJob(image=png, top_k=3) for png in pngs]
    cpu, gpu = worker(repository, "fashion-vit", providers=CPU), worker(repository, "fashion-vit")
    assert gpu.runner.providers[0] == "CUDAExecutionProvider" and gpu.max_batch_size == 128

    async def everyone(w: ModelWorker) -> list:
        return await asyncio.gather(*(w.predict(j) for j in jobs))

    try:
        got, want = asyncio.run(everyone(gpu)), asyncio.run(everyone(cpu))
    finally:
        gpu.close()
        cpu.close()
    assert max(a.metrics.batch_size for a in got) > 1
    for a, b in zip(got, want, strict=True):
        assert isinstance(a.result, Classified) and isinstance(b.result, Classified)
        assert a.result.indices[0] == b.result.indices[0]
        np.testing.assert_allclose(a.result.probabilities, b.result.probabilities, atol=1e-2)


def test_cuda_sessions_search_convolutions_by_heuristic_without_tf32(repository: Path) -> None:
    """Not ONNX Runtime's default exhaustive search per input shape: served batches change size
    all the time (on an H200 it made the ViT's batches 4–6 × slower over HTTP)."""
    directory = repository / "fashion-vit" / "1"
    graph = Manifest.load(directory).graphs["model"]
    session = GraphSession(directory / graph.file, graph, CUDA).session
    options = session.get_provider_options()["CUDAExecutionProvider"]
    assert options["cudnn_conv_algo_search"] == "HEURISTIC" and options["use_tf32"] == "0"
