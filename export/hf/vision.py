"""ViT and DeiT image classifiers from Hugging Face checkpoints as the service's ``model`` graph.

The graph contract is our own ViT's (``export/graphs.py``'s :func:`image_plans`): ``pixels``
(B, C, H, W) normalised → ``logits`` (B, classes) and ``attentions`` (B, layers, heads, T, T).
The checkpoint's own model computes both — loaded with ``attn_implementation="eager"`` so the
attention probabilities are real tensors (SDPA never materialises them) and returned through its
public ``output_attentions`` — so the graph is the checkpoint's forward pass, not a re-implementation.

ViT (Dosovitskiy et al. 2021) has one prefix token (CLS); DeiT (Touvron et al. 2021) adds a
distillation token after it, which the manifest's ``prefix_tokens = 2`` tells the service's rollout
to skip. ``DeiTForImageClassificationWithTeacher``'s logits are the mean of its class and
distillation heads, as in transformers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor, nn
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
)

from export.graphs import GraphPlan, image_plans
from export.hf.errors import UnsupportedCheckpoint, read_json
from export.hf.loading import pretrained
from service.inference.manifest import ImageSpec

log = logging.getLogger(__name__)

#: architecture (config.json ``architectures``) → manifest family
ARCHITECTURES = {
    "ViTForImageClassification": "hf-vit",
    "DeiTForImageClassification": "hf-deit",
    "DeiTForImageClassificationWithTeacher": "hf-deit",
}
#: the image processors' defaults when a checkpoint has no preprocessor_config.json
_DEFAULT_NORM = {
    "hf-vit": (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD),
    "hf-deit": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
}


class Classifier(nn.Module):
    """pixels (B, C, H, W) → logits (B, classes), attentions (B, layers, heads, T, T)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model: Any = model

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(pixel_values=pixels, output_attentions=True)
        return out.logits, torch.stack(out.attentions, dim=1)  # layers × (B, heads, T, T)


def load(checkpoint: Path, architecture: str) -> nn.Module:
    model: nn.Module = pretrained(getattr(transformers, architecture), checkpoint)
    return model


def side(size: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def plans(model: nn.Module) -> list[GraphPlan]:
    cfg: Any = model.config
    height, width = side(cfg.image_size)
    return image_plans(Classifier(model), cfg.num_channels, height, width)


def image_spec(model: nn.Module, checkpoint: Path, family: str) -> tuple[ImageSpec, list[str]]:
    """The manifest's preprocessing and labels, and notes on what the service does differently."""
    cfg: Any = model.config
    height, width = side(cfg.image_size)
    mean, std, notes = _normalisation(checkpoint, family, cfg.num_channels, (height, width))
    if missing := [i for i in range(cfg.num_labels) if i not in cfg.id2label]:
        raise UnsupportedCheckpoint(
            f"{checkpoint / 'config.json'}: id2label names no label for the classes {missing[:10]} "
            f"(the model has {cfg.num_labels})"
        )
    spec = ImageSpec(
        height=height,
        width=width,
        channels=cfg.num_channels,
        mean=mean,
        std=std,
        labels=[str(cfg.id2label[i]) for i in range(cfg.num_labels)],
        patch_size=cfg.patch_size,
        num_layers=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        prefix_tokens=2 if family == "hf-deit" else 1,
    )
    return spec, notes


_BILINEAR = 2  # PIL.Image.Resampling.BILINEAR, as preprocessor_config.json's "resample" names it


def _normalisation(
    checkpoint: Path, family: str, channels: int, size: tuple[int, int]
) -> tuple[list[float], list[float], list[str]]:
    """mean/std on the service's [0, 1] scale from ``preprocessor_config.json``.

    The service scales by 1/255 and then normalises; a processor that rescales by ``f`` (or not at
    all) and normalises with (m, s) gives the same numbers with (m, s) / (255 f).
    """
    path = checkpoint / "preprocessor_config.json"
    proc: dict[str, Any] = read_json(path, default={})
    if not isinstance(proc, dict):
        raise UnsupportedCheckpoint(f"{path}: a JSON object is expected")
    mean, std = (list(v) for v in _DEFAULT_NORM[family])
    where = f"{path.name}'s image_mean/image_std" if path.exists() else f"the {family} default mean/std"
    if proc.get("do_normalize", True):
        # a single number is every channel's, as transformers' processors take it
        mean, std = (
            [float(v)] * channels if isinstance(v, int | float) else list(v)
            for v in (proc.get("image_mean", mean), proc.get("image_std", std))
        )
    else:
        mean, std = [0.0] * channels, [1.0] * channels
    if len(mean) != channels or len(std) != channels:
        raise UnsupportedCheckpoint(f"{where}: {len(mean)} values for a {channels}-channel model")
    factor = proc.get("rescale_factor", 1 / 255) if proc.get("do_rescale", True) else 1.0
    scale = 255.0 * factor
    notes = []
    if proc.get("do_center_crop"):
        notes.append("the checkpoint's processor centre-crops; the service resizes the whole image")
    resize = proc.get("size", {})
    exact = resize == size[0] == size[1] or (
        isinstance(resize, dict) and (resize.get("height"), resize.get("width")) == size
    )
    if resize and not exact:  # {"height", "width"} elsewhere, an int, {"shortest_edge": …}
        notes.append(f"the checkpoint's processor resizes to {resize}; the service to {size}")
    if proc.get("do_resize", True) and proc.get("resample", _BILINEAR) != _BILINEAR:
        notes.append(
            f"the checkpoint's processor resizes with PIL filter {proc['resample']}; the service bilinear"
        )
    for note in notes:
        log.warning("%s: %s", checkpoint.name, note)
    return [m / scale for m in mean], [s / scale for s in std], notes
