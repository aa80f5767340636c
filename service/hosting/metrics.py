"""Service metrics, recorded through Ray Serve's metrics API so every replica's series are exported.
Descriptions must be ASCII: Ray encodes them so, and a replica whose metric fails to register
loads no model.

Ray's metrics agent serves them in Prometheus format on the metrics export port
(``Settings.metrics_port``, default 8080), prefixed ``ray_`` — beside Ray Serve's own
``ray_serve_*`` series. Names carry their unit; labels are a small fixed set:

====================================================  ===========  ==========================
series (as scraped)                                   type         labels
====================================================  ===========  ==========================
ray_attention_requests_total                          counter      model, route, status
ray_attention_request_duration_seconds                histogram    model, route
ray_attention_queue_wait_seconds                      histogram    model
ray_attention_compute_seconds                         histogram    model
ray_attention_batch_size                              histogram    model
ray_attention_batched_total                           counter      model
ray_attention_tokens_generated_total                  counter      model
ray_attention_time_to_first_token_seconds             histogram    model
ray_attention_time_per_output_token_seconds           histogram    model
ray_attention_decoder_steps_total                     counter      model
ray_attention_rows_in_flight                          gauge        model
ray_attention_tokens_in_flight                        gauge        model
ray_attention_predicted_wait_seconds                  gauge        model
ray_attention_model_info                              gauge (=1)   model, version, task, family, provider
====================================================  ===========  ==========================

The threads that serve (the event loop, a model's decoder-step thread) do not call Ray's metric
API themselves: a record there costs ≈ 5-15 µs in a replica and, at thousands of decoder steps a
second, was ≈ 7 % of a replica's samples. Nor do they queue their updates: with every update
queued (a tuple on a deque drained every half second) the tiny path spent 0.40 ms of server CPU a
request against 0.32 with none (interleaved A/B; which part of the queueing cost it was not
isolated). Each thread keeps running totals of its own instead — a counter's sum, a histogram's
count and sum per bucket, a gauge's last value — updated in place, and one background thread per process
records into Ray what moved since its last look, every ``FLUSH_S``. Nothing is lost: a bucket's
new observations are recorded as that many of their mean, which gives the same bucket counts and
the same ``_sum`` (exact through Ray's OpenCensus export, the default; Ray's OpenTelemetry
export rebuilds ``_sum`` from bucket midpoints whatever was recorded).
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import threading
import time
from typing import Any

from ray.serve import metrics

log = logging.getLogger("ray.serve")

BATCH_BUCKETS = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0]
TOKEN_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5]
FLUSH_S = 0.5
#: the predicted wait of a model that answers nothing (an infinite wait) is exported as an hour
MAX_PREDICTED_WAIT_S = 3600.0

Tags = tuple[tuple[str, str], ...]
Key = tuple[Any, Tags]  # (a Ray metric, its tags)


class _Tally:
    """One thread's running totals, changed by that thread alone and read by the flush thread
    (which also keeps sums of them in tallies of its own: ``add``)."""

    __slots__ = ("buckets", "counts", "gauges", "thread")

    def __init__(self) -> None:
        self.thread = threading.current_thread()
        self.counts: dict[Key, float] = {}
        #: per histogram series: its count per bucket, then the sum of each bucket's observations
        self.buckets: dict[Key, list[float]] = {}
        self.gauges: dict[Key, tuple[int, float]] = {}  # (when it was set, the value)

    def add(self, other: _Tally) -> None:
        """Add ``other``'s totals to these: counts and bucket counts summed, each gauge's latest
        setting kept. ``other`` is read through copies: its thread may be changing it."""
        for key, value in other.counts.copy().items():
            self.counts[key] = self.counts.get(key, 0.0) + value
        for key, set_at in other.gauges.copy().items():
            self.gauges[key] = max(self.gauges.get(key, (0, 0.0)), set_at)
        for key, n in other.buckets.copy().items():
            total = self.buckets.setdefault(key, [0] * len(n))
            for i, count in enumerate(n.copy()):
                total[i] += count


class Deferred:
    """Metric updates made by any thread, recorded into Ray by one daemon thread.

    ``inc``, ``set`` and ``observe`` change the calling thread's own totals (no lock, no queue,
    no object kept per update); ``flush`` records into Ray, per series, what changed since the
    last flush: a counter's increase, a gauge's latest value (one a thread set again counts as
    changed: ``ModelMetrics.refresh`` keeps gauges alive so), and every new histogram
    observation, as the mean of its bucket's new observations — in the same bucket, and with
    the same sum, so a histogram's ``_sum`` is exact where Ray exports the recorded sum (its
    OpenCensus path, ``Settings.ray_open_telemetry`` false). Buckets are Prometheus': a value
    equal to a boundary counts in the bucket that boundary closes (``le``), whichever way Ray
    exports (``_value``)."""

    def __init__(self, flush_s: float = FLUSH_S) -> None:
        self.flush_s = flush_s
        self._local = threading.local()
        self._tallies: list[_Tally] = []
        self._retired = _Tally()  # the totals of threads that ended
        self._lock = threading.Lock()  # registering a tally; one flush at a time
        self._order = itertools.count(1)  # next() is atomic: which thread set a gauge last
        self._bounds: dict[Any, list[float]] = {}  # per histogram: its boundaries, sorted
        self._sent_counts: dict[Key, float] = {}
        self._sent_buckets: dict[Key, list[float]] = {}
        self._sent_gauges: dict[Key, int] = {}
        self._thread: threading.Thread | None = None

    def inc(self, metric: Any, value: float, tags: Tags) -> None:
        counts = self._tally().counts
        key = (metric, tags)
        counts[key] = counts.get(key, 0.0) + value

    def set(self, metric: Any, value: float, tags: Tags) -> None:
        self._tally().gauges[metric, tags] = (next(self._order), value)

    def observe(self, metric: Any, value: float, tags: Tags) -> None:
        buckets = self._tally().buckets
        key = (metric, tags)
        totals = buckets.get(key)  # each bucket's count, then each bucket's sum
        bounds = self._bounds.get(metric)
        if bounds is None:
            bounds = self._bounds[metric] = sorted(float(b) for b in metric.boundaries)
        n = len(bounds) + 1  # buckets: the last above every boundary
        if totals is None:
            totals = buckets[key] = [0] * (2 * n)
        i = bisect.bisect_left(bounds, value)
        totals[i] += 1
        # a value that is no number (NaN, ±inf) would spoil its bucket's sum for good: it counts
        # as the bucket's upper boundary there
        totals[n + i] += value if math.isfinite(value) else self._top(bounds, i)

    @staticmethod
    def _top(bounds: list[float], i: int) -> float:
        """Bucket ``i``'s upper boundary; above the last boundary, the float after it."""
        return bounds[i] if i < len(bounds) else math.nextafter(bounds[-1], math.inf)

    def _value(self, metric: Any, i: int, mean: float) -> float:
        """What records ``metric``'s bucket ``i``: ``mean``, the mean of the observations it got,
        kept strictly between the bucket's boundaries. On a boundary it would land in different
        buckets by Ray's export: OpenCensus (the default) counts a value in the bucket *above* a
        boundary it equals (``value < bound``), OpenTelemetry in the one below (``le``) — every
        batch of 1, 2, 4 … 32 was exported one bucket too high. Strictly inside, both agree (and
        float rounding cannot carry a mean over a boundary); the sum moves by a float's last bit."""
        bounds = self._bounds[metric]
        if i < len(bounds):
            mean = min(mean, math.nextafter(bounds[i], -math.inf))
        return mean if i == 0 else max(mean, math.nextafter(bounds[i - 1], math.inf))

    def _tally(self) -> _Tally:
        try:
            tally: _Tally = self._local.tally
        except AttributeError:
            tally = self._local.tally = _Tally()
            with self._lock:
                self._tallies.append(tally)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="metrics-flush", daemon=True)
                    self._thread.start()
        return tally

    def _run(self) -> None:
        while True:
            time.sleep(self.flush_s)
            try:
                self.flush()
            except Exception:  # a metric that fails must not stop the others
                log.exception("recording metrics failed")

    def flush(self) -> None:
        """Record into Ray what every thread's totals gained since the last flush."""
        with self._lock:
            for ended in [t for t in self._tallies if not t.thread.is_alive()]:
                # folded once into the retired totals: the list of tallies does not grow for
                # ever (a model swapped out leaves its decoder-step thread's behind)
                self._tallies.remove(ended)
                self._retired.add(ended)
            now = _Tally()
            for tally in (self._retired, *self._tallies):
                now.add(tally)
            self._record(now)

    def _record(self, now: _Tally) -> None:
        for key, total in now.counts.items():
            gained = total - self._sent_counts.get(key, 0.0)
            if gained > 0:  # Ray refuses an increment ≤ 0
                metric, tags = key
                metric.inc(gained, tags=dict(tags))
                self._sent_counts[key] = total
        for key, (set_at, value) in now.gauges.items():
            if set_at > self._sent_gauges.get(key, 0):
                metric, tags = key
                metric.set(value, tags=dict(tags))
                self._sent_gauges[key] = set_at
        for key, totals in now.buckets.items():
            sent = self._sent_buckets.get(key, [0] * len(totals))
            metric, tags = key
            labels = dict(tags)  # one per series, not per observation
            n = len(totals) // 2  # buckets: counts, then sums
            for i in range(n):
                count = int(totals[i] - sent[i])
                if count > 0:
                    value = self._value(metric, i, (totals[n + i] - sent[n + i]) / count)
                    for _ in range(count):
                        metric.observe(value, tags=labels)
            self._sent_buckets[key] = totals


#: this process's recorder (a replica's event loop and step threads share it)
DEFERRED = Deferred()


class IngressMetrics:
    def __init__(self, latency_buckets: list[float]) -> None:
        self.requests = metrics.Counter(
            "attention_requests_total", description="Requests answered, by model, route and HTTP status.",
            tag_keys=("model", "route", "status"),  # type: ignore[arg-type]
        )  # fmt: skip
        self.duration = metrics.Histogram(
            "attention_request_duration_seconds", description="Arrival at the ingress to the answer.",
            boundaries=latency_buckets, tag_keys=("model", "route"),  # type: ignore[arg-type]
        )  # fmt: skip

    def refused(self, status: int, seconds: float) -> None:
        """A connection the replica's HTTP listener refused before any route saw a request
        (``GuardedHttp``: a head too long, a client too slow, too many connections): counted, and
        not timed — its time is the client's (a 408 waited out the read timeout, a 431 on an old
        keep-alive connection counted the connection's age), which put ``_unknown`` at ~10 s in
        the latency panels and the p99 alert. ``seconds``: the listener's measure, not recorded."""
        DEFERRED.inc(
            self.requests, 1, (("model", "_unknown"), ("route", "http_connection"), ("status", str(status)))
        )

    def grpc_refused(self) -> None:
        """A gRPC call refused at the replica's limit of calls in progress (``CallLimit``): counted."""
        DEFERRED.inc(self.requests, 1, (("model", "_unknown"), ("route", "grpc_call"), ("status", "503")))

    def record(self, model: str, route: str, status: int, seconds: float) -> None:
        route_tags = (("model", model), ("route", route))
        DEFERRED.inc(self.requests, 1, (*route_tags, ("status", str(status))))
        DEFERRED.observe(self.duration, seconds, route_tags)


class ModelMetrics:
    def __init__(self, model: str, latency_buckets: list[float]) -> None:
        self.tags = {"model": model}
        self.key: Tags = (("model", model),)
        self._in_flight_now = (-1, -1)
        self.queue_wait = metrics.Histogram(
            "attention_queue_wait_seconds", description="Time a request waited in the replica for its batch.",
            boundaries=latency_buckets, tag_keys=("model",),
        )  # fmt: skip
        self.compute = metrics.Histogram(
            "attention_compute_seconds",
            description="Inference time of one formed batch (one decoder step, scheduled translators).",
            boundaries=latency_buckets, tag_keys=("model",),
        )  # fmt: skip
        self.batch_size = metrics.Histogram(
            "attention_batch_size",
            description="Sequences or images per formed batch (decoder rows per step: scheduled).",
            boundaries=BATCH_BUCKETS, tag_keys=("model",),
        )  # fmt: skip
        # the exact mean batch is this counter's rate over the histogram's count's, whichever way
        # Ray exports (its OpenTelemetry export writes the histogram's _sum from bucket midpoints)
        self.batched = metrics.Counter(
            "attention_batched_total",
            description="Sequences or images computed in formed batches (decoder rows: scheduled).",
            tag_keys=("model",),
        )  # fmt: skip
        self.tokens = metrics.Counter(
            "attention_tokens_generated_total", description="Target tokens generated.", tag_keys=("model",)
        )
        self.first_token = metrics.Histogram(
            "attention_time_to_first_token_seconds",
            description="Arrival at the model to the step that gave every text of the request a token.",
            boundaries=latency_buckets, tag_keys=("model",),
        )  # fmt: skip
        self.per_token = metrics.Histogram(
            "attention_time_per_output_token_seconds",
            description="Decode time per output token after the first (per request, longest text).",
            boundaries=TOKEN_BUCKETS, tag_keys=("model",),
        )  # fmt: skip
        self.steps = metrics.Counter(
            "attention_decoder_steps_total", description="Decoder steps run by the model's scheduler.",
            tag_keys=("model",),
        )  # fmt: skip
        self.rows = metrics.Gauge(
            "attention_rows_in_flight", description="Decoder rows (texts x beams) in the running batch.",
            tag_keys=("model",),
        )  # fmt: skip
        self.in_flight = metrics.Gauge(
            "attention_tokens_in_flight",
            description="Budget held by the running batch: rows x (longest source + longest target limit).",
            tag_keys=("model",),
        )  # fmt: skip
        self.wait = metrics.Gauge(
            "attention_predicted_wait_seconds",
            description="Time the work the model holds would take to drain at the rate it answers "
            "while saturated; requests are shed beyond 0.8 x the request timeout (0: nothing waits, or no "
            "rate learned yet).",
            tag_keys=("model",),
        )  # fmt: skip
        self.info = metrics.Gauge(
            "attention_model_info", description="A loaded model (value 1).",
            tag_keys=("model", "version", "task", "family", "provider"),  # type: ignore[arg-type]
        )  # fmt: skip

    def loaded(self, version: int, task: str, family: str, provider: str) -> None:
        self._info_tags = {
            **self.tags,
            "version": str(version),
            "task": task,
            "family": family,
            "provider": provider,
        }
        self.refresh()

    def refresh(self) -> None:
        """Re-set the gauges: Ray's exporter drops gauge values that are not updated (an idle
        model's rows in flight vanished instead of reading 0), so the replica's health check
        calls this every few seconds."""
        self.info.set(1, tags=self._info_tags)
        rows, tokens = self._in_flight_now
        if rows >= 0:
            DEFERRED.set(self.rows, rows, self.key)
            DEFERRED.set(self.in_flight, tokens, self.key)

    def unloaded(self) -> None:
        """This version was replaced: its info reads 0 at once (it read 1 beside the new version's
        until Ray dropped the series, about a minute later)."""
        self.info.set(0, tags=self._info_tags)

    def batch(self, size: int, compute_s: float) -> None:
        DEFERRED.observe(self.batch_size, size, self.key)
        DEFERRED.inc(self.batched, size, self.key)
        DEFERRED.observe(self.compute, compute_s, self.key)

    def waited(self, seconds: float) -> None:
        DEFERRED.observe(self.queue_wait, seconds, self.key)

    def generated(self, tokens: int) -> None:
        if tokens:
            DEFERRED.inc(self.tokens, tokens, self.key)

    def decoded(self, first_token_s: float, per_token_s: float | None) -> None:
        DEFERRED.observe(self.first_token, first_token_s, self.key)
        if per_token_s is not None:
            DEFERRED.observe(self.per_token, per_token_s, self.key)

    def predicted_wait(self, seconds: float) -> None:
        """Every few seconds (the health check's refresh); a model that answers nothing reads an
        hour, not an infinity that would make every sum over models +Inf."""
        DEFERRED.set(self.wait, min(seconds, MAX_PREDICTED_WAIT_S), self.key)

    def stepped(self, rows: int, tokens: int, steps: int = 1) -> None:
        """After a decoder step (or a change without one: callers that left): the counter moves
        by the steps run, the gauges only when the batch changed."""
        if steps:
            DEFERRED.inc(self.steps, steps, self.key)
        if (rows, tokens) != self._in_flight_now:
            self._in_flight_now = (rows, tokens)
            DEFERRED.set(self.rows, rows, self.key)
            DEFERRED.set(self.in_flight, tokens, self.key)
