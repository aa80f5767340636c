"""Admission by predicted wait: a model refuses a request at once (``Overloaded``: 503 +
Retry-After, RESOURCE_EXHAUSTED) when the work it already holds would not drain before the request's
timeout, instead of queueing it to be cut off there (504, DEADLINE_EXCEEDED).

Why: a queue bounded by a count of requests lets in whatever those requests cost. Under sustained
overload with heavy requests (64 texts × beam 8 on the 2-core reference machine, 10 s timeout,
350 clients) the queue held more work than the timeout allows: 831 requests waited 10 s for a
504, each holding rows of the running batch until it was cut off, the answers that did come took
p50 9.7 s, and the model answered 5.4 requests/s against 8.0 with 8 clients. Servers that keep a
deadline under load shed by time rather than by count (Triton's queue policy rejects a request
that waited past its timeout; gRPC and Envoy shed on queueing delay); here the delay is predicted
before any work is spent on the request.

The prediction, per model: ``(work held + this request's) ÷ drain rate``, against 0.8 × the
request timeout (``HORIZON_SHARE``).

* **Work** is counted in the model's own units (``cost``): a text's own positions
  (``beam × (source length + target limit)``) on the continuous scheduler, a text or an image on
  the batcher. Held from admission until the request is answered, fails or is cancelled.
* **Drain rate**: units answered per second *while the model is saturated* — while it holds more
  than one batch (``capacity``: the token budget, the batch size), so some work waits. Light load
  says nothing about capacity (a lone request runs at a fraction of a full batch's rate) and no
  prediction is needed there. The rate is the total answered over the last ``memory_s`` (10 s)
  the model spent saturated, however long ago: requests that finish in waves (a batch of beams
  that end together) average out, and a burst after a quiet spell is judged by the rate of the
  last one. Until the model has been saturated for ``sample_s`` since it was loaded there is no
  prediction and only the count bound (``max_queued_requests``) applies: a new replica's first
  burst is admitted by count.

**Late shedding.** When the work held would not drain within the timeout — a first burst once the
rate is learned from it, or a rate that fell (another process took the cores) — the newest
requests whose deadlines the work ahead of them would pass are shed at once with the same
refusal (the caller's task is cancelled and the cancellation turned into ``Overloaded``), until
the newest would make it: they were never going to be answered, and their rows go to those that
will.

The oldest request (the one being computed) is never shed late, and a stream is not shed once
admitted (``shed`` None: its caller also waits outside the computation, writing what it has).

**Never stuck.** A request that finds nothing waiting (at most a batch held) is always admitted,
whatever the rate: a rate learned in a slow spell would otherwise refuse a lone request bigger
than a batch for ever, since refusals keep the model idle and the rate is measured only while it
is saturated. Cancelled and failed work is not counted as answered: when deadlines cut requests
off, the rate falls and the model sheds more, which is the direction that ends the cutting off;
a model saturated for the horizon without answering anything (it stopped answering: whatever
waits would miss its deadline) refuses whatever would wait (:meth:`Admission._drain_s`). One
request that takes longer than the rate's memory does not count as that.

Plain Python and asyncio on the caller's event loop (one per model), unit-tested with a fake clock
(``tests/service/inference/test_admission.py``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from service.errors import Overloaded

#: the share of the request timeout that a request's predicted wait may reach
HORIZON_SHARE = 0.8


@dataclass(eq=False)
class Held:
    """A request's work while the model holds it: its cost, its deadline (perf_counter time) and
    what sheds it once it can no longer be answered in time (None: it is not shed once admitted)."""

    cost: float
    deadline: float
    shed: Callable[[Overloaded], None] | None


class Holding:
    """A request's place in its model's admission while it is computed (:meth:`Admission.holding`):
    a context manager, one object per request (a generator-based one, with its closure and
    partial, was ≈ 2 % of the event loop's time per request on the image path)."""

    __slots__ = ("admission", "answered", "cancelling", "cost", "held", "shed", "sheddable", "task")

    def __init__(self, admission: Admission, cost: float, sheddable: bool) -> None:
        self.admission, self.cost, self.sheddable = admission, cost, sheddable
        self.answered = False
        self.shed: Overloaded | None = None  # set when the admission shed it

    def __enter__(self) -> Holding:
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.cancelling = task.cancelling()  # cancellations already asked for (asyncio.timeout's rule)
        self.held = self.admission.admit(self.cost, self._shed if self.sheddable else None)
        return self

    def _shed(self, error: Overloaded) -> None:
        self.shed = error
        self.task.cancel()

    def computed(self) -> None:
        """The work is answered: its units go back now (a stream's client may read on for long
        after; holding them meanwhile made the model look saturated while it answered nothing)."""
        self.answered = True
        self.admission.release(self.held, True)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.admission.release(self.held, self.answered)  # nothing if given back already
        cancelled = kind is not None and issubclass(kind, asyncio.CancelledError)
        # shed, and nothing else cancelled it: the cancellation becomes the refusal
        if cancelled and self.shed is not None and self.task.uncancel() <= self.cancelling:
            raise self.shed from None


class Admission:
    def __init__(
        self,
        model: str,
        capacity: float,
        timeout_s: float,
        *,
        clock: Callable[[], float] = time.perf_counter,
        sample_s: float = 0.5,
        memory_s: float = 10.0,
    ) -> None:
        """``capacity``: the units one batch holds (beyond it, work waits: the model is
        saturated); ``timeout_s``: the request timeout — a request is refused when the wait it
        would have exceeds :data:`HORIZON_SHARE` of it (a margin for the rate's noise: under
        overload a shorter queue costs no throughput, and an answer near the timeout is one dip
        of the rate away from a 504); the rate is measured over slots of at least ``sample_s``
        saturated seconds, the last ``memory_s`` of them."""
        if capacity <= 0 or timeout_s <= 0:
            raise ValueError(f"capacity and timeout_s must be > 0, got {capacity}, {timeout_s}")
        if memory_s < sample_s:
            raise ValueError(f"memory_s must be ≥ sample_s, got {memory_s} < {sample_s}")
        self.model, self.capacity, self.timeout_s = model, capacity, timeout_s
        self.horizon_s = HORIZON_SHARE * timeout_s
        self.clock, self.sample_s, self.memory_s = clock, sample_s, memory_s
        self.held = 0.0  # units admitted and not yet answered, failed, cancelled or shed
        self._holders: dict[Held, None] = {}  # in admission order
        self._last = clock()  # the last event: saturated time is counted between events
        self._slot_s = 0.0  # saturated seconds and units answered in the slot being filled
        self._slot_done = 0.0
        self._slots: deque[tuple[float, float]] = deque()  # (saturated s, units answered)
        self._memory_s = self._memory_done = 0.0  # the slots' sums
        self._unanswered_s = 0.0  # saturated seconds since the last answer
        self.shed = 0  # requests refused or shed by the prediction
        self.answered = 0.0  # units answered

    # -- what the worker calls -------------------------------------------------------------------

    def admit(self, cost: float, shed: Callable[[Overloaded], None] | None) -> Held:
        """Take ``cost`` units, or raise :class:`Overloaded` when they would not drain in time.
        ``shed(error)`` is called (on this thread) if the request is shed later: the rate fell,
        or was learned only after the request came (a new replica's first burst), and the work
        ahead of it would no longer drain before its deadline. Without it, the request is not
        shed once admitted (a stream, whose caller also waits outside its computation: writing
        what it has)."""
        self.check(cost)
        held = Held(cost, self.clock() + self.timeout_s, shed)
        self._holders[held] = None
        self.held += cost
        return held

    def holding(self, cost: float, sheddable: bool = True) -> Holding:
        """``cost`` held while the calling task computes it (``with admission.holding(cost) as
        holding:``): refused at once when the model would not get to it in time and, when
        ``sheddable``, shed later — this task cancelled, the cancellation turned into the
        :class:`Overloaded` — when the work ahead of it would no longer drain before its deadline;
        only for a caller whose every wait meanwhile is inside this block. The caller calls
        :meth:`Holding.computed` once answered (its units then count towards the rate); else it
        failed, was cancelled or its client left."""
        return Holding(self, cost, sheddable)

    def check(self, cost: float) -> None:
        """Raise :class:`Overloaded` when ``cost`` more units would not drain in time (a lower
        bound of a request's cost refuses it before its preprocessing is spent on it). Never
        while nothing waits (the model holds at most a batch): a request then starts at once,
        whatever the rate says — and a rate learned in a slow spell is measured again."""
        self._tick()
        if not self.saturated:
            return
        wait = self.predicted_s(cost)
        if wait is not None and wait > self.horizon_s:
            self.shed += 1
            why = (
                f"the work it holds would take {wait:.1f} s to drain"
                if math.isfinite(wait)
                else f"it answered nothing in its last {self._unanswered_s:.0f} s of work"
            )
            raise self._overloaded(why, wait)

    def release(self, held: Held, answered: bool) -> None:
        """Give ``held`` back: answered (its units count towards the rate), or failed or cancelled
        (they do not). Nothing for a request already shed."""
        if held not in self._holders:  # shed already
            return
        del self._holders[held]
        if answered and self.saturated:  # answered while work waited: the model's full rate
            self._slot_done += held.cost  # (in the slot this event may close)
        self._tick()
        if answered:
            self.answered += held.cost
            self._unanswered_s = 0.0
        self.held = max(0.0, self.held - held.cost)
        self._shed_late()

    # -- the estimate ----------------------------------------------------------------------------

    @property
    def rate(self) -> float | None:
        """Units answered per saturated second over the last ``memory_s`` saturated seconds;
        None before ``sample_s`` of them."""
        seconds, done = self._memory_s, self._memory_done
        return done / seconds if seconds >= self.sample_s and done > 0 else None

    def predicted_s(self, cost: float) -> float | None:
        """How long the work held plus ``cost`` would take to drain (inf for a stalled model);
        None without a rate."""
        return self._drain_s(self.held + cost, self._unanswered_s)

    @property
    def wait_s(self) -> float:
        """The time the work held would take to drain at the learned rate: what a request would
        wait now — 0 while nothing waits or before a rate is learned, inf when the model has
        answered nothing for the horizon. Reads the clock, changes nothing (the gauge's)."""
        if not self.saturated:
            return 0.0
        unanswered = self._unanswered_s + (self.clock() - self._last)  # saturated since the last event
        wait = self._drain_s(self.held, unanswered)
        return 0.0 if wait is None else wait

    def _drain_s(self, units: float, unanswered_s: float) -> float | None:
        """How long ``units`` would take to drain: inf once the model has been saturated for the
        horizon (``HORIZON_SHARE`` × the timeout) without answering anything — it stopped
        answering, and whatever waits now would miss its deadline (late shedding needs a rate
        above 0 and does not act); None without a rate."""
        if unanswered_s >= self.horizon_s:
            return math.inf
        rate = self.rate
        return None if rate is None else units / rate

    @property
    def saturated(self) -> bool:
        return self.held > self.capacity

    def _tick(self) -> None:
        """Count the saturated time since the last event; close the slot once it is long enough."""
        now = self.clock()
        if self.saturated:
            self._slot_s += now - self._last
            self._unanswered_s += now - self._last
        self._last = now
        if self._slot_s >= self.sample_s:
            self._slots.append((self._slot_s, self._slot_done))
            self._memory_s += self._slot_s
            self._memory_done += self._slot_done
            self._slot_s = self._slot_done = 0.0
            while self._memory_s - self._slots[0][0] >= self.memory_s:  # the oldest is not needed
                seconds, done = self._slots.popleft()
                self._memory_s -= seconds
                self._memory_done -= done

    def _shed_late(self) -> None:
        """When the work held would not drain within the timeout (only after the rate fell, or
        was learned after a burst was admitted): shed the newest requests, whose deadlines the
        work ahead of them would pass, until the newest would make it. The batch in progress
        (``capacity``) is counted as done already: a request is shed only when it would be late
        even so."""
        rate = self.rate
        if rate is None or self.held / rate <= self.timeout_s:  # the common case: one division
            return
        now = self.clock()
        ahead = self.held - self.capacity  # the work before each request's end, newest first
        late: list[tuple[Held, Callable[[Overloaded], None], float]] = []
        oldest = next(iter(self._holders), None)  # the head is being computed: never shed
        for held in reversed(self._holders):
            wait = ahead / rate
            if held is oldest or now + wait <= held.deadline:
                break
            if held.shed is not None:
                late.append((held, held.shed, wait))
            ahead -= held.cost  # its work is behind the older ones
        for held, shed, wait in late:
            del self._holders[held]
            self.held -= held.cost
            self.shed += 1
            why = f"the work ahead of this request would take {wait:.1f} s more to drain, past its deadline"
            shed(self._overloaded(why, wait))

    def _overloaded(self, why: str, wait_s: float) -> Overloaded:
        """The refusal, with a Retry-After of when the excess will have drained (at least 1 s,
        at most the horizon)."""
        error = Overloaded(
            f"model {self.model!r} is overloaded: {why}, with the request timeout at "
            f"{self.timeout_s:g} s; retry later"
        )
        excess = wait_s - self.horizon_s if math.isfinite(wait_s) else self.horizon_s  # stalled
        error.retry_after_s = min(max(1, math.ceil(excess)), math.ceil(self.horizon_s))
        return error
