"""Held-out evaluation of *exported* graphs through ONNX Runtime.

The numbers written into a manifest are measured on the artifact that will be served — the ONNX
graphs, decoded by the service's own numpy decoder — not on the PyTorch model they came from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from export.data import dates, fashion
from export.recipes import Recipe
from service.manifest import Manifest
from service.runtime import GraphSession
from service.translation import Translator

PROVIDERS = ["CPUExecutionProvider"]


def exact_match(
    directory: Path, manifest: Manifest, examples: list[dates.DateExample], batch: int = 256
) -> float:
    translator = Translator(directory, manifest, PROVIDERS, threads=2)
    correct = 0
    for i in tqdm(range(0, len(examples), batch), desc=f"eval {manifest.name}", unit="batch", leave=False):
        chunk = examples[i : i + batch]
        results = translator.translate([ex.source for ex in chunk])
        correct += sum(r.text == ex.target for r, ex in zip(results, chunk, strict=True))
    return correct / len(examples)


def classify(
    directory: Path, manifest: Manifest, pixels: np.ndarray, batch: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """→ logits (N, classes) and attentions (N, layers, heads, T, T) for normalised pixels."""
    graph = manifest.graphs["model"]
    session = GraphSession(directory / graph.file, graph, PROVIDERS, intra_op_threads=2)
    logits, attentions = [], []
    for i in tqdm(range(0, len(pixels), batch), desc=f"eval {manifest.name}", unit="batch", leave=False):
        out = session.run({"pixels": pixels[i : i + batch]})
        logits.append(out["logits"])
        attentions.append(out["attentions"])
    return np.concatenate(logits), np.concatenate(attentions)


def accuracy(directory: Path, manifest: Manifest, canvases: fashion.Canvases) -> float:
    logits, _ = classify(directory, manifest, fashion.normalise(canvases.images))
    return float((logits.argmax(axis=1) == canvases.labels).mean())


def evaluate_recipe(recipe: Recipe, directory: Path, manifest: Manifest) -> dict[str, float]:
    """The recipe's held-out metrics, measured on the graphs in ``directory``."""
    if recipe.task == "translation":
        test = translation_test_set(recipe)
        return {"exact_match": exact_match(directory, manifest, test), "test_examples": float(len(test))}
    canvases = image_test_set(recipe)
    return {"accuracy": accuracy(directory, manifest, canvases), "test_examples": float(len(canvases.labels))}


def translation_test_set(recipe: Recipe) -> list[dates.DateExample]:
    return dates.splits(recipe.data["n_train"], recipe.data["n_test"], recipe.data["seed"])[1]


def image_test_set(recipe: Recipe) -> fashion.Canvases:
    items, labels = fashion.load_split("t10k")
    n = recipe.data["n_test"]
    return fashion.make_canvases(items[:n], labels[:n], recipe.data["canvas"], recipe.data["seed"] + 1)
