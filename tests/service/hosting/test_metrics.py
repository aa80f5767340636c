"""The metric definitions Ray accepts: a description Ray cannot encode stops every replica from
loading its models, so it is checked here, without Ray."""

from __future__ import annotations

import ast
import threading
import time
from pathlib import Path

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


class Recorded:
    """Stands where a Ray metric would: what ``Deferred.flush`` records into it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, dict[str, str]]] = []

    def inc(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append(("inc", value, tags))

    def set(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append(("set", value, tags))

    def observe(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append(("observe", value, tags))


def test_deferred_updates_sum_counters_keep_last_gauges_and_every_observation() -> None:
    """What the serving threads queue reaches Ray on the flush thread: one increment per counter
    series (the sum), a gauge's last value, every histogram observation; from several threads."""
    counter, gauge, histogram = Recorded(), Recorded(), Recorded()
    deferred = metrics.Deferred(flush_s=0.05)
    a, b = (("model", "a"),), (("model", "b"),)

    def serve(tags: metrics.Tags) -> None:
        for i in range(1000):
            deferred.push(counter, "inc", 2, tags)
            deferred.push(gauge, "set", i, tags)
            deferred.push(histogram, "observe", i / 1000, tags)

    threads = [threading.Thread(target=serve, args=(t,)) for t in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    deadline = time.monotonic() + 10
    while deferred.updates and time.monotonic() < deadline:  # the flush thread drains the queue
        time.sleep(0.01)
    time.sleep(0.1)  # its last flush records what it took
    totals: dict[str, float] = {}
    for kind, value, tags in counter.calls:
        assert kind == "inc"
        totals[tags["model"]] = totals.get(tags["model"], 0) + value
    assert totals == {"a": 2000, "b": 2000} and len(counter.calls) < 2000
    assert {tags["model"]: value for _, value, tags in gauge.calls} == {"a": 999, "b": 999}
    assert sorted(v for _, v, t in histogram.calls if t["model"] == "a") == [i / 1000 for i in range(1000)]


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
