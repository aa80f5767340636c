"""Greedy and beam search on a step function whose best answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from service.inference.decoding import BeamSearch, GreedySearch, TopCandidates, beam_search, greedy

BOS, EOS, A, B = 1, 2, 3, 4
V = 5


def table_step(table: dict[tuple[int, ...], dict[int, float]]):  # type: ignore[no-untyped-def]
    """Next-token probabilities looked up by the prefix (BOS excluded); attention = one-hot of t."""

    def step(rows, prefixes, states, t):  # type: ignore[no-untyped-def]
        logp = np.full((len(rows), V), -1e9)
        for i, prefix in enumerate(prefixes):
            for tok, p in table.get(tuple(prefix[1:].tolist()), {EOS: 1.0}).items():
                logp[i, tok] = np.log(p)
        attention = np.zeros((len(rows), 3))
        attention[:, min(t, 2)] = 1.0
        return logp, attention, None if states is None else states + 1

    return step


# Greedy takes A (0.6) then is stuck with 0.5 * 0.5; B (0.4) then EOS (1.0) scores 0.4 > 0.3.
TRAP = {(): {A: 0.6, B: 0.4}, (A,): {A: 0.5, EOS: 0.5}, (A, A): {EOS: 1.0}, (B,): {EOS: 1.0}}


def test_greedy_follows_the_argmax() -> None:
    [hyp] = greedy(table_step(TRAP), 1, BOS, EOS, 10, None)
    assert hyp.tokens == [A]  # the tie between A and EOS goes to the lower id
    assert hyp.finished
    assert hyp.attention.shape == (len(hyp.tokens) + 1, 3)


def test_beam_search_finds_the_better_sequence() -> None:
    [hyp] = beam_search(table_step(TRAP), 1, BOS, EOS, 10, None, beam_size=2)
    assert hyp.tokens == [B]
    np.testing.assert_allclose(hyp.score, np.log(0.4))
    np.testing.assert_array_equal(hyp.attention, [[1, 0, 0], [0, 1, 0]])


def test_beam_of_one_is_greedy_and_batches_are_independent() -> None:
    step = table_step(TRAP)
    g = greedy(step, 3, BOS, EOS, 10, np.zeros((3, 1)))
    b = beam_search(step, 3, BOS, EOS, 10, np.zeros((3, 1)), beam_size=1)
    assert [h.tokens for h in g] == [h.tokens for h in b]
    assert len({tuple(h.tokens) for h in beam_search(step, 3, BOS, EOS, 10, None, beam_size=3)}) == 1


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_a_beam_that_ends_after_the_finished_list_filled_up_is_kept_when_better(alpha: float) -> None:
    """Beam 2. After two steps the finished list is full: [] (-0.5) and [A] (-0.3); the live
    [A, C] (-0.2) can still beat them and goes on, then ends at -0.22. It was dropped because the
    list was full: the search answered [A] without a length penalty, and with one ran on to
    max_len and answered [A, C, C, …] cut off there."""
    c = 0  # a fifth token
    table = {
        (): {A: np.exp(-0.1), EOS: np.exp(-0.5), B: np.exp(-0.6)},
        (A,): {c: np.exp(-0.1), EOS: np.exp(-0.2)},
    }
    table[(A, c)] = {EOS: np.exp(-0.02), c: np.exp(-0.03)}
    for n in range(2, 10):
        table[(A,) + (c,) * n] = {c: np.exp(-0.03), EOS: np.exp(-0.5)}
    [hyp] = beam_search(table_step(table), 1, BOS, EOS, 8, None, beam_size=2, length_penalty=alpha)
    assert hyp.tokens == [A, c] and hyp.finished
    np.testing.assert_allclose(hyp.score, -0.22)


def test_max_length_stops_unfinished_hypotheses() -> None:
    forever = {(): {A: 1.0}}
    step = table_step({**forever, **{(A,) * n: {A: 1.0} for n in range(1, 20)}})
    [hyp] = greedy(step, 1, BOS, EOS, 4, None)
    assert hyp.tokens == [A] * 4 and not hyp.finished
    [beam] = beam_search(step, 1, BOS, EOS, 4, None, beam_size=2)
    assert beam.tokens == [A] * 4 and not beam.finished


def test_searches_given_only_each_rows_best_candidates_decide_as_with_every_score() -> None:
    """What a resident (GPU) step returns — each row's best 2 × beam log-probabilities and ids —
    gives the same continuations as the whole (rows, V) matrix, ties included."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        rows, vocab, beam = int(rng.integers(1, 5)), 9, int(rng.integers(2, 4))
        logp = np.round(rng.standard_normal((rows, vocab)), 1)  # rounding makes ties common
        order = np.argsort(-logp, axis=1, kind="stable")[:, : 2 * beam]
        top = TopCandidates(np.take_along_axis(logp, order, 1), order)
        attention = rng.random((rows, 3))
        dense, sparse = (BeamSearch(BOS, EOS, 6, beam, 0.5) for _ in range(2))
        for search in (dense, sparse):  # the same live rows to start from
            search._prefixes = np.array([[BOS, A + r % 2] for r in range(rows)])
            search.scores = np.arange(rows) * -0.1
            search.history = [[] for _ in range(rows)]
        parents = dense.advance(logp, attention), sparse.advance(top, attention)
        assert np.array_equal(*parents), trial
        assert np.array_equal(dense.prefixes, sparse.prefixes) and np.allclose(dense.scores, sparse.scores)
        assert [h.tokens for h in dense.finals] == [h.tokens for h in sparse.finals]
        greedy_dense, greedy_sparse = GreedySearch(BOS, EOS, 6), GreedySearch(BOS, EOS, 6)
        greedy_dense.advance(logp[:1], attention[:1])
        greedy_sparse.advance(top[:1], attention[:1])
        assert greedy_dense.tokens == greedy_sparse.tokens and greedy_dense.score == greedy_sparse.score
