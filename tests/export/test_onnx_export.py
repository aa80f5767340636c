"""Every family and every RNN scorer round-trips through the exporter, and the verdict can fail."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import Tensor, nn

from export.graphs import GraphPlan, plans_for
from export.onnx_export import ExportVerificationError, export_graph
from tests.export.tiny_graphs import FAMILIES, TinyGraphs, tiny


def dims(path: Path, name: str) -> list[int | str]:
    model = onnx.load(str(path))
    value = next(v for v in [*model.graph.input, *model.graph.output] if v.name == name)
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip(family: str, tiny_graphs: TinyGraphs) -> None:
    exported = tiny_graphs(family)
    for plan, graph in zip(exported.plans, exported.graphs, strict=True):
        path = exported.directory / plan.file
        # every intended dynamic axis is symbolic in the written file, inputs and outputs alike
        for name, axes in plan.dynamic.items():
            shape = dims(path, name)
            assert all(isinstance(shape[a], str) for a in axes), (name, shape)
        assert max(graph.max_abs_diff.values()) <= 1e-4
        # and a shape the exporter never saw still agrees with PyTorch
        unseen = {"batch": 6, "src_len": 17, "tgt_len": 7, "past_len": 12}
        inputs = plan.make_inputs(unseen, torch.Generator().manual_seed(7))
        with torch.no_grad():
            expected = plan.module(*inputs)
        expected = (expected,) if isinstance(expected, Tensor) else expected
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = dict(zip(plan.input_names, (t.numpy() for t in inputs), strict=True))
        got = session.run(plan.output_names, {i.name: feeds[i.name] for i in session.get_inputs()})
        for want, have in zip(expected, got, strict=True):
            np.testing.assert_allclose(have, want.numpy(), atol=1e-4)


class _PinsLength(nn.Module):
    """Reshapes with a Python constant: the exporter bakes the traced length into the graph."""

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], 5, 2).sum(-1)


def test_verdict_refuses_a_graph_that_pinned_an_axis(tmp_path: Path) -> None:
    def inputs(shape: dict[str, int], gen: torch.Generator) -> tuple[Tensor, ...]:
        return (torch.randn(shape["batch"], shape["n"], generator=gen),)

    plan = GraphPlan(
        "model",
        "pinned.onnx",
        _PinsLength(),
        ["x"],
        ["y"],
        {"x": {0: "batch", 1: "n"}, "y": {0: "batch", 1: "n"}},
        inputs,
        [{"batch": 2, "n": 10}, {"batch": 1, "n": 10}, {"batch": 3, "n": 10}],
    )
    with pytest.raises(Exception) as info:
        export_graph(plan, tmp_path)
    # torch.export itself may refuse the specialisation; if it lets it through, our check must
    assert isinstance(info.value, ExportVerificationError) or "n" in str(info.value)


def test_verdict_refuses_a_graph_that_differs_from_pytorch(tmp_path: Path) -> None:
    model = tiny("vit")
    plan = plans_for(model)[0]
    with pytest.raises(ExportVerificationError, match="differs from PyTorch"):
        export_graph(plan, tmp_path, tolerance=1e-12)
