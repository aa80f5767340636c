"""The attention scores on hand-made cases whose answers are known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.data import dates
from export.faithfulness import (
    AlignmentScore,
    combine,
    iso_target_fields,
    pointing_hit,
    score_alignment,
    translation_faithfulness,
)
from service.inference.manifest import Manifest


def test_a_diagonal_alignment_has_no_errors_and_full_mass() -> None:
    attention = np.eye(4)  # target token i looks only at source token i
    score = score_alignment(attention, {"day": [0, 1], "year": [2, 3]}, {"day": [0, 1], "year": [2, 3]})
    assert score == AlignmentScore(tokens=4, errors=0, mass=1.0) and score.error_rate == 0.0


def test_errors_count_argmax_outside_the_gold_span_and_mass_is_averaged() -> None:
    attention = np.array([[0.7, 0.3, 0.0], [0.6, 0.4, 0.0]])  # both rows peak on source 0
    score = score_alignment(attention, {"month": [0, 1]}, {"month": [1, 2]})
    assert score.errors == 2 and score.error_rate == 1.0
    assert np.isclose(score.mass, (0.3 + 0.4) / 2)


def test_rows_past_an_early_stop_and_fields_without_gold_are_skipped() -> None:
    attention = np.eye(2)
    score = score_alignment(attention, {"day": [0, 5], "year": [1]}, {"day": [0]})
    assert score.tokens == 1 and score.errors == 0


def test_iso_fields_and_combining_scores() -> None:
    tokens = [*"2024-03-05", "</s>"]
    assert iso_target_fields(tokens) == {"year": [0, 1, 2, 3], "month": [5, 6], "day": [8, 9]}
    total = combine([AlignmentScore(2, 1, 0.5), AlignmentScore(6, 0, 1.0)])
    assert total.tokens == 8 and total.errors == 1 and np.isclose(total.mass, (1.0 + 6.0) / 8)


def test_pointing_game_uses_the_centre_of_the_strongest_patch() -> None:
    rollout = np.zeros((6, 6))
    rollout[4, 1] = 1.0  # patch centre at (36, 12) on a 48×48 canvas
    assert pointing_hit(rollout, (28, 0, 48, 28), (48, 48))
    assert not pointing_hit(rollout, (0, 20, 28, 48), (48, 48))


@pytest.mark.slow
def test_a_trained_bahdanau_model_aligns_fields_with_their_gold_spans(tiny_repository: Path) -> None:
    """On held-out dates, the additive attention of even the briefly trained tiny model points
    into the right source field for most target characters (the demo model: 1.6 % errors)."""
    _, held_out = dates.splits(0, 200, seed=1)
    directory = tiny_repository / "dates-bahdanau" / "1"
    score = translation_faithfulness(directory, Manifest.load(directory), held_out)
    assert score.tokens == 200 * 8  # 4 year + 2 month + 2 day characters each
    assert score.error_rate < 0.25 and score.mass > 0.5, score
