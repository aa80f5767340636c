"""Transformer encoder-decoder (Vaswani et al. 2017), pre-norm, with explicit attention.

Attention is written out (``softmax(QKᵀ/√d + mask) V``) instead of using SDPA or the fused
``nn.MultiheadAttention`` fast path, so the probabilities are a real tensor we can return and the
ONNX graph carries them as named outputs.

Exported stages: ``encode(src, src_mask) → memory`` and ``step(tokens, memory, src_mask) →
(logits of the last position, cross-attention of the last position for every layer and head)``.
The step takes the whole prefix and recomputes it: target sequences here are short, and a graph
without a KV cache keeps beam search in the service a matter of reordering token rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
        q = self._split(self.q(x))  # (B, heads, T, dh)
        k, v = (self._split(t) for t in self.kv(context).chunk(2, dim=-1))  # (B, heads, S, dh)
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

    def forward(self, src: Tensor, src_mask: Tensor, tgt_in: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher forcing → logits (B, T, V), last layer's head-mean cross-attention (B, T, S)."""
        logits, cross = self.decode(tgt_in, self.encode(src, src_mask), src_mask)
        return logits, cross[:, -1].mean(1)
