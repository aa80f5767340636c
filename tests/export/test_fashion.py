"""Fashion-MNIST IDX reading and canvas construction."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from export.data import fashion
from tests.conftest import fashion_available


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_round_trip(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.gz", array)
    np.testing.assert_array_equal(fashion.read_idx(tmp_path / "x.gz"), array)


def test_read_idx_rejects_truncated_files(tmp_path: Path) -> None:
    path = tmp_path / "bad.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, 1) + struct.pack(">I", 10) + b"\x01\x02")
    with pytest.raises(ValueError, match="expected"):
        fashion.read_idx(path)


def test_missing_dataset_names_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(fashion.DatasetMissing, match="dataset-fashion-mnist"):
        fashion.find_dataset(tmp_path)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # not root: the command says sudo
    with pytest.raises(fashion.DatasetMissing, match="run: sudo apt-get update && sudo apt-get install -y"):
        fashion.find_dataset(tmp_path)


def test_canvases_hold_each_item_inside_its_box() -> None:
    rng = np.random.default_rng(0)
    items = rng.integers(1, 256, (20, 28, 28), dtype=np.uint8)
    canvases = fashion.make_canvases(items, np.arange(20), canvas=48, seed=1)
    assert canvases.images.shape == (20, 48, 48)
    for img, item, (top, left, bottom, right) in zip(canvases.images, items, canvases.boxes, strict=True):
        assert bottom - top == 28 and right - left == 28 and top >= 0 and bottom <= 48
        np.testing.assert_array_equal(img[top:bottom, left:right], item)
        assert int(img.sum()) == int(item.sum())  # nothing outside the box
    assert len({tuple(b) for b in canvases.boxes}) > 10  # positions vary


@pytest.mark.skipif(not fashion_available(), reason="dataset-fashion-mnist not installed")
def test_debian_dataset_loads() -> None:
    images, labels = fashion.load_split("t10k")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert set(np.unique(labels)) == set(range(10))
