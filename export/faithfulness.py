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
from pathlib import Path

import numpy as np

from export import evaluate
from export.data import dates, fashion
from export.data.tokenizer import char_span_to_tokens
from service.inference.attention import last_layer_cls, rollout
from service.inference.manifest import Manifest
from service.inference.translation import Translator

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


def alignment_of(attention: np.ndarray, layer: int = -1) -> np.ndarray:
    """(T, S) for scoring: an RNN's weights, or one layer of a Transformer (``(T, layers, heads,
    S)``) averaged over heads — by default the last, the map the service shows by default."""
    return attention if attention.ndim == 2 else attention[:, layer].mean(axis=1)


def translation_faithfulness(
    directory: Path,
    manifest: Manifest,
    examples: Sequence[dates.DateExample],
    batch: int = 256,
) -> AlignmentScore:
    """Alignment error rate of a ``dates`` model's attention over ``examples`` (greedy search),
    on the map the service shows by default."""
    return translation_faithfulness_by_layer(directory, manifest, examples, batch)[-1]


def translation_faithfulness_by_layer(
    directory: Path, manifest: Manifest, examples: Sequence[dates.DateExample], batch: int = 256
) -> list[AlignmentScore]:
    """One score per decoder layer (heads averaged) from a single decode; one for an RNN."""
    assert manifest.translation is not None
    layers = manifest.translation.num_layers if manifest.translation.decoder != "rnn" else 1
    translator = Translator(directory, manifest, ["CPUExecutionProvider"], threads=2)
    scores: list[list[AlignmentScore]] = [[] for _ in range(layers)]
    for i in range(0, len(examples), batch):
        chunk = examples[i : i + batch]
        for result, example in zip(translator.translate([ex.source for ex in chunk]), chunk, strict=True):
            offsets = translator.source_tokenizer.encode(example.source).offsets
            gold = {field: char_span_to_tokens(offsets, span) for field, span in example.spans.items()}
            fields = iso_target_fields(result.target_tokens)
            for layer in range(layers):
                scores[layer].append(score_alignment(alignment_of(result.attention, layer), fields, gold))
    return [combine(s) for s in scores]


#: the maps the pointing game compares: rollout with each head fusion, and raw last-layer CLS
VISION_MAPS = ("rollout-mean", "rollout-max", "rollout-min", "last-layer-cls")


def vision_maps(attentions: np.ndarray, prefix_tokens: int = 1) -> dict[str, np.ndarray]:
    """Each of :data:`VISION_MAPS` for one image's attentions (layers, heads, T, T), flat over
    the patches."""
    return {
        "rollout-mean": rollout(attentions, "mean", prefix_tokens=prefix_tokens),
        "rollout-max": rollout(attentions, "max", prefix_tokens=prefix_tokens),
        "rollout-min": rollout(attentions, "min", prefix_tokens=prefix_tokens),
        "last-layer-cls": last_layer_cls(attentions, prefix_tokens=prefix_tokens),
    }


def pointing_game(directory: Path, manifest: Manifest, canvases: fashion.Canvases) -> dict[str, float]:
    """Share of canvases whose map's maximum falls inside the object's box, per map."""
    assert manifest.image is not None
    prefix, grid_shape = manifest.image.prefix_tokens, manifest.image.grid
    _, attentions = evaluate.classify(directory, manifest, fashion.normalise(canvases.images))
    size = canvases.images.shape[1:3]
    hits = dict.fromkeys(VISION_MAPS, 0)
    for att, box in zip(attentions, canvases.boxes, strict=True):  # att: (layers, heads, T, T)
        for name, grid in vision_maps(att, prefix).items():
            hits[name] += pointing_hit(grid.reshape(grid_shape), box, size)
    return {name: n / len(canvases.labels) for name, n in hits.items()}
