"""Attention maps: rollout for ViTs, and PNG heatmaps for images and alignment grids.

Rollout (Abnar & Zuidema 2020): attention alone ignores the residual stream, so each layer's
head-fused attention ``A`` becomes ``0.5·A + 0.5·I`` (equivalently ``A + I`` renormalised), and
the layers are multiplied through; the CLS row of the product says how much each patch fed the
class token. An optional *discard ratio* zeroes the weakest links of each layer first (as in
jacobgil/vit-explain), which sharpens maps on larger models.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

HeadFusion = Literal["mean", "max", "min"]
_FUSE: dict[str, Callable[..., np.ndarray]] = {"mean": np.mean, "max": np.max, "min": np.min}

# A perceptually ordered dark-to-bright colormap (anchor points of matplotlib's "inferno").
_ANCHORS = np.array(
    [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39],
     [252, 255, 164]],
    dtype=np.float32,
)  # fmt: skip
_LUT = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c]) for c in range(3)],
    axis=1,
).astype(np.uint8)


def alignment(attention: np.ndarray) -> np.ndarray:
    """A translation's (target × source) map: an RNN's weights as they are, a Transformer's
    ``(T, layers, heads, S)`` cross-attention of the last layer averaged over heads."""
    return attention if attention.ndim == 2 else attention[:, -1].mean(axis=1)


def rollout(
    attentions: np.ndarray,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
    prefix_tokens: int = 1,
) -> np.ndarray:
    """attentions (layers, heads, T, T) with token 0 = CLS and ``prefix_tokens`` non-patch
    tokens first → (T - prefix_tokens,) patch relevance, max 1.

    Only the CLS row of the product A_L ⋯ A_1 is kept, so it is carried through the layers as a
    row vector (last layer first): T² work per layer instead of a T × T matrix product."""
    a = _FUSE[head_fusion](attentions, axis=1).astype(np.float64)  # (layers, T, T)
    tokens = a.shape[-1]
    if discard_ratio > 0:
        for layer in a:
            flat = layer.reshape(-1)  # a view: dropped in place
            k = int(flat.size * discard_ratio)
            if k:
                drop = np.argpartition(flat, k)[:k]
                flat[drop[drop != 0]] = 0  # never drop CLS → CLS
    a += np.eye(tokens)
    a /= a.sum(axis=-1, keepdims=True)
    row = np.zeros(tokens)
    row[0] = 1.0
    for layer in a[::-1]:
        row = row @ layer
    relevance = row[prefix_tokens:]
    peak = relevance.max()
    return (relevance / peak if peak > 0 else relevance).astype(np.float32)


def last_layer_cls(
    attentions: np.ndarray, head_fusion: HeadFusion = "mean", prefix_tokens: int = 1
) -> np.ndarray:
    """The raw last-layer CLS → patch attention, the baseline rollout is compared against."""
    fuse = _FUSE[head_fusion]
    row = fuse(attentions[-1], axis=0)[0, prefix_tokens:]
    return (row / row.max()).astype(np.float32)


def colorize(values: np.ndarray) -> np.ndarray:
    """values in [0, 1], any shape → uint8 RGB of that shape + (3,)."""
    index = np.clip(np.nan_to_num(values) * 255, 0, 255).astype(np.uint8)
    return _LUT[index]


def to_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # speed over size: these are transient
    return buffer.getvalue()


def image_overlay_png(
    image: np.ndarray, relevance: np.ndarray, opacity: float = 0.5, scale: int = 4
) -> bytes:
    """Overlay a patch-grid map (rows, cols) on the model-sized input image (H, W) or (H, W, C)."""
    base = Image.fromarray(image if image.ndim == 3 else np.stack([image] * 3, axis=-1)).convert("RGB")
    size = (base.width * scale, base.height * scale)
    base = base.resize(size, Image.Resampling.NEAREST)
    heat = Image.fromarray(colorize(relevance)).resize(size, Image.Resampling.BILINEAR)
    return to_png(Image.blend(base, heat, opacity))


#: the longest side of an alignment PNG's grid: cells shrink to fit it (a 511 × 513 map at 18 px
#: a cell was a 9278 × 9256 image, 0.7 GB of canvas and 7 s to draw)
MAX_GRID_PX = 2048
#: the smallest cell that still carries its token's label (the default font is 11 px high)
LABELLED_CELL_PX = 10
#: characters of a label drawn (a longer token is cut, its end shown as "..")
MAX_LABEL_CHARS = 24


def alignment_png(
    attention: np.ndarray, source_tokens: list[str], target_tokens: list[str], cell: int = 18
) -> bytes:
    """A (target × source) grid with token labels: rows are target tokens, columns source tokens.
    A map too large for ``cell`` pixels a cell within :data:`MAX_GRID_PX` gets smaller cells,
    and no labels once they are smaller than :data:`LABELLED_CELL_PX`."""
    font = ImageFont.load_default()
    rows, cols = attention.shape
    cell = max(1, min(cell, MAX_GRID_PX // max(rows, cols, 1)))
    sources, targets = [_printable(t) for t in source_tokens], [_printable(t) for t in target_tokens]
    if cell < LABELLED_CELL_PX:
        sources, targets = [], []
    label_w = 8 + 7 * max(map(len, targets), default=1) if targets else 0
    label_h = 8 + 7 * max(map(len, sources), default=1) if sources else 0
    canvas = Image.new("RGB", (label_w + cols * cell + 1, label_h + rows * cell + 1), "white")
    grid = Image.fromarray(colorize(attention)).resize((cols * cell, rows * cell), Image.Resampling.NEAREST)
    canvas.paste(grid, (label_w, label_h))
    draw = ImageDraw.Draw(canvas)
    for j, tok in enumerate(sources):  # column labels, written vertically
        label = Image.new("RGB", (label_h - 4, cell), "white")
        ImageDraw.Draw(label).text((2, 3), tok, fill="black", font=font)
        canvas.paste(label.rotate(90, expand=True), (label_w + j * cell, 0))
    for i, tok in enumerate(targets):
        draw.text((4, label_h + i * cell + 3), tok, fill="black", font=font)
    return to_png(canvas)


def _printable(token: str) -> str:
    """A label the default (latin-1) font draws: a space, or SentencePiece's word marker "▁", as
    "_" (the marker became "?"), other characters outside latin-1 as "?", cut at
    :data:`MAX_LABEL_CHARS`."""
    token = "_" if token == " " else token.replace("\u2581", "_")
    if len(token) > MAX_LABEL_CHARS:
        token = token[: MAX_LABEL_CHARS - 2] + ".."
    return token.encode("latin-1", "replace").decode("latin-1")
