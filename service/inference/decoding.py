"""Greedy and beam-search decoding, one search object per input, in plain numpy.

A search owns its input's live hypotheses — one row for greedy, up to ``beam_size`` for beam
search — and is advanced with the log-probabilities and attention the decoder step gave those
rows. ``advance`` says which rows live on (their parents among the search's rows, so the caller
can reorder any per-row decoder state) and with which tokens. Searches never see each other: a
static batch (:func:`beam_search`) and the per-model scheduler (``service/inference/scheduler.py``),
which admits and retires inputs at every step, drive the same objects, so a text decodes to the
same tokens whichever way it was batched.

Nothing here knows about ONNX Runtime or Ray, so it is unit-tested on its own and reused by
``export/`` to evaluate the exported graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class TopCandidates:
    """Each row's ``k`` most likely next tokens, best first (ties: the lower id first, as
    ``argmax``/a stable sort of the full row give): log-probabilities (N, k) and ids (N, k)."""

    logp: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.logp)

    def __getitem__(self, rows: slice) -> TopCandidates:
        return TopCandidates(self.logp[rows], self.ids[rows])


#: a step's scores: every row's log-probabilities (N, V), or only its best candidates
Scores = np.ndarray | TopCandidates


def candidates_for(beam_size: int) -> int:
    """How many best candidates per row a search needs of a step: greedy 1, a beam of b 2b."""
    return 1 if beam_size == 1 else 2 * beam_size


def best_tokens(logp: Scores) -> tuple[np.ndarray, np.ndarray]:
    """Every row's best token and its log-probability, (N,) each, in one call (ties: the lower id)."""
    if isinstance(logp, TopCandidates):
        return logp.ids[:, 0], logp.logp[:, 0]
    best = logp.argmax(axis=1)
    return best, logp[np.arange(len(logp)), best]


#: (rows (N,), prefixes (N, T), states or None, step t) →
#: (log-probs (N, V), attention (N, ...), new states or None); states are indexed by row arrays
StepFn = Callable[[np.ndarray, np.ndarray, Any, int], tuple[Scores, np.ndarray, Any]]


@dataclass
class Hypothesis:
    tokens: list[int]  # generated ids, without BOS, without EOS
    score: float  # sum of token log-probabilities (EOS included when reached)
    attention: np.ndarray  # (len(tokens) [+1 for EOS], ...) one attention entry per generated step
    finished: bool


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """In float32 at least (an fp16 graph's logits too)."""
    logits = logits.astype(np.promote_types(logits.dtype, np.float32), copy=False)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class Search(Protocol):
    done: bool
    #: steps taken: the position of the token each live row feeds next (0 = BOS)
    steps: int

    @property
    def prefixes(self) -> np.ndarray:
        """(rows, steps + 1) the live rows' prefixes, BOS first."""
        ...

    @property
    def rows(self) -> int: ...

    def feed(self) -> list[int]:
        """The token each live row feeds next."""
        ...

    def advance(self, logp: Scores, attention: np.ndarray) -> np.ndarray: ...

    def result(self) -> Hypothesis: ...


_NONE, _FIRST = np.empty(0, dtype=np.int64), np.zeros(1, dtype=np.int64)


class GreedySearch:
    """One row: the argmax token at every step, until EOS or ``max_len`` tokens."""

    def __init__(self, bos: int, eos: int, max_len: int, source_length: int | None = None) -> None:
        self.eos, self.max_len, self.source = eos, max_len, slice(source_length)
        self.tokens = [bos]  # BOS, then the generated ids
        self.steps, self.score, self.done, self.finished = 0, 0.0, False, False
        self.attention: list[np.ndarray] = []

    @property
    def prefixes(self) -> np.ndarray:
        return np.array([self.tokens], dtype=np.int64)

    @property
    def rows(self) -> int:
        return 0 if self.done else 1

    def feed(self) -> list[int]:
        return self.tokens[-1:]

    def advance(self, logp: Scores, attention: np.ndarray) -> np.ndarray:
        """logp (1, V) or its best candidate, attention (1, ...) of this step → the parent of the
        next row ([0] or [])."""
        best, value = best_tokens(logp[:1])
        return self.choose(int(best[0]), float(value[0]), attention[0])

    def choose(self, best: int, logp: float, attention: np.ndarray) -> np.ndarray:
        """``advance`` with the row's argmax token and its log-probability already known (a caller
        stepping many greedy rows takes every row's argmax in one call); ``attention`` (...)."""
        self.score += logp
        # a copy: a view would keep the whole step's attention of every row alive
        self.attention.append(attention[..., self.source].copy())
        self.steps += 1
        if best == self.eos:
            self.done = self.finished = True
        else:
            self.tokens.append(best)
            self.done = self.steps >= self.max_len
        return _NONE if self.done else _FIRST

    def result(self) -> Hypothesis:
        return Hypothesis(self.tokens[1:], float(self.score), np.stack(self.attention), self.finished)


class BeamSearch:
    """``beam_size`` live hypotheses; one that emits EOS moves to the finished list, which keeps
    the ``beam_size`` best (length-normalised; a better one replaces the worst, as Hugging Face's
    ``BeamHypotheses`` does). The search stops when that list is full and none of its live ones
    can still beat the best finished one (with no length penalty scores only fall, so that is
    exact; with a penalty it is the usual heuristic), or after ``max_len`` steps."""

    def __init__(
        self, bos: int, eos: int, max_len: int, beam_size: int, length_penalty: float,
        source_length: int | None = None,
    ) -> None:  # fmt: skip
        self.eos, self.max_len, self.beam, self.alpha = eos, max_len, beam_size, length_penalty
        self.source = slice(source_length)
        self._prefixes = np.array([[bos]], dtype=np.int64)
        self.scores = np.zeros(1)
        self.history: list[list[np.ndarray]] = [[]]  # per live row: its attention per step
        self.finals: list[Hypothesis] = []
        self.steps, self.done = 0, False

    @property
    def prefixes(self) -> np.ndarray:
        return self._prefixes

    @property
    def rows(self) -> int:
        return 0 if self.done else len(self._prefixes)

    def feed(self) -> list[int]:
        return [] if self.done else self._prefixes[:, -1].tolist()

    def advance(self, logp: Scores, attention: np.ndarray) -> np.ndarray:
        """logp (rows, V) or each row's best ≥ 2 × beam candidates, attention (rows, ...) → the
        parents (indices into this step's rows) of the rows that live on, in order."""
        attention = attention[..., self.source].copy()  # its own rows: not a view of the whole step's
        parents: list[int] = []
        tokens: list[int] = []
        scores: list[float] = []
        history: list[list[np.ndarray]] = []
        for rank, (src, tok, score) in enumerate(self._best(logp)):
            hist = [*self.history[src], attention[src]]
            if tok == self.eos:
                # like fairseq: an EOS only finalises if it ranks among the top beam_size
                if rank < self.beam:
                    self._finish(Hypothesis(self._prefixes[src, 1:].tolist(), score, np.stack(hist), True))
                continue
            if len(parents) < self.beam:
                parents.append(src)
                tokens.append(tok)
                scores.append(score)
                history.append(hist)
        self.steps += 1
        live = [i for i in range(len(parents)) if not self._settled(scores[i], self.steps)]
        parent = np.array([parents[i] for i in live], dtype=np.int64)
        self._prefixes = np.concatenate(
            [self._prefixes[parent], np.array([[tokens[i]] for i in live], dtype=np.int64).reshape(-1, 1)],
            axis=1,
        )
        self.scores = np.array([scores[i] for i in live])
        self.history = [history[i] for i in live]
        if not live:
            self.done = True
        elif self.steps >= self.max_len:  # out of length: the live beams end unfinished
            for i in range(len(live)):
                hyp = Hypothesis(
                    self._prefixes[i, 1:].tolist(), float(self.scores[i]), np.stack(self.history[i]), False
                )
                self.finals.append(hyp)
            self.done = True
        return np.empty(0, dtype=np.int64) if self.done else parent

    def _best(self, logp: Scores) -> list[tuple[int, int, float]]:
        """The 2 × beam best (row, token, score) continuations, best first; equal scores in row,
        then token order (the order of a stable sort of the whole (rows, V) matrix)."""
        if isinstance(logp, TopCandidates):  # every row's best 2 × beam hold the overall best 2 × beam
            cand = self.scores[:, None] + logp.logp
            rows = np.broadcast_to(np.arange(len(cand))[:, None], cand.shape).ravel()
            ids, flat = logp.ids.ravel(), cand.ravel()
            order = np.lexsort((ids, rows, -flat))[: 2 * self.beam]
            return [(int(rows[k]), int(ids[k]), float(flat[k])) for k in order]
        cand = self.scores[:, None] + logp  # (rows, V)
        flat = cand.ravel()
        order = np.argsort(-flat, kind="stable")[: 2 * self.beam]
        width = cand.shape[1]
        return [(int(k // width), int(k % width), float(flat[k])) for k in order]

    def _finish(self, hyp: Hypothesis) -> None:
        """Keep a finished hypothesis among the ``beam_size`` best. The live beams that go on once
        the list is full are those that can still beat its best: one that then ends was dropped,
        and the search answered a worse hypothesis (or, with a length penalty, ran on to
        ``max_len`` and answered one cut off there)."""
        if len(self.finals) < self.beam:
            self.finals.append(hyp)
            return
        normalised = [length_normalised(h.score, len(h.tokens) + 1, self.alpha) for h in self.finals]
        worst = int(np.argmin(normalised))
        if length_normalised(hyp.score, len(hyp.tokens) + 1, self.alpha) > normalised[worst]:
            self.finals[worst] = hyp

    def _settled(self, live_score: float, live_len: int) -> bool:
        if len(self.finals) < self.beam:
            return False
        best = max(length_normalised(h.score, len(h.tokens) + 1, self.alpha) for h in self.finals)
        return length_normalised(live_score, live_len + 1, self.alpha) <= best

    def result(self) -> Hypothesis:
        return max(
            self.finals, key=lambda h: length_normalised(h.score, len(h.tokens) + h.finished, self.alpha)
        )


@dataclass(frozen=True)
class Options:
    """A request's search: what :func:`new_search` takes for each of its texts."""

    bos: int
    eos: int
    max_len: int  # target tokens, already capped by the model's limit
    beam_size: int = 1
    length_penalty: float = 0.0


def new_search(
    bos: int, eos: int, max_len: int, beam_size: int = 1, length_penalty: float = 0.0,
    source_length: int | None = None,
) -> Search:  # fmt: skip
    """A search for one input; ``source_length`` cuts each step's attention to that input's own
    source positions (its batch may be padded wider, and the width changes as rows come and go)."""
    if beam_size == 1:
        return GreedySearch(bos, eos, max_len, source_length)
    return BeamSearch(bos, eos, max_len, beam_size, length_penalty, source_length)


def length_normalised(score: float, length: int, alpha: float) -> float:
    """GNMT length penalty (Wu et al. 2016): score / ((5 + |y|) / 6) ** alpha."""
    return score / (((5 + length) / 6) ** alpha) if alpha else score


def run_searches(step: StepFn, searches: list[Search], init_state: Any) -> list[Hypothesis]:
    """A static batch: every live row of every search advances in one step call per position, rows
    of the same search side by side; ``init_state`` has one row per search and is indexed by row
    arrays (an array, or any object with ``__getitem__``)."""
    owners = np.arange(len(searches))  # row → its search (the encoded input it reads)
    states, t = init_state, 0
    while owners.size:
        ids = list(dict.fromkeys(owners.tolist()))
        live = [searches[b] for b in ids]
        prefixes = np.concatenate([s.prefixes for s in live])
        logp, attention, new_states = step(owners, prefixes, states, t)
        parents, next_owners, offset = [], [], 0
        for b, search in zip(ids, live, strict=True):
            n = search.rows
            kept = search.advance(logp[offset : offset + n], attention[offset : offset + n])
            parents.append(kept + offset)
            next_owners.append(np.full(len(kept), b, dtype=np.int64))
            offset += n
        index = np.concatenate(parents)
        owners = np.concatenate(next_owners)
        states = None if new_states is None or not index.size else keep_rows(new_states, index, len(prefixes))
        t += 1
    return [s.result() for s in searches]


def keep_rows(state: Any, index: np.ndarray, rows: int) -> Any:
    """``state`` (``rows`` rows, indexed by row arrays) reduced to the rows ``index`` names, in
    that order — ``state`` itself when that keeps every row in place: a greedy step that retires
    nobody copies no decoder state (a cache's copy is a step's own cost again)."""
    if len(index) == rows and bool((index == np.arange(rows)).all()):
        return state
    return state[index]


def greedy(step: StepFn, batch: int, bos: int, eos: int, max_len: int, init_state: Any) -> list[Hypothesis]:
    """Advance every unfinished row one argmax token at a time, dropping rows as they emit EOS."""
    return run_searches(step, [GreedySearch(bos, eos, max_len) for _ in range(batch)], init_state)


def beam_search(
    step: StepFn,
    batch: int,
    bos: int,
    eos: int,
    max_len: int,
    init_state: Any,
    beam_size: int,
    length_penalty: float = 0.0,
) -> list[Hypothesis]:
    """Batched beam search: all live beams of all inputs advance in one step call."""
    searches = [new_search(bos, eos, max_len, beam_size, length_penalty) for _ in range(batch)]
    return run_searches(step, searches, init_state)
