"""RNN encoder-decoder with attention (Bahdanau et al. 2015; Luong et al. 2015).

Read top to bottom: the bidirectional encoder, the attention scorers, the two decoder cells
(Bahdanau's and Luong's), and the full model with its export stages ``encode`` and ``step``.

Scorers, chosen by ``RNNConfig.attention``:

* ``additive`` — Bahdanau: ``v·tanh(W_q s_{t-1} + W_k h_s)``, queried with the *previous* state.
* ``dot`` / ``general`` / ``concat`` — Luong global: ``h_t·h_s``, ``h_t·W_a h_s``,
  ``v·tanh(W_a [h_t; h_s])``, queried with the *current* state.
* ``local-m`` / ``local-p`` — Luong local: ``general`` scores restricted to a window of half-width
  ``D`` around an aligned position ``p_t`` (``t`` for local-m; ``(S-1)·sigmoid(v·tanh(W_p h_t))``
  for local-p, weighted by a Gaussian with ``σ = D/2``). Luong multiply the Gaussian *after* the
  softmax and leave the weights unnormalised; we add its log *before* the softmax, which is the
  same up to renormalisation, so every attention row stays a distribution.

Bidirectional ``nn.GRU`` makes the ONNX exporter pin the source length, so the backward direction
is a second one-way GRU run over each row reversed within its own length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

SCORERS = ("additive", "dot", "general", "concat", "local-m", "local-p")
NEG_INF = -1e9  # finite: a fully masked row must not turn into NaN


@dataclass
class RNNConfig:
    src_vocab: int
    tgt_vocab: int
    attention: str = "additive"  # one of SCORERS
    emb_dim: int = 64  # token embedding size (source and target)
    enc_hidden: int = 96  # per direction; encoder outputs are 2 * enc_hidden wide
    window: int = 4  # D, the half-width of the local-m / local-p window
    dropout: float = 0.1

    def __post_init__(self) -> None:
        # local-p's Gaussian has sigma = D / 2: 0 made every weight NaN, silently (local-m's D = 0
        # is a hard monotonic alignment, p_t = t)
        least = {"local-m": 0, "local-p": 1}.get(self.attention)
        if least is not None and self.window < least:
            why = f"{self.attention}'s half-width D must be at least {least}"
            raise ValueError(f"window: {why}, got {self.window}")

    @property
    def mem_dim(self) -> int:
        return 2 * self.enc_hidden

    @property
    def dec_hidden(self) -> int:
        return self.mem_dim  # equal widths make Luong's ``dot`` score well defined

    @property
    def state_size(self) -> int:
        # Luong's input feeding carries the attentional vector h~ alongside h.
        return self.dec_hidden if self.attention == "additive" else 2 * self.dec_hidden


def reverse_within_length(x: Tensor, lengths: Tensor) -> Tensor:
    """Reverse each row's first ``lengths[b]`` steps, leave its padding in place. x: (B, S, D)."""
    steps = torch.arange(x.shape[1], device=x.device).unsqueeze(0)  # (1, S)
    last = (lengths - 1).unsqueeze(1)  # (B, 1)
    index = torch.where(steps <= last, last - steps, steps)  # (B, S)
    # expand from the index, not ``expand_as(x)``: x may be a GRU output whose length the exporter
    # records as a constant, which would pin the source length in the graph.
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class BiGRUEncoder(nn.Module):
    def __init__(self, cfg: RNNConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.src_vocab, cfg.emb_dim, padding_idx=0)
        self.fwd = nn.GRU(cfg.emb_dim, cfg.enc_hidden, batch_first=True)
        self.bwd = nn.GRU(cfg.emb_dim, cfg.enc_hidden, batch_first=True)
        self.bridge = nn.Linear(cfg.mem_dim, cfg.dec_hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, src: Tensor, src_mask: Tensor) -> tuple[Tensor, Tensor]:
        """src: (B, S) ids, src_mask: (B, S) True on real tokens → memory (B, S, 2H), h0 (B, Hd)."""
        lengths = src_mask.long().sum(1)  # (B,)
        emb = self.drop(self.embed(src))  # (B, S, E)
        out_f, _ = self.fwd(emb)  # (B, S, H)
        out_b, _ = self.bwd(reverse_within_length(emb, lengths))  # (B, S, H), reversed time
        out_b = reverse_within_length(out_b, lengths)  # back to source order
        memory = torch.cat([out_f, out_b], dim=-1) * src_mask.unsqueeze(-1)  # (B, S, 2H)
        last_f = torch.gather(out_f, 1, (lengths - 1).view(-1, 1, 1).expand(-1, 1, out_f.shape[-1]))
        summary = torch.cat([last_f.squeeze(1), out_b[:, 0]], dim=-1)  # (B, 2H)
        return memory, torch.tanh(self.bridge(summary))


class Scorer(nn.Module):
    """Attention energies e[b, s] for a query (B, Hd) against memory (B, S, 2H)."""

    def __init__(self, cfg: RNNConfig) -> None:
        super().__init__()
        self.kind = cfg.attention
        self.window = cfg.window
        q, k = cfg.dec_hidden, cfg.mem_dim
        if self.kind in ("additive", "concat"):
            self.w_q = nn.Linear(q, q, bias=False)
            self.w_k = nn.Linear(k, q)
            self.v = nn.Linear(q, 1, bias=False)
        elif self.kind != "dot":  # general, local-m, local-p
            self.w_a = nn.Linear(k, q, bias=False)
        if self.kind == "local-p":
            self.w_p = nn.Linear(q, q)
            self.v_p = nn.Linear(q, 1, bias=False)

    def forward(self, query: Tensor, memory: Tensor, src_mask: Tensor, step: Tensor) -> Tensor:
        if self.kind in ("additive", "concat"):  # v·tanh(W [q; k]) = v·tanh(W_q q + W_k k)
            energy = self.v(torch.tanh(self.w_q(query).unsqueeze(1) + self.w_k(memory))).squeeze(-1)
        elif self.kind == "dot":
            energy = torch.einsum("bh,bsh->bs", query, memory)  # (B, S)
        else:
            energy = torch.einsum("bh,bsh->bs", query, self.w_a(memory))  # (B, S)
        energy = energy.masked_fill(~src_mask, NEG_INF)
        if self.kind.startswith("local"):
            energy = energy + self._window_bias(query, src_mask, step)
        return energy

    def _window_bias(self, query: Tensor, src_mask: Tensor, step: Tensor) -> Tensor:
        """Log-weights of the local window: -inf outside |s - p_t| <= D, Gaussian log inside."""
        last = (src_mask.long().sum(1) - 1).to(query.dtype)  # (B,) index of the final token
        if self.kind == "local-m":
            p = torch.minimum(step.to(query.dtype), last)  # monotonic: p_t = t
        else:
            p = last * torch.sigmoid(self.v_p(torch.tanh(self.w_p(query)))).squeeze(-1)  # (B,)
        pos = torch.arange(src_mask.shape[1], device=query.device, dtype=query.dtype)  # (S,)
        dist = pos.unsqueeze(0) - p.unsqueeze(1)  # (B, S)
        bias = torch.zeros_like(dist).masked_fill(dist.abs() > self.window, NEG_INF)
        if self.kind == "local-p":
            sigma = self.window / 2
            bias = bias - dist**2 / (2 * sigma**2)
        return bias


def attend(energy: Tensor, memory: Tensor) -> tuple[Tensor, Tensor]:
    """Explicit softmax over source positions → (context (B, 2H), weights (B, S))."""
    weights = torch.softmax(energy, dim=-1)  # (B, S)
    context = torch.einsum("bs,bsh->bh", weights, memory)  # (B, 2H)
    return context, weights


class BahdanauCell(nn.Module):
    """s_t = GRU([y_{t-1}; c_t], s_{t-1}) with c_t attended from s_{t-1} (Bahdanau 2015, §3.1)."""

    def __init__(self, cfg: RNNConfig) -> None:
        super().__init__()
        self.scorer = Scorer(cfg)
        self.gru = nn.GRUCell(cfg.emb_dim + cfg.mem_dim, cfg.dec_hidden)
        self.out = nn.Linear(cfg.dec_hidden + cfg.mem_dim + cfg.emb_dim, cfg.dec_hidden)

    def forward(self, emb: Tensor, state: Tensor, memory: Tensor, src_mask: Tensor, step: Tensor):
        context, weights = attend(self.scorer(state, memory, src_mask, step), memory)
        h = self.gru(torch.cat([emb, context], dim=-1), state)  # (B, Hd)
        feat = torch.tanh(self.out(torch.cat([h, context, emb], dim=-1)))  # (B, Hd)
        return feat, h, weights


class LuongCell(nn.Module):
    """h_t = GRU([y_{t-1}; h~_{t-1}], h_{t-1}); h~_t = tanh(W_c [c_t; h_t]) (Luong 2015, §3)."""

    def __init__(self, cfg: RNNConfig) -> None:
        super().__init__()
        self.hidden = cfg.dec_hidden
        self.scorer = Scorer(cfg)
        self.gru = nn.GRUCell(cfg.emb_dim + cfg.dec_hidden, cfg.dec_hidden)
        self.w_c = nn.Linear(cfg.mem_dim + cfg.dec_hidden, cfg.dec_hidden, bias=False)

    def forward(self, emb: Tensor, state: Tensor, memory: Tensor, src_mask: Tensor, step: Tensor):
        h_prev, feed = state[:, : self.hidden], state[:, self.hidden :]  # (B, Hd) each
        h = self.gru(torch.cat([emb, feed], dim=-1), h_prev)
        context, weights = attend(self.scorer(h, memory, src_mask, step), memory)
        h_tilde = torch.tanh(self.w_c(torch.cat([context, h], dim=-1)))  # (B, Hd)
        return h_tilde, torch.cat([h, h_tilde], dim=-1), weights


class RNNSeq2Seq(nn.Module):
    """The full model. ``encode`` and ``step`` are the two exported graphs; ``forward`` is the
    teacher-forced training pass built from them."""

    def __init__(self, cfg: RNNConfig) -> None:
        super().__init__()
        if cfg.attention not in SCORERS:
            raise ValueError(f"attention must be one of {SCORERS}, got {cfg.attention!r}")
        self.cfg = cfg
        self.encoder = BiGRUEncoder(cfg)
        self.tgt_embed = nn.Embedding(cfg.tgt_vocab, cfg.emb_dim, padding_idx=0)
        self.cell = BahdanauCell(cfg) if cfg.attention == "additive" else LuongCell(cfg)
        self.generator = nn.Linear(cfg.dec_hidden, cfg.tgt_vocab)
        self.drop = nn.Dropout(cfg.dropout)

    def encode(self, src: Tensor, src_mask: Tensor) -> tuple[Tensor, Tensor]:
        """→ memory (B, S, 2H), initial decoder state (B, state_size)."""
        memory, h0 = self.encoder(src, src_mask)
        if self.cfg.attention != "additive":
            h0 = torch.cat([h0, torch.zeros_like(h0)], dim=-1)  # h~_0 = 0
        return memory, h0

    def step(
        self, prev_tokens: Tensor, state: Tensor, memory: Tensor, src_mask: Tensor, step: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One decoder step → logits (B, V), new state (B, state_size), attention (B, S)."""
        emb = self.drop(self.tgt_embed(prev_tokens))  # (B, E)
        feat, new_state, weights = self.cell(emb, state, memory, src_mask, step)
        return self.generator(self.drop(feat)), new_state, weights

    def forward(self, src: Tensor, src_mask: Tensor, tgt_in: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher forcing: tgt_in (B, T) starts with BOS → logits (B, T, V), attention (B, T, S)."""
        memory, state = self.encode(src, src_mask)
        logits, attn = [], []
        for t in range(tgt_in.shape[1]):
            step = torch.full_like(tgt_in[:, t], t)
            out, state, weights = self.step(tgt_in[:, t], state, memory, src_mask, step)
            logits.append(out)
            attn.append(weights)
        return torch.stack(logits, 1), torch.stack(attn, 1)
