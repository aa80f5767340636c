"""promtool accepts the Prometheus config and the alert rules, and the rules pass their unit tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROMTOOL = shutil.which("promtool")


@pytest.mark.parametrize(("what", "file"), [("config", "prometheus.yml"), ("rules", "alerts.yml")])
def test_promtool_checks(what: str, file: str) -> None:
    if PROMTOOL is None:
        pytest.fail("promtool is missing: `make system-deps` installs Debian's prometheus")
    result = subprocess.run([PROMTOOL, "check", what, str(ROOT / "deploy" / "prometheus" / file)],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_alert_rules_fire_when_they_should() -> None:
    """tests/deploy/alerts_test.yml: a lasting outage pages although the dead replica's health
    series vanishes; a restart that recovers does not; one node without workers has nothing down."""
    if PROMTOOL is None:
        pytest.fail("promtool is missing: `make system-deps` installs Debian's prometheus")
    result = subprocess.run([PROMTOOL, "test", "rules", str(Path(__file__).with_name("alerts_test.yml"))],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
