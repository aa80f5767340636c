"""The ``fashion`` task: Fashion-MNIST items pasted at random positions on a larger canvas.

The 28×28 item lands somewhere on a ``canvas``×``canvas`` black image and its box is recorded, so
the ViT has to find the object first and its attention can be scored later (pointing game: does
the rollout's maximum fall inside the box?).

The data comes from Debian's ``dataset-fashion-mnist`` package (gzipped IDX files); nothing is
downloaded.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.data import DatasetMissing

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"
LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
ITEM = 28
#: per-channel statistics of the canvases (mostly black background), used to normalise inputs
MEAN, STD = 0.095, 0.25


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file: magic, dims as big-endian uint32, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {dims} values, found {array.size}")
    return array.reshape(dims)


def find_dataset(directory: Path = DEBIAN_DIR) -> Path:
    if (directory / "t10k-labels-idx1-ubyte.gz").exists():
        return directory
    if not shutil.which("apt-get"):
        hint = "install Debian's dataset-fashion-mnist package"
    else:
        hint = INSTALL_HINT if os.geteuid() == 0 else "sudo " + INSTALL_HINT.replace("&& ", "&& sudo ")
    raise DatasetMissing(f"Fashion-MNIST not found in {directory}; run: {hint}")


def load_split(split: str, directory: Path = DEBIAN_DIR) -> tuple[np.ndarray, np.ndarray]:
    """``split`` is ``train`` (60k) or ``t10k`` (10k) → images (N, 28, 28) uint8, labels (N,)."""
    root = find_dataset(directory)
    images = read_idx(root / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(root / f"{split}-labels-idx1-ubyte.gz")
    return images, labels


@dataclass
class Canvases:
    images: np.ndarray  # (N, canvas, canvas) uint8
    labels: np.ndarray  # (N,) int64
    boxes: np.ndarray  # (N, 4) int: top, left, bottom, right (exclusive)


def make_canvases(items: np.ndarray, labels: np.ndarray, canvas: int, seed: int) -> Canvases:
    """Paste each item at a uniformly random position; deterministic for a given seed."""
    if canvas < ITEM:
        raise ValueError(f"canvas must be at least {ITEM} pixels")
    rng = np.random.default_rng(seed)
    n = len(items)
    top = rng.integers(0, canvas - ITEM + 1, n)
    left = rng.integers(0, canvas - ITEM + 1, n)
    images = np.zeros((n, canvas, canvas), dtype=np.uint8)
    for i in range(n):
        images[i, top[i] : top[i] + ITEM, left[i] : left[i] + ITEM] = items[i]
    boxes = np.stack([top, left, top + ITEM, left + ITEM], axis=1)
    return Canvases(images, labels.astype(np.int64), boxes)


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) → float32 (N, 1, H, W) as the manifest's preprocessing describes."""
    return ((images.astype(np.float32) / 255.0 - MEAN) / STD)[:, None]
