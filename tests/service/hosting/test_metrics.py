"""The metric definitions Ray accepts: a description Ray cannot encode stops every replica from
loading its models, so it is checked here, without Ray."""

from __future__ import annotations

import ast
import itertools
import math
import threading
from pathlib import Path

import pytest
from opencensus.stats.aggregation_data import DistributionAggregationData

import service.hosting.metrics as metrics


def test_every_metric_description_is_ascii() -> None:
    tree = ast.parse(Path(metrics.__file__).read_text())
    descriptions = [
        kw.value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        for kw in node.keywords
        if kw.arg == "description" and isinstance(kw.value, ast.Constant)
    ]
    assert len(descriptions) >= 12
    assert [d for d in descriptions if not d.isascii()] == []


def test_the_modules_table_lists_every_series_it_defines() -> None:
    tree = ast.parse(Path(metrics.__file__).read_text())
    defined = {
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
        and str(node.args[0].value).startswith("attention_")
    }  # fmt: skip
    listed = {line.split()[0].removeprefix("ray_") for line in (metrics.__doc__ or "").splitlines()
              if line.startswith("ray_attention_")}  # fmt: skip
    assert len(defined) >= 14 and defined == listed


class Recorded:
    """Stands where a Ray metric would: what ``Deferred.flush`` records into it."""

    def __init__(self, boundaries: list[float] | None = None) -> None:
        self.boundaries = boundaries or [1.0]
        self.calls: list[tuple[str, float, dict[str, str]]] = []

    def inc(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append(("inc", value, tags))

    def set(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append(("set", value, tags))

    def observe(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append(("observe", value, tags))


def le_counts(values: list[float], boundaries: list[float]) -> list[int]:
    """Prometheus' cumulative bucket counts (``le``, then +Inf)."""
    return [sum(v <= b for v in values) for b in boundaries] + [len(values)]


def exported_counts(recorded: list[float], boundaries: list[float]) -> list[int]:
    """The cumulative bucket counts Prometheus scrapes for values recorded into a Ray histogram,
    the same by both of Ray's exports: OpenTelemetry's (``le``) and OpenCensus' (the default),
    here opencensus' own aggregation, which counts a value equal to a boundary in the bucket
    above it."""
    census = DistributionAggregationData(0, 0, 0, None, boundaries)
    for value in recorded:
        census.add_sample(value, None, None)
    opencensus = list(itertools.accumulate(census.counts_per_bucket))
    assert opencensus == le_counts(recorded, boundaries), "the two exports count differently"
    return opencensus


def test_deferred_updates_sum_counters_keep_last_gauges_and_every_observation() -> None:
    """What the serving threads change reaches Ray on the flush thread: one increment per counter
    series (the sum), a gauge's last value, every histogram observation in its own bucket (a
    value on a boundary in the bucket that boundary closes, as Ray counts it); from several
    threads, while the flush thread runs."""
    bounds = [0.25, 0.5, 1.0]
    counter, gauge, histogram = Recorded(), Recorded(), Recorded(bounds)
    deferred = metrics.Deferred(flush_s=0.01)
    a, b = (("model", "a"),), (("model", "b"),)
    values = [i / 1000 for i in range(1001)] + [0.25, 0.5, 2.0, 7.0]

    def serve(tags: metrics.Tags) -> None:
        for i, value in enumerate(values):
            deferred.inc(counter, 2, tags)
            deferred.set(gauge, i, tags)
            deferred.observe(histogram, value, tags)

    threads = [threading.Thread(target=serve, args=(t,)) for t in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    deferred.flush()
    totals: dict[str, float] = {}
    for kind, value, tags in counter.calls:
        assert kind == "inc"
        totals[tags["model"]] = totals.get(tags["model"], 0) + value
    assert totals == {"a": 2 * len(values), "b": 2 * len(values)} and len(counter.calls) < len(values)
    last = {}
    for _, value, tags in gauge.calls:
        last[tags["model"]] = value
    assert last == {"a": len(values) - 1, "b": len(values) - 1}
    for tags in ({"model": "a"}, {"model": "b"}):
        seen = [v for _, v, t in histogram.calls if t == tags]
        assert exported_counts(seen, bounds) == le_counts(values, bounds)
        assert sum(seen) == pytest.approx(sum(values), rel=1e-12)  # the histogram's _sum, exact


def test_a_buckets_mean_stays_in_its_bucket() -> None:
    """Observations on or just above a boundary sum to a mean float rounding can carry over it
    (the mean of 1000 × 0.3 comes out 0.30000000000000565, of 10 × the float after 0.3 exactly
    0.3): each is recorded in its own bucket. A value that is no number counts as its bucket's
    upper boundary and leaves the bucket's later means alone."""
    bounds = [0.3, 1.0]
    histogram = Recorded(bounds)
    deferred = metrics.Deferred(flush_s=3600)
    tags = (("model", "m"),)
    above = math.nextafter(0.3, 1.0)
    for value in [0.3] * 1000 + [above] * 10 + [5.0]:
        deferred.observe(histogram, value, tags)
    deferred.flush()
    seen = [v for _, v, _ in histogram.calls]
    assert exported_counts(seen, bounds) == [1000, 1010, 1011] and seen[-1] == 5.0
    assert seen[:1000] == [math.nextafter(0.3, 0)] * 1000 and seen[1000:1010] == [above] * 10
    for value in (float("nan"), math.inf, 0.1, 2.0):
        deferred.observe(histogram, value, tags)
    deferred.flush()
    assert [v for _, v, _ in histogram.calls[1011:]] == pytest.approx([0.2, 0.2, 1.5, 1.5])
    deferred.observe(histogram, 0.1, tags)
    deferred.flush()
    assert histogram.calls[-1][1] == pytest.approx(0.1)


def test_deferred_records_only_what_changed_and_keeps_an_ended_threads_totals() -> None:
    """A flush records the increase since the last one (nothing when nothing moved); a thread
    that ended leaves its totals counted once (they are folded, not dropped or recounted)."""
    counter, histogram = Recorded(), Recorded([1.0, 2.0])
    deferred = metrics.Deferred(flush_s=3600)  # flushed here only
    tags = (("model", "m"),)

    def work(n: int) -> None:
        for _ in range(n):
            deferred.inc(counter, 1, tags)
            deferred.observe(histogram, 1.5, tags)

    worker = threading.Thread(target=work, args=(3,))
    worker.start()
    worker.join()
    work(2)  # this thread's own totals
    deferred.flush()
    assert [c[1] for c in counter.calls] == [5] and len(histogram.calls) == 5
    deferred.flush()
    assert len(counter.calls) == 1 and len(histogram.calls) == 5  # nothing moved, nothing recorded
    work(1)
    deferred.flush()
    assert [c[1] for c in counter.calls] == [5, 1] and [v for _, v, _ in histogram.calls] == [1.5] * 6
    counted, go_on = threading.Event(), threading.Event()
    later = threading.Thread(target=lambda: (work(4), counted.set(), go_on.wait(10)))
    later.start()
    assert counted.wait(10)
    deferred.flush()  # counted while its thread lives
    go_on.set()
    later.join()
    deferred.flush()  # and not again once it ended
    assert [c[1] for c in counter.calls] == [5, 1, 4] and len(histogram.calls) == 10


def test_gauges_are_kept_alive_and_a_replaced_version_reads_zero() -> None:
    """Ray drops a gauge value nobody re-sets within about a minute: the health check's refresh
    re-sets the info and in-flight gauges (an idle model's rows in flight vanished instead of
    reading 0), and a replaced version's info goes to 0 at once (it read 1 beside the new one)."""
    m = metrics.ModelMetrics("m", [0.1, 1.0])
    m.info, m.rows, m.in_flight = info, rows, tokens = Recorded(), Recorded(), Recorded()  # type: ignore[assignment]
    m.loaded(1, "translation", "transformer", "CPUExecutionProvider")
    v1 = {
        "model": "m",
        "version": "1",
        "task": "translation",
        "family": "transformer",
        "provider": "CPUExecutionProvider",
    }
    m.refresh()  # before any step: no in-flight value to keep
    metrics.DEFERRED.flush()
    assert rows.calls == [] and info.calls == [("set", 1, v1), ("set", 1, v1)]
    m.stepped(3, 120)
    m.stepped(0, 0)
    metrics.DEFERRED.flush()
    rows.calls.clear()
    m.refresh()  # idle now: 0 again, not gone
    metrics.DEFERRED.flush()
    assert rows.calls == [("set", 0, {"model": "m"})] and tokens.calls[-1] == ("set", 0, {"model": "m"})
    m.unloaded()
    assert info.calls[-1] == ("set", 0, v1)


def test_the_predicted_wait_is_a_gauge_and_an_infinite_one_reads_an_hour() -> None:
    m = metrics.ModelMetrics("m", [0.1, 1.0])
    m.wait = wait = Recorded()  # type: ignore[assignment]
    m.predicted_wait(2.5)
    metrics.DEFERRED.flush()
    m.predicted_wait(float("inf"))  # a model that answered nothing for its whole memory
    metrics.DEFERRED.flush()
    assert wait.calls == [("set", 2.5, {"model": "m"}), ("set", 3600.0, {"model": "m"})]


def test_batch_sizes_on_the_boundaries_are_exported_in_the_buckets_they_close() -> None:
    """Batches of 1, 2, 4 … 512 — the boundaries themselves — each in the bucket ``le`` its size
    (a batch of 1 under ``le="1.0"``): through OpenCensus every one was counted a bucket higher,
    so a batch-size median of all-1 batches read 1.5 and a full batch of 32 read "≤ 64"."""
    batch_size = Recorded(metrics.BATCH_BUCKETS)
    deferred = metrics.Deferred(flush_s=3600)
    sizes = [int(b) for b in metrics.BATCH_BUCKETS] * 3 + [3, 5, 1000]
    for size in sizes:
        deferred.observe(batch_size, size, (("model", "m"),))
    deferred.flush()
    seen = [v for _, v, _ in batch_size.calls]
    assert exported_counts(seen, metrics.BATCH_BUCKETS) == le_counts(sizes, metrics.BATCH_BUCKETS)
    assert exported_counts(seen, metrics.BATCH_BUCKETS)[0] == 3  # the three batches of 1
    assert sum(seen) == pytest.approx(sum(sizes), rel=1e-12)
