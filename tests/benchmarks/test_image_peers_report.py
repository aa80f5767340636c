"""The peers report, written again from a committed run's results: the goals as judged then, and
the same comparison payload by payload and round by round."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.image_peers_report import same_payload, write_report

RESULTS = Path(__file__).parents[2] / "benchmarks" / "results" / "2026-12-06-peers-6.json"


def test_each_payload_is_compared_with_the_fastest_peer_speaking_it_round_by_round() -> None:
    """The goals compare each side's fastest payload: JSON for attention-serve, multipart for
    TorchServe. Multipart against multipart costs attention-serve more CPU at 64 clients in 4 of
    the 5 rounds: the table says so beside the goals."""
    r = json.loads(RESULTS.read_text())
    rows = same_payload(r)
    assert "| multipart | 64 | 1932 · 0.88 | torchserve | 1346 · 0.78 | 1.44 | 5 of 5 | 1 of 5 |" in rows
    assert "| v2-binary | 32 | 1803 · 0.88 | pytriton | 733 · 1.48 | 2.46 | 5 of 5 | 5 of 5 |" in rows
    assert not [row for row in rows if "json+rollout" in row]  # no peer sends the rollout


def test_the_report_shows_the_table_beside_the_goals(tmp_path: Path) -> None:
    r = json.loads(RESULTS.read_text())
    text = write_report(r, tmp_path / "peers.md").read_text()
    goals, table = text.index("## Goals (issue #19)"), text.index("Payload by payload and round by round")
    assert goals < table < text.index("## The ceiling")


def test_the_peers_benchmark_refuses_a_repository_without_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``make bench-peers REPO=…`` passes the repository on (every server, the reference answers
    and the ceiling read its ViT); one without it is refused before any venv or server starts."""
    from benchmarks import image_peers

    assert image_peers.main(["--repository", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert f"no fashion-vit/1 in {tmp_path}" in capsys.readouterr().err and not (tmp_path / "out").exists()
