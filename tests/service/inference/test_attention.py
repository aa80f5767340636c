"""Attention rollout (Abnar & Zuidema 2020) and the PNG renderers."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from service.inference.attention import (
    MAX_GRID_PX,
    MAX_LABEL_CHARS,
    _printable,
    alignment_png,
    colorize,
    image_overlay_png,
    last_layer_cls,
    rollout,
)


def uniform(layers: int, heads: int, tokens: int) -> np.ndarray:
    return np.full((layers, heads, tokens, tokens), 1.0 / tokens)


def test_rollout_of_uniform_attention_is_flat() -> None:
    r = rollout(uniform(3, 2, 5))
    np.testing.assert_allclose(r, np.ones(4))


def test_rollout_by_hand_for_one_layer() -> None:
    a = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8]])
    # (A + I) renormalised; the CLS row, patches only, scaled to max 1
    expected = ((a + np.eye(3)) / (a + np.eye(3)).sum(1, keepdims=True))[0, 1:]
    np.testing.assert_allclose(rollout(a[None, None]), expected / expected.max(), rtol=1e-6)


def test_prefix_tokens_are_dropped_from_the_maps() -> None:
    """DeiT puts a distillation token after CLS: the maps cover only the patches after it."""
    a = np.array([[0.4, 0.1, 0.2, 0.3], [0.25] * 4, [0.25] * 4, [0.1, 0.1, 0.1, 0.7]])
    full = ((a + np.eye(4)) / (a + np.eye(4)).sum(1, keepdims=True))[0]
    np.testing.assert_allclose(rollout(a[None, None], prefix_tokens=2), full[2:] / full[2:].max(), rtol=1e-6)
    np.testing.assert_allclose(last_layer_cls(a[None, None], prefix_tokens=2), [2 / 3, 1.0], rtol=1e-6)


def test_rollout_multiplies_layers_in_order() -> None:
    rng = np.random.default_rng(0)
    att = rng.random((2, 1, 4, 4))
    att /= att.sum(-1, keepdims=True)
    layer = [(a[0] + np.eye(4)) / (a[0] + np.eye(4)).sum(1, keepdims=True) for a in att]
    expected = (layer[1] @ layer[0])[0, 1:]
    np.testing.assert_allclose(rollout(att), expected / expected.max(), rtol=1e-6)


def test_head_fusion_and_discard() -> None:
    att = uniform(1, 2, 3)
    att[0, 0, 0] = [0.0, 1.0, 0.0]  # head 0: CLS looks at patch 1; head 1 uniform
    assert rollout(att, "max").argmax() == 0
    # min over heads: CLS → [0, 1/3, 0]; patch 2 gets nothing from the CLS row
    np.testing.assert_allclose(rollout(att, "min"), [1.0, 0.0])
    assert np.all(rollout(att, "mean", discard_ratio=0.5) >= 0)
    np.testing.assert_allclose(last_layer_cls(att, "max"), [1.0, 1 / 3 / 1.0])


def test_pngs_decode_with_the_expected_sizes() -> None:
    overlay = Image.open(io.BytesIO(image_overlay_png(np.zeros((48, 48), np.uint8), np.eye(6), 0.5)))
    assert overlay.size == (192, 192) and overlay.mode == "RGB"
    grid = Image.open(io.BytesIO(alignment_png(np.eye(3)[:2], ["a", " ", "</s>"], ["1", "</s>"])))
    assert grid.format == "PNG" and grid.width > 3 * 18 and grid.height > 2 * 18
    assert colorize(np.array([0.0, 1.0])).tolist()[0] != colorize(np.array([0.0, 1.0])).tolist()[1]


def test_a_large_alignment_png_is_drawn_within_bounds() -> None:
    """An imported Marian model's limits (511 × 513 tokens) at 18 px a cell made a 9278 × 9256
    image: 0.7 GB of canvas and 7 s. Cells shrink to fit MAX_GRID_PX, labels go once cells are too
    small to carry them, and long labels are cut."""
    rows, cols = 511, 513
    attention = np.random.default_rng(0).random((rows, cols)).astype(np.float32)
    tokens = [f"t{i}" for i in range(cols)]
    grid = Image.open(io.BytesIO(alignment_png(attention, tokens, tokens[:rows])))
    assert max(grid.size) <= MAX_GRID_PX + 1 and grid.size[0] >= cols * 3
    # cells of 18 px where they fit; a token far wider than its cell is cut to MAX_LABEL_CHARS
    small = Image.open(io.BytesIO(alignment_png(np.eye(2), ["x" * 500, "b"], ["▁la", "</s>"])))
    assert small.size[0] < 8 + 7 * 30 + 2 * 18 + 1 and small.size[1] < 8 + 7 * 30 + 2 * 18 + 1


def test_labels_show_the_word_marker_as_an_underscore() -> None:
    assert _printable("▁lumière") == "_lumière" and _printable(" ") == "_" and _printable("日") == "?"
    assert _printable("y" * 100) == "y" * (MAX_LABEL_CHARS - 2) + ".."


def test_rollout_equals_the_matrix_product_of_its_layers() -> None:
    """The CLS row carried through the layers is row 0 of (A_L ⋯ A_1), A = norm(fused + I), for
    every head fusion, prefix and with discarding."""
    rng = np.random.default_rng(4)
    raw = rng.random((4, 3, 11, 11))
    attentions = (raw / raw.sum(axis=-1, keepdims=True)).astype(np.float32)
    fuse = {"mean": np.mean, "max": np.max, "min": np.min}
    for fusion, f in fuse.items():
        for prefix in (1, 2):
            product = np.eye(11)
            for layer in attentions:
                a = f(layer, axis=0).astype(np.float64) + np.eye(11)
                product = (a / a.sum(axis=-1, keepdims=True)) @ product
            want = product[0, prefix:] / product[0, prefix:].max()
            np.testing.assert_allclose(rollout(attentions, fusion, 0.0, prefix), want, atol=1e-6)  # type: ignore[arg-type]
    discarded = rollout(attentions, "mean", 0.5, 1)
    assert discarded.shape == (10,) and discarded.max() == 1.0
