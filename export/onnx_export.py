"""Export a graph plan to ONNX and give a verdict before anything is written to the repository.

Pipeline per graph: ``torch.onnx.export(dynamo=True)`` with the plan's dynamic axes →
``onnx.checker`` (full check) → assert every intended dynamic axis is a symbolic ``dim_param``
(the exporter can silently pin one) → run ONNX Runtime and PyTorch on the same inputs at every
verification shape and compare every output (logits *and* attention) at a stated tolerance.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from dataclasses import dataclass
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
from torch.export import Dim

from export.graphs import GraphPlan
from service.inference.manifest import ExportInfo, GraphSpec, TensorSpec

TOLERANCE = 1e-4
_ONNX_DTYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.UINT8: "uint8",
}
log = logging.getLogger(__name__)


class ExportVerificationError(RuntimeError):
    """The exported graph is not faithful to the PyTorch model; nothing was written."""


@dataclass
class ExportedGraph:
    spec: GraphSpec
    max_abs_diff: dict[str, float]  # output name → worst diff over all shapes
    opset: int


#: the packages whose versions every manifest records (an importer adds its own)
EXPORT_TOOLS = ("torch", "onnx", "onnxscript", "onnxruntime")


def export_info(
    graphs: dict[str, ExportedGraph], shapes: list[dict[str, int]], extra_tools: tuple[str, ...] = ()
) -> ExportInfo:
    """The manifest's ``export`` section: tool versions, opset, and the measured parity."""
    parity = {f"{key}.{out}": diff for key, g in graphs.items() for out, diff in g.max_abs_diff.items()}
    return ExportInfo(
        tool_versions={p: pkg_version(p) for p in (*EXPORT_TOOLS, *extra_tools)},
        opset=next(iter(graphs.values())).opset,
        parity_max_abs_diff=parity,
        parity_tolerance=TOLERANCE,
        verified_shapes=shapes,
    )


def export_graph(plan: GraphPlan, out_dir: Path, tolerance: float = TOLERANCE) -> ExportedGraph:
    """Export ``plan`` to ``out_dir/plan.file`` and verify it; raise if any check fails."""
    plan.module.eval()
    path = out_dir / plan.file
    example = plan.make_inputs(plan.shapes[0], torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            plan.module,
            example,
            input_names=plan.input_names,
            output_names=plan.output_names,
            dynamic_shapes=_dynamic_shapes(plan),
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    assert program is not None
    model = _rederive_shapes(program.model_proto)
    onnx.save(model, str(path))
    onnx.checker.check_model(model, full_check=True)
    _assert_dynamic_axes(model, plan)
    diffs = _parity(plan, path, tolerance)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return ExportedGraph(graph_spec(model, plan.file), diffs, opset)


def _dynamic_shapes(plan: GraphPlan) -> tuple[Any, ...]:
    """torch.export dims, shared by name across inputs (``batch`` is one Dim everywhere); the
    inputs a ``forward(..., *rest)`` takes as varargs get theirs as one tuple, as torch.export
    wants them."""
    dims: dict[str, Dim] = {}
    shapes: list[Any] = []
    for name in plan.input_names:
        axes = plan.dynamic.get(name)
        shapes.append({axis: dims.setdefault(dim, Dim(dim)) for axis, dim in axes.items()} if axes else None)
    params = inspect.signature(plan.module.forward).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        named = sum(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
        return (*shapes[:named], tuple(shapes[named:]))
    return tuple(shapes)


def _rederive_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Re-infer intermediate and output shapes from the graph itself.

    The exporter annotates shapes from its trace, and some ops (``nn.GRU``) leave a traced length
    in those annotations even though the ONNX op is length-polymorphic. ONNX Runtime's symbolic
    shape inference propagates ``dim_param`` names through Shape/Slice/Concat/Reshape, so an axis
    that is still a constant afterwards is one the graph really pinned — which the assertion that
    follows refuses, and the parity check at several lengths proves either way.
    """
    del model.graph.value_info[:]
    for output in model.graph.output:
        output.type.tensor_type.ClearField("shape")
    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    del inferred.graph.value_info[:]
    return inferred


def _assert_dynamic_axes(model: onnx.ModelProto, plan: GraphPlan) -> None:
    values = {v.name: v for v in [*model.graph.input, *model.graph.output]}
    pinned = []
    for name, axes in plan.dynamic.items():
        dims = values[name].type.tensor_type.shape.dim
        for axis in axes:
            if not dims[axis].dim_param:
                pinned.append(f"{name}[{axis}]={dims[axis].dim_value}")
    if pinned:
        raise ExportVerificationError(f"{plan.file}: dynamic axes were pinned by the exporter: {pinned}")


def _parity(plan: GraphPlan, path: Path, tolerance: float) -> dict[str, float]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = dict.fromkeys(plan.output_names, 0.0)
    for i, shape in enumerate(plan.shapes):
        inputs = plan.make_inputs(shape, torch.Generator().manual_seed(100 + i))
        with torch.no_grad():
            expected = plan.module(*inputs)
        if isinstance(expected, torch.Tensor):
            expected = (expected,)
        feeds = {n: t.numpy() for n, t in zip(plan.input_names, inputs, strict=True)}
        feeds = {i.name: feeds[i.name] for i in session.get_inputs()}  # unused inputs are dropped
        got = session.run(plan.output_names, feeds)
        for name, want, have in zip(plan.output_names, expected, got, strict=True):
            if tuple(want.shape) != have.shape:
                raise ExportVerificationError(
                    f"{plan.file}: {name} shape {have.shape} != {tuple(want.shape)} at {shape}"
                )
            diff = float(np.max(np.abs(want.numpy() - have))) if have.size else 0.0
            worst[name] = max(worst[name], diff)
            if not diff <= tolerance:
                raise ExportVerificationError(
                    f"{plan.file}: {name} differs from PyTorch by {diff:.2e} > {tolerance:.0e} at {shape}"
                )
    log.info("%s parity %s", plan.file, {k: f"{v:.1e}" for k, v in worst.items()})
    return worst


def graph_spec(model: onnx.ModelProto, file: str) -> GraphSpec:
    """The manifest's description of an ONNX graph, read from the graph itself."""

    def tensors(values: list[onnx.ValueInfoProto]) -> list[TensorSpec]:
        out = []
        for v in values:
            tt = v.type.tensor_type
            shape: list[int | str] = [d.dim_param or d.dim_value for d in tt.shape.dim]
            out.append(TensorSpec(name=v.name, dtype=_ONNX_DTYPES[tt.elem_type], shape=shape))
        return out

    return GraphSpec(
        file=file, inputs=tensors(list(model.graph.input)), outputs=tensors(list(model.graph.output))
    )
