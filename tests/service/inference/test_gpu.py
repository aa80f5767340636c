"""On a CUDA GPU (skipped elsewhere): the built demo models on CUDA against the CPU provider.

Needs no PyTorch, so ``benchmarks/gpu_check.sh`` runs it from ``.venv-gpu`` (onnxruntime-gpu) on
the repository ``make models`` wrote (``ATTN_GPU_TEST_REPOSITORY``, default ``model_repository``).
fp32 on CUDA matches CPU within 1e-3 with TF32 off (ONNX Runtime's CUDA provider allows TF32 by
default: its matmuls then round inputs to 10-bit mantissas); the resident decoder loop decodes the
same tokens as the numpy loop on CPU; an fp16 variant stays within its export tolerance.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service.inference.manifest import Manifest
from service.inference.runtime import GraphSession
from service.inference.translation import Translator

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
    path = Path(os.environ.get("ATTN_GPU_TEST_REPOSITORY", "model_repository"))
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
    np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-2)  # TF32 allowed, as served
    strict = ort.InferenceSession(
        str(directory / graph.file),
        providers=[("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"],
    )
    logits, attentions = strict.run(["logits", "attentions"], {"pixels": pixels})
    np.testing.assert_allclose(logits, want["logits"], atol=1e-3)
    np.testing.assert_allclose(attentions, want["attentions"], atol=1e-3)


@pytest.mark.parametrize("name", ["dates-transformer", "dates-bahdanau"])
@pytest.mark.parametrize("beam", [1, 3])
def test_the_resident_loop_on_cuda_decodes_as_the_cpu(repository: Path, name: str, beam: int) -> None:
    directory = repository / name / "1"
    manifest = Manifest.load(directory)
    gpu = Translator(directory, manifest, CUDA)
    assert gpu.ops is not None and gpu.ops.device == "cuda"
    cpu = Translator(directory, manifest, CPU)
    for a, b in zip(cpu.translate(TEXTS, beam), gpu.translate(TEXTS, beam), strict=True):
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
        fp16 = Translator(directory, manifest, CUDA).translate(TEXTS)
        fp32 = Translator(base, Manifest.load(base), CPU).translate(TEXTS)
        same = sum(a.target_tokens == b.target_tokens for a, b in zip(fp16, fp32, strict=True))
        assert same >= len(TEXTS) - 1
