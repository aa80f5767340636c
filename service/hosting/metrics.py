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
ray_attention_tokens_generated_total                  counter      model
ray_attention_time_to_first_token_seconds             histogram    model
ray_attention_time_per_output_token_seconds           histogram    model
ray_attention_decoder_steps_total                     counter      model
ray_attention_rows_in_flight                          gauge        model
ray_attention_tokens_in_flight                        gauge        model
ray_attention_model_info                              gauge (=1)   model, version, task, family, provider
====================================================  ===========  ==========================
"""

from __future__ import annotations

from ray.serve import metrics

BATCH_BUCKETS = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0]
TOKEN_BUCKETS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5]


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
        self.requests.inc(tags={"model": model, "route": route, "status": str(status)})
        self.duration.observe(seconds, tags={"model": model, "route": route})


class ModelMetrics:
    def __init__(self, model: str, latency_buckets: list[float]) -> None:
        self.tags = {"model": model}
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
        """Re-set the info gauge: Ray's exporter drops gauge values that are not updated, so the
        replica's health check calls this every few seconds."""
        self.info.set(1, tags=self._info_tags)

    def batch(self, size: int, compute_s: float) -> None:
        self.batch_size.observe(size, tags=self.tags)
        self.compute.observe(compute_s, tags=self.tags)

    def waited(self, seconds: float) -> None:
        self.queue_wait.observe(seconds, tags=self.tags)

    def generated(self, tokens: int) -> None:
        if tokens:
            self.tokens.inc(tokens, tags=self.tags)

    def decoded(self, first_token_s: float, per_token_s: float | None) -> None:
        self.first_token.observe(first_token_s, tags=self.tags)
        if per_token_s is not None:
            self.per_token.observe(per_token_s, tags=self.tags)

    def stepped(self, rows: int, tokens: int) -> None:
        """After a decoder step: the counter moves, the gauges only when the batch changed."""
        self.steps.inc(1, tags=self.tags)
        if (rows, tokens) != self._in_flight_now:
            self._in_flight_now = (rows, tokens)
            self.rows.set(rows, tags=self.tags)
            self.in_flight.set(tokens, tags=self.tags)
