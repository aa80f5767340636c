"""ONNX Runtime sessions: provider choice, thread counts, and feeding graphs by manifest names."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.inference.device import ORT_DTYPES, DeviceArray
from service.inference.manifest import GraphSpec

log = logging.getLogger(__name__)


def choose_providers(requested: list[str]) -> list[str]:
    """The requested execution providers that this onnxruntime build has, CPU always last.

    Asking for CUDA on a CPU-only build is not an error — it falls back and says so — because
    the same config runs on laptops and GPU nodes.
    """
    available = set(ort.get_available_providers())
    chosen = [p for p in requested if p in available and p != "CPUExecutionProvider"]
    missing = [p for p in requested if p not in available]
    if missing:
        why = (
            "this onnxruntime build has no CUDA provider: the GPU wheel comes with the serve-gpu "
            "extra (make serve-gpu)"
            if "CUDAExecutionProvider" in missing
            else "this onnxruntime build lacks them"
        )
        log.warning("execution providers %s are not available (%s); using %s", missing, why, [*chosen, "CPU"])
    if "CUDAExecutionProvider" in chosen:
        _preload_cuda()
    return [*chosen, "CPUExecutionProvider"]


def _preload_cuda() -> None:
    """Load CUDA and cuDNN from the nvidia-* pip wheels the serve-gpu extra installs (ONNX Runtime
    ≥ 1.21's ``preload_dlls``); a machine with system CUDA finds them without it."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as exc:  # the session's fallback below says what it means
        log.warning("could not preload the CUDA/cuDNN libraries: %s", exc)


def _declared(spec: GraphSpec, name: str, ort_type: str) -> np.dtype:
    declared = spec.input(name)
    return np.dtype(declared.dtype if declared else ORT_DTYPES[ort_type])


#: ONNX Runtime's CUDA provider benchmarks the cuDNN convolution algorithms per input shape by
#: default (EXHAUSTIVE); a served batch has whatever size accumulated (1 … max batch), and on an
#: H200 the ViT served over HTTP computed its batches in 48–56 ms with it against 8–14 ms with
#: cuDNN's heuristic (8 and 64 clients: 82 → 453 and 571 → 2,178 images/s;
#: benchmarks/results/2026-12-04-gpu.md). TF32 off (ONNX Runtime allows it by default; PyTorch's
#: matmuls do not): an fp32 model answers on CUDA what it answers on CPU — with TF32 the H200 gave
#: the ViT's logits 1.3e-3 away from the CPU's and bible-fr-en-transformer a different greedy
#: decode for 1 text in 8 — and these models are not bound by the GPU's matmuls (the speed path
#: on a GPU is an fp16 variant, ``export --precision fp16``).
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "0"}


class GraphSession:
    """One ONNX graph. ``run`` takes a dict of every tensor the caller has and feeds only the
    inputs the graph declares, so optional inputs (e.g. an RNN decoder's ``step``) just work."""

    def __init__(self, path: Path, spec: GraphSpec, providers: list[str], intra_op_threads: int = 1) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        with_options = [(p, CUDA_OPTIONS) if p == "CUDAExecutionProvider" else p for p in providers]
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=with_options)
        self.spec = spec
        self.input_names = [i.name for i in self.session.get_inputs()]
        #: what each input is fed as: the dtype the manifest declares (an fp16 graph takes float16)
        self.input_dtypes = {i.name: _declared(spec, i.name, i.type) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in spec.outputs]
        self.providers = self.session.get_providers()
        if "CUDAExecutionProvider" in providers and "CUDAExecutionProvider" not in self.providers:
            log.warning(
                "%s: CUDA was asked for, but ONNX Runtime could not start it (no GPU visible, or the "
                "driver / CUDA 12 / cuDNN 9 libraries missing: its own error is above); running on CPU",
                path.name,
            )
        self.on_gpu = self.providers[0] == "CUDAExecutionProvider"

    def run(self, tensors: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """The graph's outputs (or only ``outputs``: ONNX Runtime then neither keeps nor copies
        out the others, e.g. a ViT's attention when nobody asked for it)."""
        names = self.output_names if outputs is None else outputs
        if self.on_gpu:
            return self._run_bound(tensors, names)
        values = self.session.run(names, self.feeds(tensors))
        return dict(zip(names, values, strict=True))

    def feeds(self, tensors: dict[str, Any]) -> dict[str, Any]:
        """The graph's inputs from ``tensors``, each as the dtype the graph takes (no copy when it
        already is; a :class:`DeviceArray` — a previous output kept on the device — as it is)."""
        return {
            name: value if isinstance(value := tensors[name], DeviceArray)
            else np.asarray(value).astype(self.input_dtypes[name], copy=False)
            for name in self.input_names
        }  # fmt: skip

    def _run_bound(self, tensors: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        """CUDA: bind inputs and outputs explicitly (one host↔device copy each way, no per-run
        allocation negotiation) — ONNX Runtime's I/O binding."""
        binding = self.session.io_binding()
        for name, value in self.feeds(tensors).items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in names:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        return dict(zip(names, binding.copy_outputs_to_cpu(), strict=True))
