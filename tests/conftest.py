"""Shared fixtures: a tiny model repository built once per session by the real pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.data.fashion import DEBIAN_DIR

#: recipe → (training examples, epochs): enough for the dates models to translate correctly,
#: the ViT only has to be a real exported graph
TINY = {"dates-bahdanau": (6000, 2), "dates-transformer": (6000, 5), "fashion-vit": (400, 1)}


def fashion_available() -> bool:
    return (DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz").exists()


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train each default recipe briefly on a few thousand examples and export it (plus an int8
    variant of the ViT) — the same code path as ``make models``, minus the floors."""
    from export import build, recipes

    root = tmp_path_factory.mktemp("tiny")
    repository = root / "model_repository"
    for name, (n, epochs) in TINY.items():
        if name.startswith("fashion") and not fashion_available():
            pytest.skip("Debian package dataset-fashion-mnist is not installed")
        recipe = recipes.get(name).scaled(n_train=n, n_test=64, epochs=epochs)
        build.train(recipe, root / "checkpoints" / name)
        build.export(
            root / "checkpoints" / name,
            recipe,
            repository,
            quantize="int8" if name == "fashion-vit" else None,
        )
    return repository
