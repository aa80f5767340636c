"""The rows one translation model decodes together: which text owns which rows, each text's search,
the model's batch state (encoder outputs and KV cache, ``RowBatch``), and the budget they hold.

``TranslationScheduler`` (``service/inference/scheduler.py``) decides who joins and when; this
module does what a step does to the rows: texts join (one encoder call, the batch state
concatenated), every row is fed its next token, each text's search advances on the step's
scores (``service/inference/decoding.py``), beams reorder their rows, finished texts retire.

**Retired rows.** A finished text's rows stay in the batch until retired rows are
1/``RETIRED_SHARE`` of it, or newcomers join, or a caller leaves: taking rows out copies every
row's cache and encoder outputs, which cost more than stepping a few extra rows (one copy per
retirement was a fifth of the stepping thread's time under open-loop load on the demo model).

Plain numpy, changed on the scheduler's stepping thread only (``rows`` and ``in_flight`` are
read from others, for metrics and admission under the scheduler's lock).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.inference.callers import Request, StepToken
from service.inference.decoding import (
    GreedySearch,
    Options,
    Scores,
    Search,
    best_tokens,
    keep_rows,
    new_search,
)

#: retired rows are taken out once they are 1/RETIRED_SHARE of the batch
RETIRED_SHARE = 4


@dataclass(eq=False)
class Text:
    """One text of a request: its source ids, its search, and its own cost, ``beam × (source
    length + its target limit)`` (the work the model's admission counts; the budget the batch
    holds pads it to the widest, :class:`HeldBudget`)."""

    request: Request
    index: int
    ids: list[int]
    options: Options
    cost: int
    search: Search = field(init=False)

    @classmethod
    def of(cls, request: Request, ids: list[list[int]], options: Options) -> list[Text]:
        """The texts of ``request``, one per row of source ids."""
        return [cls(request, i, row, options, text_cost(row, options)) for i, row in enumerate(ids)]


def text_cost(ids: list[int], options: Options) -> int:
    """The positions of the token budget a text of source ``ids`` holds while it decodes: the
    most rows × positions it can ever need."""
    return options.beam_size * (len(ids) + options.max_len)


class HeldBudget:
    """The texts admitted and not yet done, and the budget they hold: the rows × positions their
    batch state can take. Every row is padded to the widest — a past to the longest past
    (``KVCache.concat``), a source to the longest source (``RowBatch.concat``) — so that is
    ``rows × (longest source + longest target limit)``, not the sum of each text's own: a long
    text at step 100 makes every short row beside it hold 100 positions too."""

    def __init__(self) -> None:
        self.texts: set[Text] = set()
        self.rows = self.source = self.target = 0
        self.positions = 0  # read from other threads (metrics, admission)

    def with_(self, text: Text, shape: tuple[int, int, int] | None = None) -> tuple[int, int, int]:
        """(rows, longest source, longest target limit) of ``shape`` (default: these texts) with
        ``text`` added."""
        rows, source, target = shape or (self.rows, self.source, self.target)
        o = text.options
        return rows + o.beam_size, max(source, len(text.ids)), max(target, o.max_len)

    def add(self, text: Text) -> None:
        self.texts.add(text)
        self._set(self.with_(text))

    def remove(self, text: Text) -> None:
        self.texts.discard(text)
        shape = (0, 0, 0)
        for t in self.texts:
            shape = self.with_(t, shape)
        self._set(shape)

    def clear(self) -> None:
        self.texts.clear()
        self._set((0, 0, 0))

    def _set(self, shape: tuple[int, int, int]) -> None:
        self.rows, self.source, self.target = shape
        self.positions = positions(shape)


def positions(shape: tuple[int, int, int]) -> int:
    """The budget a batch of this (rows, longest source, longest target limit) can take."""
    rows, source, target = shape
    return rows * (source + target)


@dataclass(eq=False)
class _Retired:
    """The rows of a text that is done, left in the batch until the next compaction: stepped with
    the others, their outputs ignored."""

    rows: int


@dataclass
class Advanced:
    """What one step did to the callers: requests whose last text finished, requests whose greedy
    texts chose tokens (now in ``request.held``); and what :meth:`RunningBatch.keep` makes of the
    batch: its entries after the step, and which rows of the step's state they own."""

    finished: list[Request]
    streaming: set[Request]
    entries: list[Text | _Retired]
    index: np.ndarray


class RunningBatch:
    def __init__(self) -> None:
        #: in row order: each text owns search.rows consecutive rows, each _Retired its rows
        self.entries: list[Text | _Retired] = []
        self.state: Any = None  # the model's batch state (a RowBatch), one row per row above
        self.holding = HeldBudget()  # texts admitted and not yet done, and the budget they hold
        self._retired = 0  # rows of _Retired entries

    @property
    def empty(self) -> bool:
        return not self.entries

    @property
    def texts(self) -> list[Text]:
        """The texts still decoding."""
        return [t for t in self.entries if isinstance(t, Text)]

    @property
    def in_flight(self) -> int:
        """The budget held by texts admitted and not yet done (:class:`HeldBudget`)."""
        return self.holding.positions

    @property
    def rows(self) -> int:
        """Rows of texts still decoding (not counting retired rows awaiting compaction)."""
        return sum(t.search.rows for t in self.entries if isinstance(t, Text))

    def clear(self) -> None:
        """Every row goes (the step failed: their requests were given the error)."""
        self.entries, self.state = [], None
        self.holding.clear()
        self._retired = 0

    def join(self, admitted: list[Text], encode: Any, now: float) -> None:
        """Add the admitted texts (already in ``holding``) whose callers are still there: one
        ``encode`` call for all of them, their rows after the running ones."""
        joining: list[Text] = []
        for text in admitted:
            if text.request.cancelled:  # its caller left since admission
                self.holding.remove(text)
            else:
                joining.append(text)
        if not joining:
            return
        if self._retired:  # the join copies every row anyway: compact first
            self.compact()
        for text in joining:
            o = text.options
            text.search = new_search(o.bos, o.eos, o.max_len, o.beam_size, o.length_penalty, len(text.ids))
            if text.request.admitted is None:
                text.request.admitted = now
        fresh = encode([t.ids for t in joining])
        self.state = fresh if self.state is None else type(fresh).concat([self.state, fresh])
        self.entries.extend(joining)

    def feed(self) -> tuple[np.ndarray, np.ndarray]:
        """Every row's next input token and position (retired rows: 0 at 0) → (tokens, positions)."""
        fed = [
            (token, t.search.steps) if isinstance(t, Text) else (0, 0)
            for t in self.entries
            for token in (t.search.feed() if isinstance(t, Text) else range(t.rows))
        ]
        tokens, positions = np.ascontiguousarray(np.array(fed, dtype=np.int64).reshape(-1, 2).T)
        return tokens, positions

    def advance(self, logp: Scores, attention: np.ndarray, done_at: float) -> Advanced:
        """Each text's search takes the step's scores (greedy rows all at once, beams by their own
        rows); finished texts retire and give back their budget, a request whose last text is done
        is finished. The batch itself changes only in :meth:`keep` (until then a failure fails
        every text that stepped, finished or not)."""
        best_ids, best_logp = best_tokens(logp)  # every greedy row's choice, in one call
        best, values = best_ids.tolist(), best_logp.tolist()
        index: list[np.ndarray] = []
        still: list[Text | _Retired] = []
        finished: list[Request] = []
        streaming: set[Request] = set()
        offset = 0
        for entry in self.entries:
            if isinstance(entry, _Retired):  # kept as they are
                index.append(np.arange(offset, offset + entry.rows))
                still.append(entry)
                offset += entry.rows
                continue
            search, request, n = entry.search, entry.request, entry.search.rows
            first = search.steps == 0
            if isinstance(search, GreedySearch):
                kept = search.choose(best[offset], values[offset], attention[offset])
                if request.on_tokens is not None:
                    token = StepToken(entry.index, best[offset], values[offset], attention[offset])
                    request.held.append(token)
                    streaming.add(request)
            else:
                kept = search.advance(logp[offset : offset + n], attention[offset : offset + n])
            offset += n
            if first:
                request.pending_first -= 1
                if request.pending_first == 0:
                    request.first_token = done_at
            if search.done:
                request.searches[entry.index] = search  # its hypothesis is built on the caller's loop
                request.remaining -= 1
                self.holding.remove(entry)
                if request.remaining == 0:
                    finished.append(request)
                index.append(np.arange(offset - n, offset))  # its rows stay until compaction
                still.append(_Retired(n))
                self._retired += n
            else:
                index.append(kept + (offset - n))
                still.append(entry)
        stepped = offset - sum(t.rows for t in self.entries if isinstance(t, _Retired))
        for request in {t.request for t in self.entries if isinstance(t, Text)}:
            request.steps += 1
            request.rows_seen += stepped
        return Advanced(finished, streaming, still, np.concatenate(index))

    def keep(self, state: Any, step: Advanced, rows: int) -> None:
        """The step's entries, and its new state (``rows`` rows, as stepped) reduced to the rows
        they own, in their order (beams reordered, finished hypotheses dropped); retired rows go
        once they are 1/RETIRED_SHARE of the rows stepped."""
        self.entries = step.entries
        self.state = keep_rows(state, step.index, rows)
        if self._retired and self._retired * RETIRED_SHARE >= rows:
            self.compact()

    def drop_cancelled(self) -> None:
        """Take the rows of requests whose caller left out of the batch (and retired rows with
        them: it is a copy of every row either way)."""
        if any(isinstance(t, Text) and t.request.cancelled for t in self.entries):
            self.compact()

    def compact(self) -> None:
        """Keep only the rows of texts still decoding (one copy of the batch's state); the texts
        of requests whose caller left go too, and give back their budget.

        A caller leaves on its own event loop at any moment (``release``), so each text's
        ``cancelled`` is read once here: the rows kept, the texts kept and the budget returned
        must agree even when a caller leaves during the compaction."""
        keep: list[np.ndarray] = []
        entries: list[Text | _Retired] = []
        offset = 0
        for entry in self.entries:
            n = entry.rows if isinstance(entry, _Retired) else entry.search.rows
            if isinstance(entry, Text):
                if entry.request.cancelled:
                    self.holding.remove(entry)
                else:
                    keep.append(np.arange(offset, offset + n))
                    entries.append(entry)
            offset += n
        self.entries = entries
        self.state = self.state[np.concatenate(keep)] if entries else None
        self._retired = 0
