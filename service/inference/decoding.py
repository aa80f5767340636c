"""Greedy and beam-search decoding over a decoder-step function, in plain numpy.

The step function hides the graph: it takes the rows to advance (indices into the encoded batch),
their token prefixes and per-row decoder state, and returns log-probabilities and attention for
the next position. The same loops serve the RNN contract (state carried between steps) and the
Transformer contract (prefix recomputed). Nothing here knows about ONNX Runtime or Ray, so it is
unit-tested on its own and reused by ``export/`` to evaluate the exported graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

#: (rows (N,), prefixes (N, T), states (N, ...) or None, step t) →
#: (log-probs (N, V), attention (N, ...), new states or None)
StepFn = Callable[
    [np.ndarray, np.ndarray, np.ndarray | None, int], tuple[np.ndarray, np.ndarray, np.ndarray | None]
]


@dataclass
class Hypothesis:
    tokens: list[int]  # generated ids, without BOS, without EOS
    score: float  # sum of token log-probabilities (EOS included when reached)
    attention: np.ndarray  # (len(tokens) [+1 for EOS], ...) one attention entry per generated step
    finished: bool


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def greedy(
    step: StepFn, batch: int, bos: int, eos: int, max_len: int, init_state: np.ndarray | None
) -> list[Hypothesis]:
    """Advance every unfinished row one argmax token at a time, dropping rows as they emit EOS."""
    rows = np.arange(batch)
    prefixes = np.full((batch, 1), bos, dtype=np.int64)
    states = init_state
    tokens: list[list[int]] = [[] for _ in range(batch)]
    attn: list[list[np.ndarray]] = [[] for _ in range(batch)]
    scores = np.zeros(batch)
    finished = np.zeros(batch, dtype=bool)
    for t in range(max_len):
        logp, attention, states = step(rows, prefixes, states, t)
        best = logp.argmax(axis=-1)
        for i, row in enumerate(rows):
            scores[row] += logp[i, best[i]]
            attn[row].append(attention[i])
            if best[i] == eos:
                finished[row] = True
            else:
                tokens[row].append(int(best[i]))
        keep = best != eos
        rows, prefixes = rows[keep], np.concatenate([prefixes, best[:, None]], axis=1)[keep]
        states = None if states is None else states[keep]
        if rows.size == 0:
            break
    return [
        Hypothesis(tokens[b], float(scores[b]), np.stack(attn[b]), bool(finished[b])) for b in range(batch)
    ]


def length_normalised(score: float, length: int, alpha: float) -> float:
    """GNMT length penalty (Wu et al. 2016): score / ((5 + |y|) / 6) ** alpha."""
    return score / (((5 + length) / 6) ** alpha) if alpha else score


def beam_search(
    step: StepFn,
    batch: int,
    bos: int,
    eos: int,
    max_len: int,
    init_state: np.ndarray | None,
    beam_size: int,
    length_penalty: float = 0.0,
) -> list[Hypothesis]:
    """Batched beam search: all live beams of all inputs advance in one step call.

    Each input keeps ``beam_size`` live hypotheses; a hypothesis that emits EOS moves to that
    input's finished list. An input stops when it has ``beam_size`` finished hypotheses and none
    of its live ones can still beat the best finished one (with no length penalty scores only
    fall, so that is exact; with a penalty it is the usual heuristic).
    """
    if beam_size == 1:
        return greedy(step, batch, bos, eos, max_len, init_state)
    # live beams: parallel arrays over (input, beam) rows
    rows = np.arange(batch)
    prefixes = np.full((batch, 1), bos, dtype=np.int64)
    states = init_state
    scores = np.zeros(batch)
    attn: list[list[np.ndarray]] = [[] for _ in range(batch)]
    done: list[list[Hypothesis]] = [[] for _ in range(batch)]
    for t in range(max_len):
        logp, attention, new_states = step(rows, prefixes, states, t)
        cand = scores[:, None] + logp  # (N, V)
        next_rows, next_prefix, next_scores, next_src, next_attn = [], [], [], [], []
        for b in np.unique(rows):
            idx = np.flatnonzero(rows == b)
            flat = cand[idx].ravel()
            order = np.argsort(-flat, kind="stable")[: 2 * beam_size]
            kept = 0
            for rank, k in enumerate(order):
                src, tok = idx[k // cand.shape[1]], int(k % cand.shape[1])
                hist = [*attn[src], attention[src]]
                if tok == eos:
                    # like fairseq: an EOS only finalises if it ranks among the top beam_size
                    if rank < beam_size and len(done[b]) < beam_size:
                        done[b].append(
                            Hypothesis(prefixes[src, 1:].tolist(), float(flat[k]), np.stack(hist), True)
                        )
                    continue
                if kept < beam_size:
                    next_rows.append(b)
                    next_prefix.append(np.append(prefixes[src], tok))
                    next_scores.append(flat[k])
                    next_src.append(src)
                    next_attn.append(hist)
                    kept += 1
        live = [
            i
            for i, b in enumerate(next_rows)
            if not _settled(done[b], next_scores[i], len(next_prefix[i]) - 1, beam_size, length_penalty)
        ]
        if not live:
            rows = np.empty(0, dtype=np.int64)
            break
        rows = np.array([next_rows[i] for i in live])
        prefixes = np.stack([next_prefix[i] for i in live])
        scores = np.array([next_scores[i] for i in live])
        src_index = np.array([next_src[i] for i in live])
        states = None if new_states is None else new_states[src_index]
        attn = [next_attn[i] for i in live]
    # inputs that ran out of length keep their best live beams as unfinished hypotheses
    for i, b in enumerate(rows):
        done[b].append(Hypothesis(prefixes[i, 1:].tolist(), float(scores[i]), np.stack(attn[i]), False))
    return [
        max(done[b], key=lambda h: length_normalised(h.score, len(h.tokens) + h.finished, length_penalty))
        for b in range(batch)
    ]


def _settled(done: list[Hypothesis], live_score: float, live_len: int, beam: int, alpha: float) -> bool:
    if len(done) < beam:
        return False
    best = max(length_normalised(h.score, len(h.tokens) + 1, alpha) for h in done)
    return length_normalised(live_score, live_len + 1, alpha) <= best
