"""``make eval``: how far the served attention can be trusted, per model, into the manifests and a
report (issue #8).

For every model in the repository whose recipe has ground truth:

* ``dates`` translation models — alignment error rate against the gold field spans
  (:func:`export.faithfulness.translation_faithfulness`), per decoder layer for Transformers;
* ``fashion`` image models — the pointing game for rollout with each head fusion and for raw
  last-layer CLS attention (:func:`export.faithfulness.pointing_game`);
* an int8 variant of each fp32 model (ONNX Runtime dynamic quantization, built afresh in a
  scratch directory so every model is compared the same way) — its held-out metric, how far its
  maps drift from fp32 and its own faithfulness; a variant in the repository (``-int8``,
  ``-fp16``) is scored like any other, with its base's recipe;
* the service's maps against PyTorch's on the same inputs (:mod:`export.parity`), when the
  checkpoint the model was exported from is at hand (its sha256 must match the manifest's).

The scores are merged into each manifest's ``eval`` (so ``GET /v1/models/<name>`` shows them) and
written as ``reports/faithfulness/<date>.{json,md}`` (a later run that day: ``<date>-2``, …; a
report is never overwritten: the README links them).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tqdm import tqdm

from export import checkpoint, evaluate, faithfulness, parity, recipes
from export.data import fashion
from export.eval_markdown import render
from export.recipes import Recipe
from export.variants import base_name, write_variant
from service.inference.manifest import Manifest, file_sha256
from service.inference.repository import discover

#: the manifest ``eval`` keys this module writes (each run replaces all of them)
EVAL_OWNED = ("alignment_", "pointing_game_", "service_vs_pytorch_")


@dataclass
class ModelEval:
    name: str
    family: str
    task: str
    #: scores merged into the manifest's ``eval``
    metrics: dict[str, float] = field(default_factory=dict)
    #: the int8 variant's numbers, when one was measured
    int8: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Sizes:
    dates: int = 500  # held-out dates scored for alignment
    canvases: int = 1000  # test canvases for the pointing game
    parity: int = 64  # inputs compared with PyTorch (one padded batch)
    held_out: int | None = None  # caps the int8 variant's held-out metric (None: the recipe's test set)


def recipe_for(manifest: Manifest) -> Recipe | None:
    """The recipe a repository model was built from (a variant shares its base's), if it has gold
    annotations to score against: the ``dates`` corpus or the ``fashion`` canvases."""
    recipe = recipes.RECIPES.get(base_name(manifest.name))
    if recipe is None or (recipe.task, recipe.family) != (manifest.task, manifest.family):
        return None  # not built by a recipe (e.g. an imported checkpoint that took the name)
    if recipe.task == "translation" and recipe.data["corpus"] != "dates":
        return None
    return recipe


def faithfulness_metrics(
    directory: Path, manifest: Manifest, recipe: Recipe, sizes: Sizes
) -> dict[str, float]:
    if recipe.task == "translation":
        examples = evaluate.dates_test_set(recipe)[: sizes.dates]
        layers = faithfulness.translation_faithfulness_by_layer(directory, manifest, examples)
        metrics = {"alignment_error_rate": layers[-1].error_rate, "alignment_mass": layers[-1].mass}
        if len(layers) > 1:  # a Transformer: which decoder layer aligns best
            metrics.update({f"alignment_error_rate_layer{i}": s.error_rate for i, s in enumerate(layers)})
        return metrics
    canvases = _canvases(recipe, sizes.canvases)
    hits = faithfulness.pointing_game(directory, manifest, canvases)
    return {f"pointing_game_{name.replace('-', '_')}": share for name, share in hits.items()}


def parity_metrics(
    directory: Path, manifest: Manifest, recipe: Recipe, checkpoints: Path, sizes: Sizes
) -> tuple[dict[str, float], str | None]:
    """Service vs PyTorch, or why it could not be measured."""
    ckpt_dir = checkpoints / manifest.name
    weights = ckpt_dir / checkpoint.WEIGHTS
    if not weights.exists():
        return {}, f"no checkpoint at {ckpt_dir}: service-vs-PyTorch not measured"
    if manifest.checkpoint_sha256 and file_sha256(weights) != manifest.checkpoint_sha256:
        return {}, f"{weights} is not the checkpoint this version was exported from"
    model = checkpoint.load(ckpt_dir).model
    if recipe.task == "translation":
        texts = [ex.source for ex in evaluate.dates_test_set(recipe)[: sizes.parity]]
        return {
            "service_vs_pytorch_max_abs_diff": parity.translation_map_diff(directory, manifest, model, texts)
        }, None
    pixels = fashion.normalise(_canvases(recipe, sizes.parity).images)
    diffs = parity.vision_map_diff(directory, manifest, model, pixels)  # type: ignore[arg-type]
    return {"service_vs_pytorch_max_abs_diff": max(diffs.values())}, None


def int8_metrics(
    directory: Path, manifest: Manifest, recipe: Recipe, sizes: Sizes, scratch: Path
) -> dict[str, float]:
    """Quantise into ``scratch`` and measure: held-out metric, drift against fp32, faithfulness."""
    if sizes.held_out is not None:
        recipe = dataclasses.replace(recipe, data={**recipe.data, "n_test": sizes.held_out})
    q_dir = write_variant(directory, recipe, scratch, "int8", force=True)
    q = Manifest.load(q_dir)
    numbers = {k: v for k, v in q.eval.items() if k != "test_examples"}
    numbers.update({k: float(v) for k, v in q.eval_details.items() if k.startswith("attention_")})
    numbers.update(faithfulness_metrics(q_dir, q, recipe, sizes))
    return numbers


def evaluate_model(
    directory: Path, manifest: Manifest, checkpoints: Path, sizes: Sizes, scratch: Path, int8: bool
) -> ModelEval | None:
    recipe = recipe_for(manifest)
    if recipe is None:
        return None
    result = ModelEval(manifest.name, manifest.family, manifest.task)
    result.metrics.update(faithfulness_metrics(directory, manifest, recipe, sizes))
    if base_name(manifest.name) == manifest.name:  # a variant is compared with fp32, not PyTorch
        numbers, note = parity_metrics(directory, manifest, recipe, checkpoints, sizes)
        result.metrics.update(numbers)
        result.notes += [note] if note else []
        if int8:
            result.int8 = int8_metrics(directory, manifest, recipe, sizes, scratch)
    kept = {k: v for k, v in manifest.eval.items() if not k.startswith(EVAL_OWNED)}  # no stale scores
    manifest.model_copy(update={"eval": {**kept, **result.metrics}}).write(directory)
    result.metrics = {**kept, **result.metrics}  # the report shows accuracy beside them
    return result


def run(repository: Path, checkpoints: Path, out_dir: Path, sizes: Sizes, int8: bool = True) -> Path:
    """Evaluate every model with ground truth; → the Markdown report's path."""
    found = discover(repository)
    results: list[ModelEval] = []
    skipped = [f"{name}: {why}" for name, why in found.rejected.items()]
    with tempfile.TemporaryDirectory(prefix="eval-int8-") as scratch:
        for entry in tqdm(list(found.models.values()), desc="eval", unit="model"):
            result = evaluate_model(entry.directory, entry.manifest, checkpoints, sizes, Path(scratch), int8)
            if result is None:
                skipped.append(f"{entry.manifest.name}: no gold annotations for its data")
            else:
                results.append(result)
    stamp = datetime.now(UTC)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "created_at": stamp.isoformat(),
        "repository": str(repository),
        "sizes": asdict(sizes),
        "models": [asdict(r) for r in results],
        "skipped": skipped,
    }
    path = report_stem(out_dir, f"{stamp:%Y-%m-%d}")
    path.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    path.with_suffix(".md").write_text(render(results, skipped, sizes, stamp))
    return path.with_suffix(".md")


def _canvases(recipe: Recipe, n: int) -> fashion.Canvases:
    full = evaluate.image_test_set(recipe)
    return fashion.Canvases(full.images[:n], full.labels[:n], full.boxes[:n])


def report_stem(out_dir: Path, day: str) -> Path:
    """``out_dir/<day>``, or ``<day>-2``, ``<day>-3``, … : the first no report was written to."""
    for n in itertools.count(1):
        stem = out_dir / (day if n == 1 else f"{day}-{n}")
        if not stem.with_suffix(".md").exists() and not stem.with_suffix(".json").exists():
            return stem
    raise AssertionError("unreachable")
