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
ray_attention_model_info                              gauge (=1)   model, version, task, family, provider
====================================================  ===========  ==========================

The threads that serve (the event loop, a model's decoder-step thread) do not call Ray's metric
API themselves: a record there costs ≈ 15 µs in a replica and, at thousands of decoder steps a
second, was ≈ 7 % of a replica's samples. They queue each update (a ``deque.append``) and one
background thread per process records them every ``FLUSH_S``, counters summed and gauges at
their last value; histograms keep every observation. Ray exports every few seconds anyway.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

from ray.serve import metrics

log = logging.getLogger("ray.serve")

BATCH_BUCKETS = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0]
TOKEN_BUCKETS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5]
FLUSH_S = 0.5

Tags = tuple[tuple[str, str], ...]


class Deferred:
    """Metric updates queued by any thread, recorded into Ray by one daemon thread."""

    def __init__(self, flush_s: float = FLUSH_S) -> None:
        self.flush_s = flush_s
        self.updates: collections.deque[tuple[Any, str, float, Tags]] = collections.deque()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def push(self, metric: Any, kind: str, value: float, tags: Tags) -> None:
        self.updates.append((metric, kind, value, tags))  # atomic: no lock on the serving threads
        if self._thread is None:
            self._start()

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="metrics-flush", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self.flush_s)
            try:
                self.flush()
            except Exception:  # a metric that fails must not stop the others
                log.exception("recording metrics failed")

    def flush(self) -> None:
        """Record what is queued: a sum per counter series, the last value per gauge series, every
        histogram observation."""
        sums: dict[tuple[Any, Tags], float] = {}
        last: dict[tuple[Any, Tags], float] = {}
        while self.updates:
            metric, kind, value, tags = self.updates.popleft()
            if kind == "observe":
                metric.observe(value, tags=dict(tags))
            elif kind == "inc":
                sums[metric, tags] = sums.get((metric, tags), 0.0) + value
            else:
                last[metric, tags] = value
        for (metric, tags), value in sums.items():
            metric.inc(value, tags=dict(tags))
        for (metric, tags), value in last.items():
            metric.set(value, tags=dict(tags))


#: this process's queue (a replica's event loop and step threads share it)
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

    def record(self, model: str, route: str, status: int, seconds: float) -> None:
        route_tags = (("model", model), ("route", route))
        DEFERRED.push(self.requests, "inc", 1, (*route_tags, ("status", str(status))))
        DEFERRED.push(self.duration, "observe", seconds, route_tags)


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
        # Ray's exporter writes a histogram's _sum from its buckets' midpoints (a batch of 1 counts
        # as 0.5): the exact mean batch is this counter's rate over the histogram's count's
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
            description="Token budget held by the running batch (beam x (source + target limit) per text).",
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
            DEFERRED.push(self.rows, "set", rows, self.key)
            DEFERRED.push(self.in_flight, "set", tokens, self.key)

    def unloaded(self) -> None:
        """This version was replaced: its info reads 0 at once (it read 1 beside the new version's
        until Ray dropped the series, about a minute later)."""
        self.info.set(0, tags=self._info_tags)

    def batch(self, size: int, compute_s: float) -> None:
        DEFERRED.push(self.batch_size, "observe", size, self.key)
        DEFERRED.push(self.batched, "inc", size, self.key)
        DEFERRED.push(self.compute, "observe", compute_s, self.key)

    def waited(self, seconds: float) -> None:
        DEFERRED.push(self.queue_wait, "observe", seconds, self.key)

    def generated(self, tokens: int) -> None:
        if tokens:
            DEFERRED.push(self.tokens, "inc", tokens, self.key)

    def decoded(self, first_token_s: float, per_token_s: float | None) -> None:
        DEFERRED.push(self.first_token, "observe", first_token_s, self.key)
        if per_token_s is not None:
            DEFERRED.push(self.per_token, "observe", per_token_s, self.key)

    def stepped(self, rows: int, tokens: int, steps: int = 1) -> None:
        """After a decoder step (or a change without one: callers that left): the counter moves
        by the steps run, the gauges only when the batch changed."""
        if steps:
            DEFERRED.push(self.steps, "inc", steps, self.key)
        if (rows, tokens) != self._in_flight_now:
            self._in_flight_now = (rows, tokens)
            DEFERRED.push(self.rows, "set", rows, self.key)
            DEFERRED.push(self.in_flight, "set", tokens, self.key)
