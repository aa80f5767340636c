"""Scoring attention against ground truth (issue #8's first piece): plain numpy, no model.

* Translation — the ``dates`` task knows which source characters spell the year, the month and
  the day (gold spans) and where each field sits in the ISO target. For every target token of a
  field, the attention row's argmax should fall inside that field's source span; the share that
  does not is the *alignment error rate*, and the attention mass inside the span says how sure.
* Vision — the *pointing game* (Zhang et al. 2016): the rollout's maximum (Abnar & Zuidema 2020)
  should fall inside the object's box on the ``fashion`` canvas.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: where each field sits in an ISO date (``YYYY-MM-DD``), as [start, end) character offsets
ISO_FIELDS = {"year": (0, 4), "month": (5, 7), "day": (8, 10)}


@dataclass(frozen=True)
class AlignmentScore:
    tokens: int  # target tokens scored (those inside a field)
    errors: int  # of them, how many have their argmax outside the field's gold source span
    mass: float  # mean attention mass inside the gold span

    @property
    def error_rate(self) -> float:
        return self.errors / self.tokens if self.tokens else 0.0


def score_alignment(
    attention: np.ndarray,
    target_fields: Mapping[str, Sequence[int]],
    source_fields: Mapping[str, Sequence[int]],
) -> AlignmentScore:
    """``attention`` (T, S): rows are target tokens, each a distribution over source tokens.
    ``target_fields`` / ``source_fields``: field → token indices (on each side)."""
    tokens = errors = 0
    mass = 0.0
    for field, targets in target_fields.items():
        gold = list(source_fields.get(field, ()))
        if not gold:
            continue
        for t in targets:
            if t >= attention.shape[0]:
                continue  # the model stopped early: nothing to score
            row = attention[t]
            tokens += 1
            errors += int(int(np.argmax(row)) not in gold)
            mass += float(row[gold].sum())
    return AlignmentScore(tokens, errors, mass / tokens if tokens else 0.0)


def iso_target_fields(target_tokens: Sequence[str]) -> dict[str, list[int]]:
    """Field → target token indices for a character-level ISO date (one token a character)."""
    return {field: [i for i in range(start, end) if i < len(target_tokens)]
            for field, (start, end) in ISO_FIELDS.items()}  # fmt: skip


def combine(scores: Sequence[AlignmentScore]) -> AlignmentScore:
    tokens = sum(s.tokens for s in scores)
    mass = sum(s.mass * s.tokens for s in scores) / tokens if tokens else 0.0
    return AlignmentScore(tokens, sum(s.errors for s in scores), mass)


def pointing_hit(rollout: np.ndarray, box: Sequence[int], image_size: tuple[int, int]) -> bool:
    """Does the centre of the rollout's strongest patch fall inside ``box`` (top, left, bottom,
    right; bottom/right exclusive) of an image of ``image_size`` (height, width)?"""
    rows, cols = rollout.shape
    r, c = np.unravel_index(int(np.argmax(rollout)), rollout.shape)
    y = (r + 0.5) * image_size[0] / rows
    x = (c + 0.5) * image_size[1] / cols
    top, left, bottom, right = box
    return bool(top <= y < bottom and left <= x < right)
