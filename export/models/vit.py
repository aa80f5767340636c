"""Vision Transformer (Dosovitskiy et al. 2021), pre-norm, with explicit attention.

``forward_features`` returns the CLS embedding and every layer's attention probabilities;
``forward_head`` maps the embedding to logits. The exported graph returns both
``logits`` (B, classes) and ``attentions`` (B, layers, heads, T, T) with T = 1 + patches, so the
service can compute attention rollout (Abnar & Zuidema 2020) without a second pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class ViTConfig:
    image_size: int = 48  # square input side, pixels
    patch_size: int = 8  # square patch side; image_size must divide by it
    channels: int = 1
    num_classes: int = 10
    dim: int = 64  # residual width
    depth: int = 4  # transformer blocks
    heads: int = 4
    mlp_dim: int = 128
    dropout: float = 0.0
    #: 0 = the plain linear patch embedding; > 0 = the paper's hybrid variant (§3.1): a small
    #: convolutional stem with this many channels, then patches of its feature map
    stem_channels: int = 0

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.heads, self.d_head = cfg.heads, cfg.dim // cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, t, d = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.heads, self.d_head).permute(2, 0, 3, 1, 4)  # (3, B, h, T, dh)
        q, k, v = qkv[0], qkv[1], qkv[2]
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.d_head), dim=-1)  # (B, h, T, T)
        out = (probs @ v).transpose(1, 2).reshape(b, t, d)  # (B, T, D)
        return self.proj(out), probs


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.mlp_dim), nn.GELU(), nn.Linear(cfg.mlp_dim, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out, probs = self.attn(self.norm1(x))
        x = x + self.drop(out)
        return x + self.drop(self.mlp(self.norm2(x))), probs


class PatchEmbed(nn.Module):
    """Image → one token per ``patch_size`` square, row-major: (B, C, H, W) → (B, P, D).

    With ``stem_channels`` the tokens come from a two-layer convolutional stem (stride 2) and
    half-size patches of its map, so each token is centred on one input patch — the attention
    grid stays aligned with the image; its 3×3 convolutions let a token see a pixel or two of the
    neighbouring patches — and early layers get local features, which
    makes small ViTs train much faster on small data (Xiao et al. 2021, "Early convolutions
    help transformers see better").
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        if cfg.stem_channels:
            if cfg.patch_size % 2:
                raise ValueError("a convolutional stem needs an even patch_size")
            c = cfg.stem_channels
            self.proj: nn.Module = nn.Sequential(
                nn.Conv2d(cfg.channels, c, 3, padding=1), nn.GELU(),
                nn.Conv2d(c, c, 3, stride=2, padding=1), nn.GELU(),
                nn.Conv2d(c, cfg.dim, cfg.patch_size // 2, stride=cfg.patch_size // 2),
            )  # fmt: skip
        else:
            self.proj = nn.Conv2d(cfg.channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)  # (B, D, h, w) → (B, P, D)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + cfg.num_patches, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)

    def forward_features(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """pixels (B, C, H, W) → CLS embedding (B, D), attentions (B, layers, heads, T, T)."""
        x = self.patch_embed(pixels)  # (B, P, D), row-major patches
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, T, D)
        attentions = []
        for block in self.blocks:
            x, probs = block(x)
            attentions.append(probs)
        return self.norm(x)[:, 0], torch.stack(attentions, dim=1)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(features)  # (B, classes)

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        features, attentions = self.forward_features(pixels)
        return self.forward_head(features), attentions
