"""Transformer encoder-decoder (Vaswani et al. 2017), pre-norm, with explicit attention.

Attention is written out (``softmax(QKᵀ/√d + mask) V``) instead of using SDPA or the fused
``nn.MultiheadAttention`` fast path, so the probabilities are a real tensor we can return and the
ONNX graph carries them as named outputs.

Exported stages (the KV-cached decoder contracts of ``export/graphs.py``): ``encode_kv(src,
src_mask) → memory and every decoder layer's cross-attention keys/values`` and ``step_kv`` — one
new token per row over each layer's cache of past self-attention keys/values → logits, the
present keys/values, and the cross-attention of that step. A step costs O(T) instead of
recomputing the prefix (O(T²) per sentence), and rows with different numbers of past positions
share a call (the past is masked per row), which is what iteration-level batching needs.
``step`` (whole prefix) stays as the reference the cached graphs are verified against, and as
the ``transformer`` contract of repositories exported before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

NEG_INF = -1e9


@dataclass
class TransformerConfig:
    src_vocab: int
    tgt_vocab: int
    d_model: int = 64  # residual width
    heads: int = 4  # attention heads; d_model must divide by it
    ff_dim: int = 192  # feed-forward inner width
    enc_layers: int = 2
    dec_layers: int = 2
    max_len: int = 128  # longest source or target sequence (sinusoidal positions)
    dropout: float = 0.1


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.heads:
            raise ValueError("d_model must be a multiple of heads")
        self.heads, self.d_head = cfg.heads, cfg.d_model // cfg.heads
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def _split(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.d_head).transpose(1, 2)  # (B, heads, N, dh)

    def forward(self, x: Tensor, context: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, T, D) attends to context (B, S, D); bias broadcasts to (B, heads, T, S)."""
        return self.attend(x, *self.keys_values(context), bias)

    def keys_values(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """context (B, S, D) → keys, values (B, heads, S, dh): what a KV cache keeps."""
        k, v = (self._split(t) for t in self.kv(context).chunk(2, dim=-1))
        return k, v

    def attend(self, x: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, T, D) attends to keys/values (B, heads, S, dh) → output (B, T, D), probs."""
        q = self._split(self.q(x))  # (B, heads, T, dh)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.d_head) + bias  # (B, heads, T, S)
        probs = torch.softmax(scores, dim=-1)  # (B, heads, T, S)
        out = (self.drop(probs) @ v).transpose(1, 2).flatten(2)  # (B, T, D)
        return self.out(out), probs


class FeedForward(nn.Sequential):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__(
            nn.Linear(cfg.d_model, cfg.ff_dim),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.ff_dim, cfg.d_model),
        )


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn, self.ff = MultiHeadAttention(cfg), FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.drop(self.attn(h, h, bias)[0])
        return x + self.drop(self.ff(self.norm2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(cfg.d_model) for _ in range(3))
        self.self_attn, self.cross_attn = MultiHeadAttention(cfg), MultiHeadAttention(cfg)
        self.ff = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, memory: Tensor, causal: Tensor, src_bias: Tensor) -> tuple[Tensor, Tensor]:
        h = self.norm1(x)
        x = x + self.drop(self.self_attn(h, h, causal)[0])
        out, cross = self.cross_attn(self.norm2(x), memory, src_bias)  # cross: (B, heads, T, S)
        x = x + self.drop(out)
        return x + self.drop(self.ff(self.norm3(x))), cross

    def step(
        self, x: Tensor, past: tuple[Tensor, Tensor], self_bias: Tensor, cross_kv: tuple[Tensor, Tensor],
        src_bias: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        """One new position x (B, 1, D) over the cached past keys/values (B, heads, P, dh) and the
        encoder's cross keys/values → (x, present keys, present values (B, heads, P + 1, dh),
        cross-attention (B, heads, 1, S))."""
        h = self.norm1(x)
        new_k, new_v = self.self_attn.keys_values(h)  # (B, heads, 1, dh)
        k, v = torch.cat([past[0], new_k], dim=2), torch.cat([past[1], new_v], dim=2)
        x = x + self.drop(self.self_attn.attend(h, k, v, self_bias)[0])
        out, cross = self.cross_attn.attend(self.norm2(x), *cross_kv, src_bias)
        x = x + self.drop(out)
        return x + self.drop(self.ff(self.norm3(x))), k, v, cross


def sinusoids(length: int, dim: int) -> Tensor:
    """The fixed sinusoidal position encodings of Vaswani et al. 2017, §3.5: (length, dim)."""
    pos = torch.arange(length, dtype=torch.float32).unsqueeze(1)  # (L, 1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))  # (dim/2,)
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


def padding_bias(src_mask: Tensor) -> Tensor:
    """(B, S) bool → (B, 1, 1, S) additive bias: 0 on tokens, NEG_INF on padding."""
    return torch.zeros(src_mask.shape, dtype=torch.float32).masked_fill(~src_mask, NEG_INF)[:, None, None, :]


def causal_bias(length: int, like: Tensor) -> Tensor:
    """(T, T) additive bias that hides future positions."""
    ones = torch.ones(length, length, dtype=torch.bool, device=like.device)
    return torch.zeros(length, length, device=like.device).masked_fill(torch.triu(ones, 1), NEG_INF)


class Transformer(nn.Module):
    positions: Tensor  # (max_len, d_model) fixed sinusoids, a non-persistent buffer

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.src_embed = nn.Embedding(cfg.src_vocab, cfg.d_model, padding_idx=0)
        self.tgt_embed = nn.Embedding(cfg.tgt_vocab, cfg.d_model, padding_idx=0)
        for embed in (self.src_embed, self.tgt_embed):  # × √d in forward brings them to unit scale
            nn.init.normal_(embed.weight, std=cfg.d_model**-0.5)
        self.register_buffer("positions", sinusoids(cfg.max_len, cfg.d_model), persistent=False)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        self.enc_norm, self.dec_norm = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.generator = nn.Linear(cfg.d_model, cfg.tgt_vocab)
        self.drop = nn.Dropout(cfg.dropout)

    def encode(self, src: Tensor, src_mask: Tensor) -> Tensor:
        """src, src_mask: (B, S) → memory (B, S, D)."""
        scale = math.sqrt(self.cfg.d_model)
        x = self.drop(self.src_embed(src) * scale + self.positions[: src.shape[1]])  # (B, S, D)
        bias = padding_bias(src_mask)
        for layer in self.encoder:
            x = layer(x, bias)
        return self.enc_norm(x)

    def decode(self, tokens: Tensor, memory: Tensor, src_mask: Tensor) -> tuple[Tensor, Tensor]:
        """tokens (B, T) → logits (B, T, V), cross-attention (B, layers, heads, T, S)."""
        scale = math.sqrt(self.cfg.d_model)
        x = self.drop(self.tgt_embed(tokens) * scale + self.positions[: tokens.shape[1]])  # (B, T, D)
        causal, src_bias = causal_bias(tokens.shape[1], x), padding_bias(src_mask)
        cross = []
        for layer in self.decoder:
            x, probs = layer(x, memory, causal, src_bias)
            cross.append(probs)
        return self.generator(self.dec_norm(x)), torch.stack(cross, dim=1)

    def step(self, tokens: Tensor, memory: Tensor, src_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Prefix (B, T) → logits of its last position (B, V), cross-attention (B, layers, heads, S)."""
        logits, cross = self.decode(tokens, memory, src_mask)
        return logits[:, -1], cross[:, :, :, -1]

    @property
    def decoder_layers(self) -> list[DecoderLayer]:
        return [cast(DecoderLayer, layer) for layer in self.decoder]

    def encode_kv(self, src: Tensor, src_mask: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """src, src_mask (B, S) → memory (B, S, D) and each decoder layer's cross-attention keys and
        values (B, heads, S, dh), computed once per source instead of at every step."""
        memory = self.encode(src, src_mask)
        pairs = [layer.cross_attn.keys_values(memory) for layer in self.decoder_layers]
        return memory, [k for k, _ in pairs], [v for _, v in pairs]

    def step_kv(
        self, tokens: Tensor, positions: Tensor, past_keys: list[Tensor], past_values: list[Tensor],
        past_mask: Tensor, cross_keys: list[Tensor], cross_values: list[Tensor], src_mask: Tensor,
    ) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor]:  # fmt: skip
        """One decoder step over a self-attention KV cache, one cache tensor per layer.

        tokens, positions (B,): each row's newest token and its position (0 for BOS);
        past_keys/values: per layer (B, heads, P, dh), with past_mask (B, P) — rows may hold
        different numbers of past positions, the masked ones are ignored; cross_keys/values: per
        layer (B, heads, S, dh) from :meth:`encode_kv`, src_mask (B, S) →
        logits (B, V), present keys/values per layer (B, heads, P + 1, dh), cross-attention
        (B, layers, heads, S) of this step. Equals :meth:`step` on the whole prefix.
        """
        scale = math.sqrt(self.cfg.d_model)
        x = (self.tgt_embed(tokens) * scale + self.positions[positions])[:, None]  # (B, 1, D)
        now = torch.ones_like(tokens, dtype=torch.bool)[:, None]  # (B, 1): the new position
        self_bias, src_bias = padding_bias(torch.cat([past_mask, now], dim=1)), padding_bias(src_mask)
        keys, values, cross = [], [], []
        for i, layer in enumerate(self.decoder_layers):
            x, k, v, probs = layer.step(
                x, (past_keys[i], past_values[i]), self_bias, (cross_keys[i], cross_values[i]), src_bias
            )
            keys.append(k)
            values.append(v)
            cross.append(probs[:, :, 0])  # (B, heads, S)
        logits = self.generator(self.dec_norm(x))[:, 0]
        return logits, keys, values, torch.stack(cross, dim=1)

    def forward(self, src: Tensor, src_mask: Tensor, tgt_in: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher forcing → logits (B, T, V), last layer's head-mean cross-attention (B, T, S)."""
        logits, cross = self.decode(tgt_in, self.encode(src, src_mask), src_mask)
        return logits, cross[:, -1].mean(1)
