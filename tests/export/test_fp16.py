"""float16 conversion on tiny random-weight models of each family (the RNN's GRU encoder and step,
every scorer — the local ones' window holds ops the converter keeps in float32 —, the Transformer's
KV-cached encoder and step, the ViT): ONNX Runtime's CPU provider runs every
converted graph, every float input and output becomes float16, and fed as the manifest would
declare, the outputs stay within the stated tolerance of fp32's at every verification shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export import fp16
from export.onnx_export import graph_spec
from service.inference.runtime import GraphSession
from tests.export.tiny_graphs import FAMILIES, TinyGraphs

CPU = ["CPUExecutionProvider"]


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "transformer-prefix"])
def test_converted_graphs_run_on_cpu_within_tolerance(
    family: str, tiny_graphs: TinyGraphs, tmp_path: Path
) -> None:
    exported = tiny_graphs(family)
    for plan in exported.plans:
        full, half = exported.directory / plan.file, tmp_path / f"fp16-{plan.file}"
        fp16.convert(full, half)
        full_spec = graph_spec(onnx.load(str(full)), plan.file)
        half_spec = graph_spec(onnx.load(str(half)), plan.file)
        assert [(t.name, t.shape) for t in half_spec.inputs + half_spec.outputs] == [
            (t.name, t.shape) for t in full_spec.inputs + full_spec.outputs
        ]
        assert [t.dtype for t in half_spec.inputs + half_spec.outputs] == [
            "float16" if t.dtype == "float32" else t.dtype for t in full_spec.inputs + full_spec.outputs
        ]
        ours, theirs = GraphSession(full, full_spec, CPU), GraphSession(half, half_spec, CPU)
        for i, shape in enumerate(plan.shapes):
            inputs = plan.make_inputs(shape, torch.Generator().manual_seed(i))
            feeds = {name: t.numpy() for name, t in zip(plan.input_names, inputs, strict=True)}
            want, have = ours.run(feeds), theirs.run(feeds)  # fed float32, cast as declared
            for name, expected in want.items():
                got = have[name]
                assert got.dtype == (np.float16 if expected.dtype == np.float32 else expected.dtype)
                assert got.shape == expected.shape and np.isfinite(got.astype(np.float32)).all()
                scale = max(1.0, float(np.abs(expected).max(initial=0)))
                diff = float(np.abs(got.astype(np.float32) - expected).max(initial=0))
                assert diff <= fp16.TOLERANCE * scale, (plan.file, name, shape, diff)
