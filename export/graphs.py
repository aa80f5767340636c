"""Which ONNX graphs each family exports, with names, dynamic axes and verification inputs.

A :class:`GraphPlan` is everything the generic exporter (``export/onnx_export.py``) needs: the
module whose ``forward`` becomes the graph, its input/output names, which axes must stay
symbolic, and a function that builds inputs for any shape so parity can be checked at several.
The input/output names here are the ones ``service/inference/manifest.py`` documents.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from export.models.rnn import RNNSeq2Seq
from export.models.transformer import Transformer
from export.models.vit import VisionTransformer

Shape = dict[str, int]


@dataclass
class GraphPlan:
    key: str  # manifest graphs key
    file: str
    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    #: name → {axis: symbolic dim name}, for inputs and outputs alike
    dynamic: dict[str, dict[int, str]]
    make_inputs: Callable[[Shape, torch.Generator], tuple[Tensor, ...]]
    #: first is the tracing example (batch ≥ 2, distinct sizes), the rest are verified too
    shapes: list[Shape] = field(default_factory=list)


def _encoder_plan(
    encode: nn.Module, src_vocab: int, extra: dict[str, dict[int, str]], shapes: list[Shape]
) -> GraphPlan:
    """The encoder graph of every seq2seq contract: ``(src, src_mask) → memory (B, S, d)`` and the
    contract's ``extra`` outputs (name → their dynamic axes), in that order."""
    seq = {0: "batch", 1: "src_len"}
    return GraphPlan(
        "encoder",
        "encoder.onnx",
        encode,
        ["src", "src_mask"],
        ["memory", *extra],
        {"src": seq, "src_mask": seq, "memory": seq, **extra},
        _source_inputs(src_vocab),
        shapes,
    )


def _mask(batch: int, length: int, gen: torch.Generator) -> Tensor:
    """(B, S) bool mask with distinct lengths per row, the longest row full."""
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[0] = length
    return torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)


def _tokens(batch: int, length: int, vocab: int, gen: torch.Generator) -> Tensor:
    return torch.randint(4, vocab, (batch, length), generator=gen)


def _source_inputs(vocab: int) -> Callable[[Shape, torch.Generator], tuple[Tensor, ...]]:
    """Inputs of an encoder graph: (src ids, src mask) at a shape."""

    def make(s: Shape, g: torch.Generator) -> tuple[Tensor, ...]:
        return _tokens(s["batch"], s["src_len"], vocab, g), _mask(s["batch"], s["src_len"], g)

    return make


class _Stage(nn.Module):
    """Exports one stage (``encode`` or ``step``) of a model as its own graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model: Any = model


class _Encode(_Stage):
    def forward(self, src: Tensor, src_mask: Tensor) -> Any:
        return self.model.encode(src, src_mask)


class _RNNStep(_Stage):
    def forward(
        self, prev_tokens: Tensor, state: Tensor, memory: Tensor, src_mask: Tensor, step: Tensor
    ) -> Any:
        return self.model.step(prev_tokens, state, memory, src_mask, step)


class _TransformerStep(_Stage):
    def forward(self, tokens: Tensor, memory: Tensor, src_mask: Tensor) -> Any:
        return self.model.step(tokens, memory, src_mask)


class _EncodeKV(_Stage):
    """``model.encode_kv`` (memory and per-layer cross keys/values) as flat graph outputs: one
    tensor per layer, or each kind stacked along a layer axis (``packed``)."""

    def __init__(self, model: nn.Module, packed: bool) -> None:
        super().__init__(model)
        self.packed = packed

    def forward(self, src: Tensor, src_mask: Tensor) -> tuple[Tensor, ...]:
        memory, keys, values = self.model.encode_kv(src, src_mask)
        if self.packed:
            return memory, torch.stack(keys, dim=1), torch.stack(values, dim=1)
        return (memory, *keys, *values)


class _StepKV(_Stage):
    """``model.step_kv`` over flat graph inputs and outputs: after tokens, positions, past_mask and
    src_mask come the past keys, past values, cross keys and cross values — ``layers`` tensors of
    each, or one packed tensor of each (split into layers in the graph)."""

    def __init__(self, model: nn.Module, layers: int, packed: bool) -> None:
        super().__init__(model)
        self.layers, self.packed = layers, packed

    def forward(
        self, tokens: Tensor, positions: Tensor, past_mask: Tensor, src_mask: Tensor, *caches: Tensor
    ) -> tuple[Tensor, ...]:
        n = self.layers
        if self.packed:
            groups = [list(c.unbind(1)) for c in caches]
        else:
            groups = [list(caches[i * n : (i + 1) * n]) for i in range(4)]
        past_keys, past_values, cross_keys, cross_values = groups
        logits, keys, values, cross = self.model.step_kv(
            tokens, positions, past_keys, past_values, past_mask, cross_keys, cross_values, src_mask
        )
        if self.packed:
            return logits, cross, torch.stack(keys, dim=1), torch.stack(values, dim=1)
        return (logits, cross, *keys, *values)


SEQ_SHAPES: list[Shape] = [
    {"batch": 3, "src_len": 11, "tgt_len": 5},
    {"batch": 1, "src_len": 7, "tgt_len": 1},
    {"batch": 5, "src_len": 23, "tgt_len": 9},
    {"batch": 16, "src_len": 4, "tgt_len": 3},
]
#: for the RNN graphs, which see no target length (the step takes one token per row)
RNN_SHAPES: list[Shape] = [{"batch": s["batch"], "src_len": s["src_len"]} for s in SEQ_SHAPES]
#: for the KV-cached step: ``past_len`` 0 is the first step (BOS only)
KV_SHAPES: list[Shape] = [
    {"batch": 3, "src_len": 11, "past_len": 5},
    {"batch": 1, "src_len": 7, "past_len": 0},
    {"batch": 5, "src_len": 23, "past_len": 9},
    {"batch": 16, "src_len": 4, "past_len": 1},
    {"batch": 2, "src_len": 5, "past_len": 0},
]
IMAGE_SHAPES: list[Shape] = [{"batch": 3}, {"batch": 1}, {"batch": 7}, {"batch": 32}]


def rnn_plans(model: RNNSeq2Seq) -> list[GraphPlan]:
    cfg = model.cfg

    def step_inputs(s: Shape, g: torch.Generator) -> tuple[Tensor, ...]:
        b, n = s["batch"], s["src_len"]
        return (
            _tokens(b, 1, cfg.tgt_vocab, g)[:, 0],
            torch.randn(b, cfg.state_size, generator=g),
            torch.randn(b, n, cfg.mem_dim, generator=g),
            _mask(b, n, g),
            torch.randint(0, n + 3, (b,), generator=g),
        )

    seq = {0: "batch", 1: "src_len"}
    return [
        _encoder_plan(_Encode(model), cfg.src_vocab, {"init_state": {0: "batch"}}, RNN_SHAPES),
        GraphPlan(
            "decoder_step",
            "decoder_step.onnx",
            _RNNStep(model),
            ["prev_tokens", "state", "memory", "src_mask", "step"],
            ["logits", "new_state", "attention"],
            {
                "prev_tokens": {0: "batch"},
                "state": {0: "batch"},
                "memory": seq,
                "src_mask": seq,
                "step": {0: "batch"},
                "logits": {0: "batch"},
                "new_state": {0: "batch"},
                "attention": seq,
            },
            step_inputs,
            RNN_SHAPES,
        ),
    ]


def transformer_plans(model: Transformer, packed: bool = False) -> list[GraphPlan]:
    cfg = model.cfg
    d_head = cfg.d_model // cfg.heads
    return seq2seq_kv_plans(model, cfg.src_vocab, cfg.tgt_vocab, cfg.dec_layers, cfg.heads, d_head, packed)


def transformer_prefix_plans(model: Transformer) -> list[GraphPlan]:
    """The older ``transformer`` contract (whole prefix per step), for comparison benchmarks."""
    cfg = model.cfg
    return seq2seq_plans(_Encode(model), _TransformerStep(model), cfg.src_vocab, cfg.tgt_vocab, cfg.d_model)


def layer_names(stem: str, layers: int) -> list[str]:
    """The per-layer tensors of the ``transformer-kv-layers`` contract: ``past_keys.0``, …"""
    return [f"{stem}.{i}" for i in range(layers)]


def seq2seq_kv_plans(
    model: nn.Module,
    src_vocab: int,
    tgt_vocab: int,
    layers: int,
    heads: int,
    d_head: int,
    packed: bool = False,
) -> list[GraphPlan]:
    """The KV-cached decoder contracts of ``service/inference/manifest.py`` for any ``model`` with
    ``encode_kv(src, src_mask) → memory, [cross keys], [cross values]`` and ``step_kv`` (see
    ``export/models/transformer.py``); imported Marian checkpoints (``export/hf/marian.py``) have both.

    ``transformer-kv-layers`` (what export writes): ``encoder``: src, src_mask (B, S) → memory
    (B, S, D), cross_keys.{i}, cross_values.{i} (B, heads, S, dh) for each decoder layer i;
    ``decoder_step``: tokens, positions (B,), past_mask (B, P), src_mask, past_keys.{i},
    past_values.{i} (B, heads, P, dh), cross_keys.{i}, cross_values.{i} → logits (B, V),
    cross_attention (B, layers, heads, S), present_keys.{i}, present_values.{i} (B, heads, P + 1, dh).

    ``transformer-kv`` (``packed``, repositories written before): the same with one tensor per kind,
    the layers stacked on axis 1 — ``past_keys`` (B, layers, heads, P, dh) and so on. The graph
    splits and re-stacks those at every step (three copies of the cache where the per-layer
    contract makes one), which is why it was replaced; the service still serves it.
    """

    def names(stem: str) -> list[str]:  # keys first, then values
        kinds = (f"{stem}_keys", f"{stem}_values")
        return list(kinds) if packed else [n for k in kinds for n in layer_names(k, layers)]

    past, present, cross = names("past"), names("present"), names("cross")
    cache_axis = 3 if packed else 2  # the position axis of a cache tensor

    def step_inputs(s: Shape, g: torch.Generator) -> tuple[Tensor, ...]:
        b, n, p = s["batch"], s["src_len"], s["past_len"]
        past_mask = _mask(b, p, g) if p else torch.zeros(b, 0, dtype=torch.bool)
        if p:  # rows admitted later hold fewer positions, on the left: mask them like the service
            past_mask = past_mask.flip(1)
        lead = (b, layers, heads) if packed else (b, heads)
        caches = [torch.randn(*lead, p, d_head, generator=g) for _ in past]
        crosses = [torch.randn(*lead, n, d_head, generator=g) for _ in cross]
        tokens = _tokens(b, 1, tgt_vocab, g)[:, 0]
        return (tokens, past_mask.sum(1), past_mask, _mask(b, n, g), *caches, *crosses)

    seq = {0: "batch", 1: "src_len"}
    by_source = {0: "batch", cache_axis: "src_len"}
    return [
        _encoder_plan(_EncodeKV(model, packed), src_vocab, dict.fromkeys(cross, by_source), KV_SHAPES),
        GraphPlan(
            "decoder_step",
            "decoder_step.onnx",
            _StepKV(model, layers, packed),
            ["tokens", "positions", "past_mask", "src_mask", *past, *cross],
            ["logits", "cross_attention", *present],
            {
                "tokens": {0: "batch"},
                "positions": {0: "batch"},
                "past_mask": {0: "batch", 1: "past_len"},
                "src_mask": seq,
                **{name: {0: "batch", cache_axis: "past_len"} for name in past},
                **dict.fromkeys(cross, by_source),
                "logits": {0: "batch"},
                "cross_attention": {0: "batch", 3: "src_len"},
                **{name: {0: "batch", cache_axis: "present_len"} for name in present},
            },
            step_inputs,
            KV_SHAPES,
        ),
    ]


def seq2seq_plans(
    encode: nn.Module, step: nn.Module, src_vocab: int, tgt_vocab: int, d_model: int
) -> list[GraphPlan]:
    """The ``transformer`` decoder contract of ``service/inference/manifest.py`` for any encoder/step pair:
    ``encode(src, src_mask) → memory`` and ``step(tokens, memory, src_mask) → (logits of the last
    position, cross_attention (B, layers, heads, S) of it)``. Imported checkpoints
    (``export/hf/marian.py``) wrap their own modules into exactly these graphs."""

    def step_inputs(s: Shape, g: torch.Generator) -> tuple[Tensor, ...]:
        b, n = s["batch"], s["src_len"]
        tokens = _tokens(b, s["tgt_len"], tgt_vocab, g)
        return tokens, torch.randn(b, n, d_model, generator=g), _mask(b, n, g)

    seq = {0: "batch", 1: "src_len"}
    return [
        _encoder_plan(encode, src_vocab, {}, SEQ_SHAPES),
        GraphPlan(
            "decoder_step",
            "decoder_step.onnx",
            step,
            ["tokens", "memory", "src_mask"],
            ["logits", "cross_attention"],
            {
                "tokens": {0: "batch", 1: "tgt_len"},
                "memory": seq,
                "src_mask": seq,
                "logits": {0: "batch"},
                "cross_attention": {0: "batch", 3: "src_len"},
            },
            step_inputs,
            SEQ_SHAPES,
        ),
    ]


def vit_plans(model: VisionTransformer) -> list[GraphPlan]:
    cfg = model.cfg
    return image_plans(model, cfg.channels, cfg.image_size, cfg.image_size)


def image_plans(model: nn.Module, channels: int, height: int, width: int) -> list[GraphPlan]:
    """The image-classification contract: ``pixels`` (B, C, H, W) → ``logits`` (B, classes) and
    ``attentions`` (B, layers, heads, T, T), for our ViT and imported ones alike."""

    def inputs(s: Shape, g: torch.Generator) -> tuple[Tensor, ...]:
        return (torch.randn(s["batch"], channels, height, width, generator=g),)

    return [
        GraphPlan(
            "model",
            "model.onnx",
            model,
            ["pixels"],
            ["logits", "attentions"],
            {"pixels": {0: "batch"}, "logits": {0: "batch"}, "attentions": {0: "batch"}},
            inputs,
            IMAGE_SHAPES,
        )
    ]


def plans_for(model: nn.Module) -> list[GraphPlan]:
    if isinstance(model, RNNSeq2Seq):
        return rnn_plans(model)
    if isinstance(model, Transformer):
        return transformer_plans(model)
    if isinstance(model, VisionTransformer):
        return vit_plans(model)
    raise TypeError(f"no export plan for {type(model).__name__}")
