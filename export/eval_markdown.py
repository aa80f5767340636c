"""The Markdown page of ``make eval``: tables side by side, each goal with its verdict."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from export.variants import DRIFT_SAMPLES

if TYPE_CHECKING:
    from export.eval_report import ModelEval, Sizes

#: what each family's map is, in words
ATTENTION = {
    "rnn-additive": "Bahdanau (additive)",
    "rnn-dot": "Luong global, dot",
    "rnn-general": "Luong global, general",
    "rnn-concat": "Luong global, concat",
    "rnn-local-m": "Luong local-m (monotonic)",
    "rnn-local-p": "Luong local-p (predictive)",
    "transformer": "Transformer cross-attention, last layer, head mean",
}
VISION_COLUMNS = ("rollout_mean", "rollout_max", "rollout_min", "last_layer_cls")
#: the goals of issue #8, each given a verdict
AER_GOAL = 0.10
POINTING_GOAL = 0.90
PARITY_GOAL = 1e-4


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _diff(x: float | None) -> str:
    return "–" if x is None else f"{x:.1e}"


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def translation_table(models: Sequence[ModelEval]) -> list[str]:
    rows = sorted(models, key=lambda m: m.metrics["alignment_error_rate"])
    lines = [
        "## Translation: alignment error rate on the `dates` gold spans",
        "",
        "For each target character of the year, month and day, is the argmax of its attention row",
        "inside the source tokens that spell that field? AER = share of rows where it is not; mass =",
        "mean attention inside the gold span. Greedy decoding, the map the service returns by default.",
        "",
        "| model | attention | exact match | AER | mass in gold span | AER by decoder layer "
        "| service vs PyTorch max abs diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in rows:
        per_layer = sorted(k for k in m.metrics if k.startswith("alignment_error_rate_layer"))
        layers = ", ".join(
            f"L{k.removeprefix('alignment_error_rate_layer')} {_pct(m.metrics[k])}" for k in per_layer
        )
        lines.append(
            f"| `{m.name}` | {ATTENTION.get(m.family, m.family)} | {_pct(m.metrics.get('exact_match'))} "
            f"| {_pct(m.metrics['alignment_error_rate'])} | {m.metrics['alignment_mass']:.3f} "
            f"| {layers or '–'} | {_diff(m.metrics.get('service_vs_pytorch_max_abs_diff'))} |"
        )
    if rows:
        best, aer = rows[0], rows[0].metrics["alignment_error_rate"]
        lines += ["", f"Goal: AER ≤ {AER_GOAL:.0%} for the best scorer — {_verdict(aer <= AER_GOAL)}"
                      f" (`{best.name}`, {_pct(aer)})."]  # fmt: skip
    return lines


def vision_table(models: Sequence[ModelEval]) -> list[str]:
    lines = [
        "## Vision: pointing game on the `fashion` canvases",
        "",
        "Does the centre of the map's strongest patch fall inside the pasted item's box? Rollout",
        "(Abnar & Zuidema 2020) with each head fusion, and the raw last-layer CLS row as baseline.",
        "",
        "| model | accuracy | rollout, mean | rollout, max | rollout, min | last-layer CLS "
        "| service vs PyTorch max abs diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in models:
        cells = " | ".join(_pct(m.metrics.get(f"pointing_game_{c}")) for c in VISION_COLUMNS)
        lines.append(
            f"| `{m.name}` | {_pct(m.metrics.get('accuracy'))} | {cells} "
            f"| {_diff(m.metrics.get('service_vs_pytorch_max_abs_diff'))} |"
        )
    for m in models:
        share = m.metrics["pointing_game_rollout_mean"]
        verdict = _verdict(share >= POINTING_GOAL)
        lines += ["", f"Goal: pointing game ≥ {POINTING_GOAL:.0%} (rollout, mean fusion: the service's "
                      f"default) for `{m.name}` — {verdict} ({_pct(share)})."]  # fmt: skip
    return lines


def int8_table(models: Sequence[ModelEval]) -> list[str]:
    """The int8 section, or nothing when int8 was not measured (``--no-int8``)."""
    if not any(m.int8 for m in models):
        return []
    lines = [
        "## Quantised (ONNX Runtime dynamic int8) next to fp32",
        "",
        f"Map drift over {DRIFT_SAMPLES} held-out inputs: Pearson correlation of all attention values",
        "and the share of attention rows whose argmax is unchanged.",
        "",
        "| model | fp32 | int8 | map correlation | argmax agreement | faithfulness fp32 → int8 |",
        "|---|---|---|---|---|---|",
    ]
    for m in models:
        if not m.int8:
            continue
        key = "exact_match" if "exact_match" in m.int8 else "accuracy"
        score = "alignment_error_rate" if key == "exact_match" else "pointing_game_rollout_mean"
        label = "AER" if key == "exact_match" else "pointing game"
        lines.append(
            f"| `{m.name}` | {key.replace('_', ' ')} {_pct(m.metrics.get(key))} | {_pct(m.int8.get(key))} "
            f"| {m.int8['attention_correlation']:.4f} | {_pct(m.int8['attention_argmax_agreement'])} "
            f"| {label} {_pct(m.metrics.get(score))} → {_pct(m.int8.get(score))} |"
        )
    return lines


def parity_lines(models: Sequence[ModelEval]) -> list[str]:
    measured = {m.name: m.metrics["service_vs_pytorch_max_abs_diff"] for m in models
                if "service_vs_pytorch_max_abs_diff" in m.metrics}  # fmt: skip
    if not measured:
        return ["## Service vs PyTorch", "", "Not measured: no matching checkpoints."]
    worst = max(measured, key=lambda n: measured[n])
    return [
        "## Service vs PyTorch",
        "",
        "The service's own code (tokeniser, one padded batch, numpy greedy decoder, rollout) against the",
        "PyTorch model on the same inputs, teacher-forced on the service's tokens: every attention value",
        "and every rollout / CLS map compared.",
        "",
        f"Goal: ≤ {PARITY_GOAL:.0e} for every model — {_verdict(measured[worst] <= PARITY_GOAL)} "
        f"({len(measured)} models; largest {_diff(measured[worst])}, `{worst}`).",
    ]


def render(results: Sequence[ModelEval], skipped: Sequence[str], sizes: Sizes, stamp: datetime) -> str:
    translation = [r for r in results if r.task == "translation"]
    vision = [r for r in results if r.task == "image-classification"]
    int8 = int8_table(results)
    int8 += [""] if int8 else []
    lines = [
        f"# Attention faithfulness — {stamp:%Y-%m-%d}",
        "",
        f"`make eval`: {sizes.dates} held-out dates, {sizes.canvases} test canvases, {sizes.parity} inputs",
        "per model for the PyTorch comparison; all through ONNX Runtime on CPU, on the exported graphs.",
        "",
        *([*translation_table(translation), ""] if translation else []),
        *([*vision_table(vision), ""] if vision else []),
        *int8,
        *parity_lines(results),
    ]
    notes = [f"- `{r.name}`: {n}" for r in results for n in r.notes] + [f"- {s}" for s in skipped]
    if notes:
        lines += ["", "## Not scored", "", *notes]
    return "\n".join(lines) + "\n"
