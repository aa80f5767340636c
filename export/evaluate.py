"""Held-out evaluation of *exported* graphs through ONNX Runtime.

The numbers written into a manifest are measured on the artifact that will be served — the ONNX
graphs, decoded by the service's own numpy decoder — not on the PyTorch model they came from.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from sacrebleu.metrics import BLEU, CHRF
from tqdm import tqdm

from export.data import bible, dates, fashion
from export.recipes import Recipe
from service.inference.manifest import Manifest
from service.inference.runtime import GraphSession
from service.inference.translation import Translator

PROVIDERS = ["CPUExecutionProvider"]


class Pair(Protocol):
    """A held-out translation example (``dates.DateExample``, ``bible.Verse``)."""

    @property
    def source(self) -> str: ...

    @property
    def target(self) -> str: ...


def exact_match(
    directory: Path, manifest: Manifest, examples: list[dates.DateExample], batch: int = 256
) -> float:
    texts = translate_all(directory, manifest, [ex.source for ex in examples], batch)
    return sum(text == ex.target for text, ex in zip(texts, examples, strict=True)) / len(examples)


def classify(
    directory: Path, manifest: Manifest, pixels: np.ndarray, batch: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """→ logits (N, classes) and attentions (N, layers, heads, T, T) for normalised pixels, float32
    whatever the graph computes in."""
    graph = manifest.graphs["model"]
    session = GraphSession(directory / graph.file, graph, PROVIDERS, intra_op_threads=2)
    logits, attentions = [], []
    for i in tqdm(range(0, len(pixels), batch), desc=f"eval {manifest.name}", unit="batch", leave=False):
        out = session.run({"pixels": pixels[i : i + batch]})
        logits.append(out["logits"].astype(np.float32, copy=False))
        attentions.append(out["attentions"].astype(np.float32, copy=False))
    return np.concatenate(logits), np.concatenate(attentions)


def accuracy(directory: Path, manifest: Manifest, canvases: fashion.Canvases) -> float:
    logits, _ = classify(directory, manifest, fashion.normalise(canvases.images))
    return float((logits.argmax(axis=1) == canvases.labels).mean())


def translate_all(directory: Path, manifest: Manifest, sources: Sequence[str], batch: int = 256) -> list[str]:
    """Greedy translations of ``sources`` by the service's own Translator on ONNX Runtime."""
    translator = Translator(directory, manifest, PROVIDERS, threads=2)
    out: list[str] = []
    for i in tqdm(range(0, len(sources), batch), desc=f"eval {manifest.name}", unit="batch", leave=False):
        out.extend(r.text for r in translator.translate(list(sources[i : i + batch])))
    return out


def bleu_chrf(
    directory: Path, manifest: Manifest, examples: Sequence[Pair]
) -> tuple[dict[str, float], dict[str, float | str]]:
    """Corpus BLEU (Papineni et al. 2002) and chrF (Popović 2015) by sacrebleu, one reference per
    example → metrics and, as details, the signatures that make the numbers comparable."""
    hypotheses = translate_all(directory, manifest, [ex.source for ex in examples])
    references = [[ex.target for ex in examples]]
    bleu, chrf = BLEU(), CHRF()
    metrics = {
        "bleu": round(bleu.corpus_score(hypotheses, references).score, 2),
        "chrf": round(chrf.corpus_score(hypotheses, references).score, 2),
        "test_examples": float(len(examples)),
    }
    details: dict[str, float | str] = {
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }
    return metrics, details


def evaluate_recipe(recipe: Recipe, directory: Path, manifest: Manifest) -> dict[str, float]:
    """The recipe's held-out metrics, measured on the graphs in ``directory``."""
    return evaluate_recipe_details(recipe, directory, manifest)[0]


def evaluate_recipe_details(
    recipe: Recipe, directory: Path, manifest: Manifest
) -> tuple[dict[str, float], dict[str, float | str]]:
    """→ the held-out metrics (the manifest's ``eval``) and how they were measured, where that
    needs saying (``eval_details``: sacrebleu's signatures)."""
    if recipe.task == "translation" and recipe.data["corpus"] == "bible":
        return bleu_chrf(directory, manifest, bible_test_set(recipe))
    if recipe.task == "translation":
        test = dates_test_set(recipe)
        n = float(len(test))
        return {"exact_match": exact_match(directory, manifest, test), "test_examples": n}, {}
    canvases = image_test_set(recipe)
    metrics = {
        "accuracy": accuracy(directory, manifest, canvases),
        "test_examples": float(len(canvases.labels)),
    }
    return metrics, {}


def translation_test_set(recipe: Recipe) -> list[Any]:
    """The held-out pairs of a translation recipe, whatever its corpus: ``dates.DateExample`` or
    ``bible.Verse`` (both have ``source`` and ``target``; ``Any`` so that callers that know the
    corpus is ``dates`` can read its gold spans)."""
    return bible_test_set(recipe) if recipe.data["corpus"] == "bible" else dates_test_set(recipe)


def dates_test_set(recipe: Recipe) -> list[dates.DateExample]:
    """Generated dates whose sources never occur in training."""
    return dates.splits(recipe.data["n_train"], recipe.data["n_test"], recipe.data["seed"])[1]


def bible_test_set(recipe: Recipe) -> list[bible.Verse]:
    """Every kept verse of the test books, or a seeded sample of ``n_test`` of them, in order."""
    test = bible.splits(recipe.data["max_words"])[1]
    n = recipe.data["n_test"]
    if n < len(test):
        keep = sorted(random.Random(recipe.data["seed"]).sample(range(len(test)), n))
        test = [test[i] for i in keep]
    return test


def image_test_set(recipe: Recipe) -> fashion.Canvases:
    items, labels = fashion.load_split("t10k")
    n = recipe.data["n_test"]
    return fashion.make_canvases(items[:n], labels[:n], recipe.data["canvas"], recipe.data["seed"] + 1)
