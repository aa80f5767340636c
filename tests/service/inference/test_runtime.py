"""ONNX Runtime sessions: provider choice, feeding by name, and the CUDA path where a GPU exists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service.inference.manifest import Manifest
from service.inference.runtime import GraphSession, choose_providers
from service.settings import GPU_MAX_BATCH_SIZE, Settings

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def test_cuda_is_dropped_with_a_warning_where_absent(caplog: pytest.LogCaptureFixture) -> None:
    chosen = choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert chosen[-1] == "CPUExecutionProvider"
    if not HAS_CUDA:
        assert chosen == ["CPUExecutionProvider"] and "not available" in caplog.text


def test_gpu_settings_ask_for_a_gpu_and_bigger_batches(tmp_path: Path) -> None:
    gpu = Settings(
        repository=tmp_path,
        providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
        num_gpus_per_replica=1,
    )
    assert gpu.use_gpu and gpu.batching_for("m").max_batch_size == GPU_MAX_BATCH_SIZE
    explicit = Settings(repository=tmp_path, providers=["CUDAExecutionProvider"], num_gpus_per_replica=1,
                        batching={"max_batch_size": 16})  # fmt: skip
    assert explicit.batching_for("m").max_batch_size == 16
    assert not Settings(repository=tmp_path).use_gpu


@pytest.mark.slow
def test_graph_session_feeds_only_declared_inputs(tiny_repository: Path) -> None:
    directory = tiny_repository / "dates-bahdanau" / "1"
    graph = Manifest.load(directory).graphs["encoder"]
    session = GraphSession(directory / graph.file, graph, ["CPUExecutionProvider"])
    src = np.array([[5, 6, 2]], dtype=np.int64)
    out = session.run({"src": src, "src_mask": src > 0, "unrelated": np.zeros(1)})
    assert set(out) == {"memory", "init_state"} and out["memory"].shape[:2] == (1, 3)
