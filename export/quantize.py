"""int8 variants: ONNX Runtime dynamic quantization, re-evaluated, with attention drift measured.

The variant is its own model, ``<name>-int8``, at the same version, so the service serves it
side by side with fp32 and a client chooses. Its manifest carries its own held-out metrics in
``eval`` and, in ``eval_details``, the fp32 numbers and how far its attention maps moved:
Pearson correlation of the maps and the share of rows whose argmax position is unchanged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from onnxruntime.quantization import QuantType, quantize_dynamic

from export import evaluate
from export.data import fashion
from export.recipes import Recipe
from export.repository import staged_version
from service.inference.manifest import Manifest
from service.inference.translation import Translator

METHODS = ("int8",)
DRIFT_SAMPLES = 256


def quantize_version(fp32_dir: Path, recipe: Recipe, repository: Path, method: str, force: bool) -> Path:
    if method not in METHODS:
        raise ValueError(f"unknown quantization {method!r}; known: {METHODS}")
    base = Manifest.load(fp32_dir)
    name = f"{base.name}-{method}"
    with staged_version(repository, name, base.version, force) as staging:
        for graph in base.graphs.values():
            quantize_dynamic(fp32_dir / graph.file, staging / graph.file, weight_type=QuantType.QInt8)
        for file in set(base.files()) - {g.file for g in base.graphs.values()}:
            shutil.copy2(fp32_dir / file, staging / file)
        export_info = base.export.model_copy(
            update={"quantization": "onnxruntime dynamic int8 (weights QInt8)"}
        )
        manifest = base.model_copy(
            update={
                "name": name,
                "export": export_info,
                "description": f"{base.description} int8 dynamic quantization.",
            }
        )
        metrics = evaluate.evaluate_recipe(recipe, staging, manifest)
        details: dict[str, float | str] = {f"fp32_{k}": v for k, v in base.eval.items()}
        details.update(attention_drift(recipe, fp32_dir, base, staging, manifest))
        manifest.model_copy(update={"eval": metrics, "eval_details": details}).write(staging)
    return repository / name / str(base.version)


def attention_drift(
    recipe: Recipe, fp32_dir: Path, fp32: Manifest, q_dir: Path, q: Manifest
) -> dict[str, float]:
    """Correlation and argmax agreement of attention maps between fp32 and the quantised graphs."""
    if recipe.task == "image-classification":
        canvases = evaluate.image_test_set(recipe)
        pixels = fashion.normalise(canvases.images[:DRIFT_SAMPLES])
        prefix = fp32.image.prefix_tokens if fp32.image else 1
        pairs = [
            (
                evaluate.classify(fp32_dir, fp32, pixels)[1][:, :, :, 0, prefix:],  # CLS → patches
                evaluate.classify(q_dir, q, pixels)[1][:, :, :, 0, prefix:],
            )
        ]
    else:
        texts = [ex.source for ex in evaluate.translation_test_set(recipe)[:DRIFT_SAMPLES]]
        ra = Translator(fp32_dir, fp32, evaluate.PROVIDERS).translate(texts)
        rb = Translator(q_dir, q, evaluate.PROVIDERS).translate(texts)
        pairs = []
        for x, y in zip(ra, rb, strict=True):  # compare the steps both decodes made
            n = min(len(x.attention), len(y.attention))
            pairs.append((x.attention[:n], y.attention[:n]))
    flat_a = np.concatenate([a.ravel() for a, _ in pairs])
    flat_b = np.concatenate([b.ravel() for _, b in pairs])
    same = np.concatenate([(a.argmax(-1) == b.argmax(-1)).ravel() for a, b in pairs])
    return {
        "attention_correlation": float(np.corrcoef(flat_a, flat_b)[0, 1]),
        "attention_argmax_agreement": float(same.mean()),
    }
