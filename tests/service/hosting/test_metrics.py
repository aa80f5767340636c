"""The metric definitions Ray accepts: a description Ray cannot encode stops every replica from
loading its models, so it is checked here, without Ray."""

from __future__ import annotations

import ast
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
