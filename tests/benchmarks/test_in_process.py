"""The in-process harness (``benchmarks/in_process.py``) on the tiny repository: every kind of
request it sends is answered 200 by the real app (a refused one would raise), and it reports a
rate and CPU per request."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from benchmarks import in_process


@pytest.mark.parametrize(
    ("model", "kind"),
    [("dates-transformer", "stream"), ("dates-transformer", "plain"), ("fashion-vit", "json"),
     ("fashion-vit", "multipart"), ("fashion-vit", "v2"), ("fashion-vit", "rollout")],
)  # fmt: skip
def test_every_kind_is_answered(tiny_repository: Path, model: str, kind: str) -> None:
    args = in_process.parser().parse_args(
        [
            model,
            kind,
            "--repository",
            str(tiny_repository),
            "--callers",
            "4",
            "--seconds",
            "0.3",
            "--warmup",
            "0.1",
        ]
    )
    result = asyncio.run(in_process.run(args))
    assert result["requests_per_s"] > 0
    assert 0 < result["loop_cpu_us_per_request"] <= result["cpu_us_per_request"]
