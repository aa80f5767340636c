"""A real Prometheus (Debian's) scrapes the running service with the project's own config; the
dashboard's and the alert rules' PromQL all evaluate there and name only series that exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.conftest import Service, free_port, wait_ready
from tests.service.test_app import canvas_png

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = shutil.which("prometheus")


@pytest.fixture(scope="module")
def prometheus(service: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if PROMETHEUS is None:
        pytest.fail("prometheus is missing: `make system-deps` installs Debian's prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    config["rule_files"] = [str(ROOT / "deploy" / "prometheus" / f) for f in config["rule_files"]]
    [job] = config["scrape_configs"]
    job["static_configs"][0]["targets"] = [
        service.metrics_url.removeprefix("http://").removesuffix("/metrics")
    ]
    # one node, as a compose without the cluster profile: the workers' name resolves to nothing
    [workers] = job["dns_sd_configs"]
    workers["names"] = ["ray-worker.invalid"]
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(workdir / "log").open("wb"),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/-/ready", proc, 60, lambda: (workdir / "log").read_text()[-2000:])
        yield url
    finally:
        proc.terminate()  # our own child, by PID
        proc.wait(timeout=30)


def query(url: str, expr: str) -> dict[str, Any]:
    body = requests.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", f"{expr}: {body}"
    return body["data"]


def wait_for(url: str, expr: str, timeout: float = 90) -> list[Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = query(url, expr)["result"]
        if result:
            return result
        time.sleep(2)
    pytest.fail(f"no samples for {expr} after {timeout} s")


def traffic(service: Service) -> None:
    for i in range(6):
        service.post(
            "/v1/models/dates-bahdanau/translate", json={"text": [f"{i + 1} mai 2001", "2 juin 2002"]}
        )
        service.post("/v1/models/dates-transformer/translate", json={"text": f"{i + 1} mars 1999"})
        service.post(
            "/v1/models/fashion-vit/classify", files={"file": ("x.png", canvas_png(i)[0], "image/png")}
        )
    service.post("/v1/models/nope/translate", json={"text": "x"})


def test_service_series_arrive_in_prometheus(service: Service, prometheus: str) -> None:
    traffic(service)
    assert wait_for(prometheus, 'up{job="attention-serve"} == 1')
    # the workers' DNS name that resolves to nothing adds no target, hence no `up` series to alert on
    [up] = query(prometheus, 'up{job="attention-serve"}')["result"]
    assert up["metric"]["service"] == "attention-serve"
    # each series waited for by itself: they reach Prometheus a scrape apart, and one that exists
    # already (an earlier test's) would end a wait for "any"
    for model, route, status in [("dates-bahdanau", "translate", "200"), ("fashion-vit", "classify", "200"),
                                 ("_unknown", "translate", "404")]:  # fmt: skip
        assert wait_for(
            prometheus, f'ray_attention_requests_total{{model="{model}", route="{route}", status="{status}"}}'
        )
    assert wait_for(prometheus, 'ray_attention_request_duration_seconds_bucket{model="dates-transformer"}')
    assert wait_for(prometheus, 'ray_attention_batch_size_count{model="dates-bahdanau"} > 0')
    # the dashboard's mean batch size: exact whichever way Ray exports (its OpenTelemetry export
    # builds the histogram's _sum from bucket midpoints, which put a batch of 1 at 0.5)
    mean = "sum by (model) (ray_attention_batched_total) / sum by (model) (ray_attention_batch_size_count)"
    assert all(float(r["value"][1]) >= 1 for r in wait_for(prometheus, mean))
    assert wait_for(prometheus, "ray_attention_model_info")
    # the translators' schedulers: per-answer and per-step series
    assert wait_for(
        prometheus, 'ray_attention_time_to_first_token_seconds_count{model="dates-transformer"} > 0'
    )
    assert wait_for(prometheus, 'ray_attention_decoder_steps_total{model="dates-bahdanau"} > 0')
    assert wait_for(prometheus, 'ray_attention_rows_in_flight{model="dates-bahdanau"}')


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "attention-serve.json").read_text())
    # the dashboard's job variable, as Grafana fills it in: the bundled scrape job
    return [
        t["expr"].replace("$job", "attention-serve")
        for panel in dashboard["panels"]
        for t in panel["targets"]
    ]


def expressions() -> list[str]:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    return dashboard_expressions() + [r["expr"] for group in rules["groups"] for r in group["rules"]]


def test_every_dashboard_and_alert_expression_evaluates_on_existing_series(
    service: Service, prometheus: str
) -> None:
    traffic(service)
    wait_for(prometheus, "ray_attention_tokens_generated_total")
    wait_for(prometheus, "ray_serve_deployment_replica_healthy")
    names = set(requests.get(f"{prometheus}/api/v1/label/__name__/values", timeout=10).json()["data"])
    exprs = expressions()
    assert len(exprs) >= 15
    for expr in exprs:
        query(prometheus, expr)  # evaluates without error
        for metric in re.findall(r"\b(ray_[a-z_]+|up)\b", expr):
            assert metric in names, f"{expr!r} refers to {metric}, which the service does not export"
    # every panel shows data after this traffic: a selector that matched nothing (a wrong job or
    # label) evaluated fine and drew an empty panel
    for expr in dashboard_expressions():
        assert wait_for(prometheus, expr, timeout=60), expr
