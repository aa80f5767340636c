"""The ``make eval`` page: a section for what was measured, none for what was not."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from export.eval_markdown import render
from export.eval_report import ModelEval, Sizes, report_stem

METRICS = {"exact_match": 1.0, "alignment_error_rate": 0.02, "alignment_mass": 0.9}
INT8 = {"exact_match": 1.0, "alignment_error_rate": 0.03, "attention_correlation": 0.999,
        "attention_argmax_agreement": 0.98}  # fmt: skip


def page(int8: dict[str, float]) -> str:
    model = ModelEval("dates-bahdanau", "rnn-additive", "translation", dict(METRICS), dict(int8))
    return render([model], [], Sizes(), datetime(2025, 1, 1, tzinfo=UTC))


def test_the_int8_section_shows_what_was_measured() -> None:
    text = page(INT8)
    assert "## Quantised" in text and "Map drift over" in text
    assert "| `dates-bahdanau` | exact match 100.0 % | 100.0 % | 0.9990 | 98.0 % |" in text


def test_no_int8_section_without_int8_numbers() -> None:
    """``eval --no-int8`` printed the section's heading over an empty table."""
    text = page({})
    assert "Quantised" not in text and "Map drift" not in text
    assert "\n\n\n" not in text and "## Service vs PyTorch" in text


def test_a_section_only_for_the_tasks_scored() -> None:
    """A repository of translation models only had a vision heading over an empty table."""
    text = page(INT8)
    assert "## Translation" in text and "## Vision" not in text and "\n\n\n" not in text


def test_a_later_report_that_day_gets_a_name_of_its_own(tmp_path: Path) -> None:
    """A second ``make eval`` the same day overwrote the report the README links to."""
    assert report_stem(tmp_path, "2026-12-05") == tmp_path / "2026-12-05"
    (tmp_path / "2026-12-05.md").write_text("first")
    assert report_stem(tmp_path, "2026-12-05") == tmp_path / "2026-12-05-2"
    (tmp_path / "2026-12-05-2.json").write_text("{}")
    assert report_stem(tmp_path, "2026-12-05") == tmp_path / "2026-12-05-3"
