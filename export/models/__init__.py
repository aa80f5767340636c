"""Model families and their named variants.

A *family* string (the manifest's ``family``) picks a builder; the builder takes the family's
config dataclass fields as keyword arguments. Every RNN scorer is its own family name
(``rnn-additive`` … ``rnn-local-p``) because it changes the decoder graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from torch import nn

from export.models.rnn import SCORERS, RNNConfig, RNNSeq2Seq
from export.models.transformer import Transformer, TransformerConfig
from export.models.vit import VisionTransformer, ViTConfig

Builder = Callable[..., nn.Module]
REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def wrap(fn: Builder) -> Builder:
        REGISTRY[name] = fn
        return fn

    return wrap


def _rnn_builder(scorer: str) -> Builder:
    def build(**cfg: Any) -> nn.Module:
        return RNNSeq2Seq(RNNConfig(**{**cfg, "attention": scorer}))

    return build


for _scorer in SCORERS:
    register(f"rnn-{_scorer}")(_rnn_builder(_scorer))


@register("transformer")
def transformer(**cfg: Any) -> nn.Module:
    return Transformer(TransformerConfig(**cfg))


@register("vit")
def vit(**cfg: Any) -> nn.Module:
    return VisionTransformer(ViTConfig(**cfg))


def build_model(family: str, config: dict[str, Any]) -> nn.Module:
    if family not in REGISTRY:
        raise ValueError(f"unknown family {family!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[family](**config)


def model_config(model: nn.Module) -> dict[str, Any]:
    """The config a model was built from, as plain data (stored in checkpoint metadata)."""
    cfg = asdict(model.cfg)  # type: ignore[call-overload]
    cfg.pop("attention", None)  # implied by the family name
    return cfg
