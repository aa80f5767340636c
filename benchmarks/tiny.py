"""The benchmark's repository: the demo models plus ``tiny-vit``, a model too small to matter.

``tiny-vit`` is the demo ViT recipe shrunk to one layer of width 16 on 32×32 images (ONNX
Runtime needs ~0.05 ms for it), trained for one short epoch and exported by the real pipeline. On
it a server's CPU per request is almost all framework: HTTP, JSON, routing, batching, metrics —
the "tiny path" the overhead targets are about. Built once into ``build/bench_repository``
(gitignored) beside links to the demo models, so ``model_repository/`` stays the demo's.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
from PIL import Image

TINY = "tiny-vit"
SHRUNK = {
    "image_size": 32,
    "patch_size": 8,
    "dim": 16,
    "depth": 1,
    "heads": 1,
    "mlp_dim": 16,
    "stem_channels": 4,
}


def repository(demo: Path, root: Path) -> Path:
    """``root`` with a link to each model of ``demo`` (and none other) and a built ``tiny-vit``,
    reused when present."""
    from export import build, recipes

    root.mkdir(parents=True, exist_ok=True)
    for link in root.iterdir():  # links of an earlier run, perhaps to another repository
        if link.is_symlink():
            link.unlink()
    for model in sorted(p for p in demo.iterdir() if p.is_dir()):
        (root / model.name).symlink_to(model.resolve(), target_is_directory=True)
    if not (root / TINY).exists():
        base = recipes.get("fashion-vit")
        recipe = dataclasses.replace(
            base,
            name=TINY,
            description="Benchmark model: the fashion ViT shrunk to nothing, so overhead shows.",
            model={**base.model, **SHRUNK},
            data={**base.data, "canvas": 32},
        ).scaled(n_train=512, n_test=64, epochs=1)
        build.train(recipe, root.parent / "bench_checkpoints" / TINY)
        build.export(root.parent / "bench_checkpoints" / TINY, recipe, root)
    return root


def image() -> bytes:
    """A 32×32 grey PNG: decoding it costs next to nothing."""
    pixels = (np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="PNG")
    return out.getvalue()
