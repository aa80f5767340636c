"""float16 graphs: ONNX Runtime's own converter, then a verdict against the fp32 graphs.

**Conversion.** ``onnxruntime.transformers.float16.convert_float_to_float16`` with
``keep_io_types=False``: weights, activations and every float input and output of the graph
become float16 (the service feeds each input the dtype the manifest declares, read back from the
converted graph). Two choices:

* ``max_finite_val=1e4`` (:data:`MAX_FINITE`). The converter clamps float constants to
  ±``max_finite_val``; our models mask with a finite ``NEG_INF = -1e9``. Clamped to float16's
  own limit (-65504), an additive mask plus any score below -16 (or two masks added) rounds to
  -inf, and a row with every key masked — uniform weights in fp32 — would turn NaN. At -1e4 such
  sums stay finite and ``exp(-1e4 - max)`` is still exactly 0. No other constant of the graphs
  comes near 1e4 (the largest are ``sqrt(d_head)`` scales and embedding weights below 10); one
  that did would be clamped and the verdict below would refuse the graph.
* The converter's default ``op_block_list`` and nothing more: Softmax and LayerNormalization
  are converted too. ONNX Runtime's CUDA kernels of both accumulate in float32 whatever the
  tensor type, and on the CPU execution provider, which has no float16 kernel for most ops
  (MatMul, Gemm, Conv, GRU, LayerNormalization, Add…), ONNX Runtime itself wraps each such node
  in Casts to float32 and back when the session loads (its ``InsertCastTransformer``) — so every
  family runs on CPU, where export evaluates and tests run, with float16 between the nodes.
  Keeping Softmax in float32 did not move the fashion-vit maps (max |Δ| 6.8e-3 either way).

**Verdict** (:func:`verify`). The service's own code (``Classifier``, ``Translator``) runs the
fp32 graphs on held-out inputs at the batch sizes the fp32 export verified (translations greedy
and beam 3, so source lengths, past lengths and row counts all vary), and every call's feeds also
run through the float16 graph: each output may differ from fp32 by at most :data:`TOLERANCE` ×
``max(1, max |fp32|)`` of that output. The decode goes on with fp32's outputs, so the float16
graphs are compared step by step on the same inputs rather than on decodes that may part ways;
how far whole float16 decodes drift is measured separately (held-out metrics, attention drift).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnxruntime.transformers.float16 import convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel

from export import evaluate
from export.data import fashion
from export.onnx_export import ExportVerificationError
from export.recipes import Recipe
from service.inference.manifest import GraphSpec, Manifest
from service.inference.runtime import GraphSession
from service.inference.translation import Translator
from service.inference.vision import Classifier

#: float constants are clamped to ± this (see the module docstring)
MAX_FINITE = 1e4
#: max |fp16 − fp32| of an output over max(1, max |fp32|) of it
TOLERANCE = 3e-2
#: the beam sizes of the translations verified (a beam of 3 triples the rows and reorders caches)
BEAMS = (1, 3)
DESCRIPTION = f"float16 (onnxruntime.transformers.float16, constants clamped to ±{MAX_FINITE:g})"


def convert(source: Path, target: Path) -> None:
    """The float16 twin of the graph at ``source``, checked by ``onnx.checker``, at ``target``."""
    model = convert_float_to_float16(onnx.load(str(source)), max_finite_val=MAX_FINITE, keep_io_types=False)
    topologically_sorted(model.graph)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(target))


def topologically_sorted(graph: onnx.GraphProto) -> None:
    """Put ``graph``'s nodes in an order where each comes after the nodes whose outputs it reads
    (ONNX requires it; ONNX Runtime's own sort). The converter appends the Casts it puts around an
    op it keeps in float32 (``Range``, ``Min`` in the Luong local scorers' window) at the end of
    the graph, after the node that reads them."""
    try:
        OnnxModel.graph_topological_sort(graph)
    except RuntimeError as exc:  # "Graph is not a DAG"
        raise ExportVerificationError(f"the float16 graph's nodes cannot be ordered: {exc}") from exc


class _Shadowed(GraphSession):
    """An fp32 graph run as the service runs it, whose every call also runs through the variant's
    graph: the worst scaled difference per output is kept."""

    def __init__(self, directory: Path, spec: GraphSpec, variant: GraphSession) -> None:
        super().__init__(directory / spec.file, spec, evaluate.PROVIDERS, intra_op_threads=2)
        self.variant = variant
        self.worst: dict[str, float] = {}

    def run(self, tensors: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        ours = super().run(tensors, outputs)
        theirs = self.variant.run(tensors, list(ours))
        for name, want in ours.items():
            have = theirs[name].astype(np.float32)
            if not want.size:
                continue
            diff = float(np.abs(have - want).max()) / max(1.0, float(np.abs(want).max()))
            self.worst[name] = max(self.worst.get(name, 0.0), diff if np.isfinite(diff) else np.inf)
        return ours


def verify(
    fp32_dir: Path, fp32: Manifest, half_dir: Path, half: Manifest, recipe: Recipe
) -> dict[str, float]:
    """The float16 graphs against the fp32 ones on the same feeds (see the module docstring) →
    the worst scaled difference per ``graph.output``; raises :class:`ExportVerificationError`
    beyond :data:`TOLERANCE`."""
    shadows = {}
    for key, spec in fp32.graphs.items():
        variant = GraphSession(half_dir / half.graphs[key].file, half.graphs[key], evaluate.PROVIDERS)
        shadows[key] = _Shadowed(fp32_dir, spec, variant)
    batches = sorted({s["batch"] for s in fp32.export.verified_shapes if "batch" in s}) or [1, 3, 8]
    if recipe.task == "image-classification":
        classifier = Classifier(fp32_dir, fp32, evaluate.PROVIDERS)
        classifier.session = shadows["model"]
        pixels = fashion.normalise(evaluate.image_test_set(recipe).images[: sum(batches)])
        for run in _runs(batches, len(pixels)):
            classifier.classify(pixels[run])
    else:
        translator = Translator(fp32_dir, fp32, evaluate.PROVIDERS)
        translator.encoder, translator.decoder = shadows["encoder"], shadows["decoder_step"]
        texts = [ex.source for ex in evaluate.translation_test_set(recipe)[: sum(batches)]]
        for beam in BEAMS:
            for run in _runs(batches, len(texts)):
                translator.translate(texts[run], beam_size=beam)
    worst = {f"{key}.{name}": diff for key, s in shadows.items() for name, diff in s.worst.items()}
    bad = {k: f"{v:.1e}" for k, v in worst.items() if not v <= TOLERANCE}
    if bad:
        raise ExportVerificationError(
            f"{half.name}: float16 graphs differ from fp32 beyond {TOLERANCE:g} × max(1, max |fp32|): {bad}"
        )
    return worst


def _runs(batches: list[int], available: int) -> list[slice]:
    """Consecutive runs of the held-out inputs, one per batch size (as many as there are)."""
    runs, start = [], 0
    for batch in batches:
        if start + batch > available:
            break
        runs.append(slice(start, start + batch))
        start += batch
    return runs
