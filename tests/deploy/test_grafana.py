"""Grafana provisioning: the datasource, the dashboard provider and the compose mounts agree."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"


def test_provisioning_matches_the_compose_mounts_and_the_dashboard() -> None:
    [datasource] = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    [provider] = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "attention-serve.yml").read_text()
    )["providers"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["grafana"]["volumes"]}
    assert mounts[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    dashboard = json.loads((GRAFANA / "dashboards" / "attention-serve.json").read_text())
    assert dashboard["uid"] == "attention-serve"
    # the datasource is a variable: the dashboard imports into a Grafana whose Prometheus has
    # another uid; provisioned here, it starts on ours
    [variable] = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus" and variable["current"]["value"] == datasource["uid"]
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${" + variable["name"] + "}"}, panel[
            "title"
        ]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
    assert '"uid": "prometheus"' not in (GRAFANA / "dashboards" / "attention-serve.json").read_text()
    # every series is this service's scrape job's (a variable, starting on the bundled job): a
    # second environment or another Ray Serve app in the same Prometheus is not summed in
    [job] = [v for v in dashboard["templating"]["list"] if v["name"] == "job"]
    assert job["current"]["value"] == "attention-serve" and "label_values(" in job["definition"]
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            selectors = re.findall(r"\b(ray_[a-z_]+)(\{[^}]*\})?", target["expr"])
            assert selectors, target["expr"]
            for name, matchers in selectors:
                assert 'job=~"$job"' in matchers, (panel["title"], target["expr"])
                if name.startswith("ray_serve_"):
                    assert 'application="attention"' in matchers, target["expr"]
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("requests/s", "errors/s", "p99", "queue wait", "batch size", "tokens", "replicas",
                  "first token", "per output token", "steps/s", "in flight"):  # fmt: skip
        assert topic in titles, topic
