"""Train a ViT on the ``fashion`` canvases."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from export.data import fashion
from export.models import build_model
from export.train.loop import TrainConfig, fit


@dataclass
class FashionData:
    canvas: int
    train_items: np.ndarray  # (N, 28, 28) uint8, pasted at a fresh random position every time
    train_labels: np.ndarray


def prepare(canvas: int, n_train: int | None = None) -> FashionData:
    """The official train items (60k); ``n_train`` takes a prefix. The held-out canvases are
    built from the official test items by ``export.evaluate.image_test_set``."""
    items, labels = fashion.load_split("train")
    return FashionData(canvas, items[:n_train], labels[:n_train].astype(np.int64))


def train(model_cfg: dict, train_cfg: TrainConfig, data: FashionData, desc: str) -> nn.Module:
    torch.manual_seed(train_cfg.seed)
    model = build_model("vit", model_cfg)
    labels = torch.from_numpy(data.train_labels)
    criterion = nn.CrossEntropyLoss(label_smoothing=train_cfg.label_smoothing)
    rng = np.random.default_rng(train_cfg.seed)

    def loss_fn(index: Tensor) -> Tensor:
        # every item lands at a fresh random position each time it is seen, so the model learns
        # to find the object rather than to memorise where it was pasted
        idx = index.numpy()
        seed = int(rng.integers(1 << 31))
        canvases = fashion.make_canvases(data.train_items[idx], data.train_labels[idx], data.canvas, seed)
        logits, _ = model(torch.from_numpy(fashion.normalise(canvases.images)))
        return criterion(logits, labels[index])

    fit(model, len(labels), loss_fn, train_cfg, desc)
    return model
