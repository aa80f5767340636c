"""Variants of an exported version: ``<name>-int8`` and ``<name>-fp16``, re-evaluated, with
attention drift measured.

A variant is its own model at the same version, so the service serves it side by side with fp32
and a client chooses. Its graphs are made from the fp32 version's — ONNX Runtime's dynamic int8
quantization, or ONNX Runtime's float16 converter (:mod:`export.fp16`, which also gives a verdict
against the fp32 graphs) — and the other files are copied. Its manifest declares the tensors as
the written graphs have them, and carries its own held-out metrics in ``eval`` and, in
``eval_details``, the fp32 numbers and how far its attention maps moved: Pearson correlation of
the maps and the share of rows whose argmax position is unchanged.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

from export import evaluate, fp16
from export.data import fashion
from export.onnx_export import ExportVerificationError, graph_spec
from export.recipes import Recipe
from export.repository import staged_version
from service.inference.manifest import GraphSpec, Manifest
from service.inference.translation import Translator

DRIFT_SAMPLES = 256
#: (fp32 directory, fp32 manifest, variant directory, variant manifest, recipe) → the worst
#: difference per graph output; raises ExportVerificationError beyond the variant's tolerance
Verify = Callable[[Path, Manifest, Path, Manifest, Recipe], dict[str, float]]


@dataclass(frozen=True)
class Variant:
    kind: str  # the model name's suffix: <name>-<kind>
    quantization: str  # the manifest's export.quantization
    description: str  # added to the fp32 model's
    convert: Callable[[Path, Path], None]  # fp32 graph file → the variant's graph file
    verify: Verify | None = None
    tolerance: float | None = None


def _quantize_int8(source: Path, target: Path) -> None:
    quantize_dynamic(source, target, weight_type=QuantType.QInt8)


VARIANTS = {
    "int8": Variant(
        "int8", "onnxruntime dynamic int8 (weights QInt8)", "int8 dynamic quantization.", _quantize_int8
    ),
    "fp16": Variant(
        "fp16",
        fp16.DESCRIPTION,
        "float16 weights and activations.",
        fp16.convert,
        fp16.verify,
        fp16.TOLERANCE,
    ),
}


def variant_name(name: str, kind: str) -> str:
    return f"{name}-{VARIANTS[kind].kind}"


def base_name(name: str) -> str:
    """The fp32 model a variant was made from (``fashion-vit-int8`` → ``fashion-vit``), or ``name``."""
    for kind in VARIANTS:
        if name.endswith(f"-{kind}"):
            return name.removesuffix(f"-{kind}")
    return name


def write_variant(fp32_dir: Path, recipe: Recipe, repository: Path, kind: str, force: bool) -> Path:
    """Write the ``kind`` variant of the fp32 version in ``fp32_dir`` as ``<name>-<kind>`` at the
    same version in ``repository`` (refusing to replace one without ``force``); → its directory."""
    with staged_variant(fp32_dir, recipe, repository, kind, force) as target:
        pass
    return target


@contextmanager
def staged_variant(
    fp32_dir: Path, recipe: Recipe, repository: Path, kind: str, force: bool, staged_as: int | None = None
) -> Iterator[Path]:
    """:func:`write_variant`, written into a staging directory and moved to its version (yielded)
    when the ``with`` block ends without an error, so that the fp32 version and its variants are
    written all or none (``export.build.export``). ``staged_as``: ``fp32_dir`` is the staging
    directory of the fp32 model's version ``staged_as``."""
    if kind not in VARIANTS:
        raise ValueError(f"unknown variant {kind!r}; known: {tuple(VARIANTS)}")
    variant = VARIANTS[kind]
    base = Manifest.load(fp32_dir, (recipe.name, str(staged_as)) if staged_as else None)
    name = variant_name(base.name, kind)
    with staged_version(repository, name, base.version, force) as staging:
        graphs = {key: _convert(variant, fp32_dir, staging, spec) for key, spec in base.graphs.items()}
        for file in set(base.files()) - {g.file for g in base.graphs.values()}:
            shutil.copy2(fp32_dir / file, staging / file)
        export = base.export.model_copy(update={"quantization": variant.quantization})
        description = f"{base.description} {variant.description}".strip()
        manifest = base.model_copy(
            update={"name": name, "graphs": graphs, "export": export, "description": description}
        )
        if variant.verify is not None:
            worst = variant.verify(fp32_dir, base, staging, manifest, recipe)
            export = export.model_copy(
                update={"variant_max_diff": worst, "variant_tolerance": variant.tolerance}
            )
            manifest = manifest.model_copy(update={"export": export})
        metrics = evaluate.evaluate_recipe(recipe, staging, manifest)
        details: dict[str, float | str] = {f"fp32_{k}": v for k, v in base.eval.items()}
        details["parity_of"] = (
            f"{base.name} version {base.version}: export.parity_max_abs_diff and verified_shapes are "
            "its fp32 graphs' against PyTorch, from which these were made"
        )
        details.update(attention_drift(recipe, fp32_dir, base, staging, manifest))
        manifest.model_copy(update={"eval": metrics, "eval_details": details}).write(staging)
        yield repository / name / str(base.version)


def _convert(variant: Variant, fp32_dir: Path, staging: Path, spec: GraphSpec) -> GraphSpec:
    """Convert one graph; → its interface as the written graph declares it, which may differ
    from fp32's in dtypes only."""
    variant.convert(fp32_dir / spec.file, staging / spec.file)
    written = graph_spec(onnx.load(str(staging / spec.file)), spec.file)

    def layout(s: GraphSpec) -> list[tuple[str, list[int | str]]]:
        return [(t.name, t.shape) for t in (*s.inputs, *s.outputs)]

    if layout(written) != layout(spec):
        raise ExportVerificationError(
            f"{spec.file}: the {variant.kind} graph's inputs/outputs differ from fp32's: "
            f"{layout(written)} != {layout(spec)}"
        )
    return written


def attention_drift(
    recipe: Recipe, fp32_dir: Path, fp32: Manifest, v_dir: Path, variant: Manifest
) -> dict[str, float]:
    """Correlation and argmax agreement of attention maps between the fp32 and the variant's
    graphs, on held-out inputs, each decoded by its own graphs."""
    if recipe.task == "image-classification":
        canvases = evaluate.image_test_set(recipe)
        pixels = fashion.normalise(canvases.images[:DRIFT_SAMPLES])
        prefix = fp32.image.prefix_tokens if fp32.image else 1
        pairs = [
            (
                evaluate.classify(fp32_dir, fp32, pixels)[1][:, :, :, 0, prefix:],  # CLS → patches
                evaluate.classify(v_dir, variant, pixels)[1][:, :, :, 0, prefix:],
            )
        ]
    else:
        texts = [ex.source for ex in evaluate.translation_test_set(recipe)[:DRIFT_SAMPLES]]
        ra = Translator(fp32_dir, fp32, evaluate.PROVIDERS).translate(texts)
        rb = Translator(v_dir, variant, evaluate.PROVIDERS).translate(texts)
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
