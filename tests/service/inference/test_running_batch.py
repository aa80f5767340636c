"""The rows a translation model decodes together, stepped by hand (no scheduler, no thread): the
budget they hold (rows × the widest source and target limit: rows are padded to the widest), retired rows kept until they are a quarter of the batch, callers that leave.
The decoder is table_decoder's stand-in, whose steps check that each row's cache holds exactly
its own past; that every text decodes as it would alone is test_scheduler's."""

from __future__ import annotations

import numpy as np

from service.inference.callers import Request
from service.inference.decoding import Options
from service.inference.running_batch import RETIRED_SHARE, RunningBatch, Text
from tests.service.inference.table_decoder import BOS, EOS, TableDecoder


def request(texts: int) -> Request:
    req = Request(None, None, 0.0, [None] * texts)  # type: ignore[arg-type]  # no caller loop here
    req.remaining = req.pending_first = texts
    return req


def admit(batch: RunningBatch, texts: list[Text]) -> list[Text]:
    """What the scheduler's admission does before a join: the texts' budget is held."""
    for text in texts:
        batch.holding.add(text)
    return texts


def step(batch: RunningBatch, decoder: TableDecoder, now: float = 0.0) -> list[Request]:
    tokens, positions = batch.feed()
    logp, attention, state = decoder.step(batch.state, tokens, positions, None)
    advanced = batch.advance(logp, attention, now)
    batch.keep(state, advanced, len(tokens))
    return advanced.finished


def test_finished_rows_stay_until_they_are_a_quarter_of_the_batch() -> None:
    """One short text among four long ones finishes first: its row keeps being stepped (1 of 5
    rows, under a quarter) while its budget is given back at once; the second text to finish
    makes retired rows 2 of 5, and both go in one copy."""
    decoder, batch = TableDecoder(), RunningBatch()
    greedy = Options(BOS, EOS, max_len=20)
    short = request(1)
    long = request(4)
    texts = admit(
        batch,
        [*Text.of(short, [[5, 6]], greedy), *Text.of(long, [[7] * 9, [8] * 10, [9] * 11, [3] * 12], greedy)],
    )
    costs = [t.cost for t in texts]
    assert costs == [1 * (2 + 20), 29, 30, 31, 32]
    batch.join(texts, decoder.encode, now=0.0)
    finished: list[Request] = []
    rows_seen: list[tuple[int, int, int]] = []  # (rows in the state, texts decoding, budget held)
    while not batch.empty and len(decoder.rows_per_call) < 40:
        finished += step(batch, decoder)
        rows_seen.append(
            (len(batch.state.src_mask) if batch.state is not None else 0, batch.rows, batch.in_flight)
        )
    assert finished == [short, long] and short.remaining == long.remaining == 0
    assert batch.in_flight == 0 and batch.state is None
    retired_kept = [(state, live, held) for state, live, held in rows_seen if state > live]
    assert retired_kept, "the short text's row left at once"
    assert all((state - live) * RETIRED_SHARE < state for state, live, _ in retired_kept)
    assert batch.holding.positions == 0
    # its row stepped on, its budget already back: 4 rows × (the longest source + 20)
    assert (5, 4, 4 * (12 + 20)) in retired_kept
    # 5 rows stepped until a second text is done (2 retired of 5: both go), then one copy per
    # retirement (1 of 3, 1 of 2: each a quarter or more)
    assert set(decoder.rows_per_call[:-3]) == {5} and decoder.rows_per_call[-3:] == [3, 2, 1]


def test_callers_that_leave_give_their_budget_back() -> None:
    """A text whose caller left before it joined is not encoded; one that leaves while decoding
    loses its rows at the next drop, with its budget — the rows of the others stay theirs (the
    stand-in decoder checks every row's cache against its own past)."""
    decoder, batch = TableDecoder(), RunningBatch()
    greedy, beams = Options(BOS, EOS, max_len=20), Options(BOS, EOS, max_len=20, beam_size=3)
    gone, leaving, staying = request(1), request(2), request(1)
    gone.cancelled = True
    texts = admit(
        batch,
        [
            *Text.of(gone, [[4, 5]], greedy),
            *Text.of(leaving, [[6] * 8, [7] * 6], beams),
            *Text.of(staying, [[8] * 9], greedy),
        ],
    )
    batch.join(texts, decoder.encode, now=0.0)
    assert [t.request for t in batch.texts] == [leaving, leaving, staying]
    # every row padded to the longest source, 9 (and past: to the longest target limit, 20)
    assert batch.in_flight == (3 + 3 + 1) * (9 + 20)
    for _ in range(3):
        step(batch, decoder)
    assert batch.rows == 3 + 3 + 1
    leaving.cancelled = True
    batch.drop_cancelled()
    assert [t.request for t in batch.texts] == [staying] and batch.in_flight == 9 + 20
    assert len(batch.state.src_mask) == 1
    while not batch.empty:
        step(batch, decoder)
    assert staying.remaining == 0 and batch.in_flight == 0
    assert np.all(np.array(decoder.rows_per_call[3:]) == 1)


def test_a_text_keeps_only_its_own_attention() -> None:
    """Each step's attention is one array for every row of the batch, as wide as its widest
    source: a text that kept views of it (its row, its source's columns) kept every step's whole
    array alive — here, beside a stream of wide short texts, about 20 times its own."""
    decoder, batch = TableDecoder(), RunningBatch()
    greedy, beams = Options(BOS, EOS, max_len=60), Options(BOS, EOS, max_len=60, beam_size=2)
    long = request(2)
    batch.join(
        admit(batch, Text.of(long, [[9] * 30], greedy) + Text.of(long, [[8] * 30], beams)),
        decoder.encode,
        0.0,
    )
    for _ in range(25):
        batch.join(
            admit(batch, Text.of(request(1), [[5] * 200], Options(BOS, EOS, max_len=2))), decoder.encode, 0.0
        )
        step(batch, decoder)
    searches = [t.search for t in batch.texts if t.request is long]
    kept = [a for s in searches for a in getattr(s, "attention", [])]
    kept += [a for s in searches for rows in getattr(s, "history", []) for a in rows]
    assert kept and all(a.base is None or a.base.nbytes <= 2 * a.nbytes for a in kept)
