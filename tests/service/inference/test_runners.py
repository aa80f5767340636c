"""The runners on the tiny exported models, without Ray or HTTP: typed jobs in, typed results out;
a work split into parts joins back in order and equal to the whole; a dynamically quantized model
answers a row the same inside a batch as alone; a float16 model answers as fp32 does, in float32;
answers too large are refused up front."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.errors import InvalidInput, PayloadTooLarge, ResponseTooLarge
from service.inference.jobs import Classified, ClassifyJob, Translated, TranslateJob
from service.inference.repository import load_entry
from service.inference.runners import ClassificationRunner, TranslationRunner, batch_dependent, make_runner
from service.settings import Limits
from tests.service.test_app import canvas_png

pytestmark = pytest.mark.slow
CPU = ["CPUExecutionProvider"]
DATES = ["3 juin 1980", "July 4, 1976", "31.12.1999", "Samstag, 15. Mai 1976", "1 janvier 2000"]


def runner(
    repository: Path, name: str, limits: Limits | None = None
) -> TranslationRunner | ClassificationRunner:
    return make_runner(load_entry(repository, name, 1), CPU, 1, limits or Limits())  # type: ignore[return-value]


def test_translation_split_parts_join_back_in_order(tiny_repository: Path) -> None:
    r = runner(tiny_repository, "dates-transformer")
    assert isinstance(r, TranslationRunner)
    work = r.preprocess(TranslateJob(texts=DATES, beam_size=2, attention="all"))
    whole = r.postprocess(work, r.infer([work])[0])
    parts = r.split(work, 2)
    assert [r.size(p) for p in parts] == [2, 2, 1]
    joined = r.postprocess(work, r.join(r.infer(parts)))
    assert isinstance(whole, Translated) and isinstance(joined, Translated)
    assert [t.text for t in joined.translations] == [t.text for t in whole.translations]
    for a, b in zip(joined.translations, whole.translations, strict=True):
        assert abs(a.score - b.score) < 1e-4 and np.allclose(a.attention, b.attention, atol=1e-4)
    assert whole.translations[0].attention.ndim == 4  # (T, layers, heads, S) kept for "all"


def test_no_attention_asked_none_kept(tiny_repository: Path) -> None:
    r = runner(tiny_repository, "dates-bahdanau")
    work = r.preprocess(TranslateJob(texts=DATES[:2]))
    result = r.postprocess(work, r.infer([work])[0])
    assert isinstance(result, Translated) and all(t.attention.size == 0 for t in result.translations)
    assert result.tokens_generated == sum(len(t.target_tokens) for t in result.translations)


def test_an_answer_too_large_is_refused_before_any_work(tiny_repository: Path) -> None:
    # 5 texts × 17 steps × ~15 source tokens × (1 + 2 layers × 4 heads) values × 9 bytes ≈ 100 kB
    r = runner(tiny_repository, "dates-transformer", Limits(max_response_bytes=64 * 1024))
    with pytest.raises(ResponseTooLarge, match=r"limits\.max_response_bytes.*attention_layers 'default'"):
        r.preprocess(TranslateJob(texts=DATES, attention="all"))
    r.preprocess(TranslateJob(texts=DATES, attention="default"))  # a ninth of it fits
    with pytest.raises(ResponseTooLarge) as refused:  # without every layer: that is no way out
        r.preprocess(TranslateJob(texts=DATES * 9, attention="default"))
    assert refused.value.message.endswith("ask for fewer texts or a smaller max_length")


def test_a_text_over_the_source_limit_is_refused_unless_truncated(tiny_repository: Path) -> None:
    r = runner(tiny_repository, "dates-transformer")
    assert isinstance(r, TranslationRunner)
    limit = r.translator.spec.max_source_tokens
    long = "3 juin 1980, " * limit  # a character model: one token per character
    with pytest.raises(PayloadTooLarge, match=rf"text\[1\]: {len(long) + 1} source tokens exceed "
                       rf"dates-transformer's limit of {limit} \(set truncate to true"):  # fmt: skip
        r.preprocess(TranslateJob(texts=[DATES[0], long]))
    work = r.preprocess(TranslateJob(texts=[DATES[0], long], truncate=True))
    assert [len(i) for i in work.ids] == [len(DATES[0]) + 1, limit]  # EOS last, as in training
    assert work.tokens[1][-1] == "</s>" and "".join(work.tokens[1][:-1]) == long[: limit - 1]
    r.preprocess(TranslateJob(texts=[long[: limit - 1]]))  # exactly the limit (with EOS): no refusal
    with pytest.raises(PayloadTooLarge, match=r"^TEXT\[0\]: "):  # the protocol's own name (KServe v2)
        r.preprocess(TranslateJob(texts=[long], field="TEXT"))


def test_classification_typed_result(tiny_repository: Path) -> None:
    r = runner(tiny_repository, "fashion-vit")
    assert isinstance(r, ClassificationRunner)
    work = r.preprocess(ClassifyJob(image=canvas_png(1)[0], top_k=3, attention="all", head_fusion="max"))
    result = r.postprocess(work, r.infer([work])[0])
    assert isinstance(result, Classified)
    assert len(result.indices) == 3 and result.labels[0] == r.spec.labels[result.indices[0]]
    assert np.all(np.diff(result.probabilities) <= 0)
    assert result.rollout is not None and result.rollout.shape == r.spec.grid
    assert result.attentions is not None and result.rollout_kind == "rollout-max"
    pixels = r.preprocess(ClassifyJob(pixels=canvas_png(1)[1], top_k=3))
    from_pixels = r.postprocess(pixels, r.infer([pixels])[0])
    assert isinstance(from_pixels, Classified) and list(from_pixels.indices) == list(result.indices)


def test_a_batch_without_attention_runs_logits_alone_with_the_same_answers(tiny_repository: Path) -> None:
    """Nobody in the batch asked for attention: the graph's attention output is not fetched, and
    every answer equals the one a batch with attention gives; one asker brings it back."""
    r = runner(tiny_repository, "fashion-vit")
    assert isinstance(r, ClassificationRunner)
    plain = [r.preprocess(ClassifyJob(image=canvas_png(seed)[0], top_k=10)) for seed in range(5)]
    asking = r.preprocess(ClassifyJob(image=canvas_png(9)[0], top_k=10, attention="default"))
    without = r.infer(plain)
    assert all(o.attentions is None for o in without)
    mixed = r.infer([*plain, asking])
    assert all(o.attentions is not None for o in mixed)
    for work, a, b in zip(plain, without, mixed, strict=False):
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-6)
        ra, rb = r.postprocess(work, a), r.postprocess(work, b)
        assert isinstance(ra, Classified) and isinstance(rb, Classified)
        assert list(ra.indices) == list(rb.indices) and ra.rollout is None
    answer = r.postprocess(asking, mixed[-1])
    assert isinstance(answer, Classified) and answer.rollout is not None


def test_a_dynamically_quantized_model_answers_a_row_alike_in_any_batch(tiny_repository: Path) -> None:
    r = runner(tiny_repository, "fashion-vit-int8")
    assert batch_dependent(r.entry) and not batch_dependent(runner(tiny_repository, "fashion-vit").entry)
    works = [r.preprocess(ClassifyJob(image=canvas_png(seed)[0], top_k=10)) for seed in range(6)]
    batched = r.infer(works)
    for work, together in zip(works, batched, strict=True):
        [alone] = r.infer([work])
        assert np.array_equal(alone.probabilities, together.probabilities)


#: how far a float16 model's answers may be from fp32's: probabilities and attention values, and
#: translation scores (sums of ~12 log-probabilities) — measured ≤ 1.5e-3 and ≤ 1.7e-3 here,
#: ≤ 7e-3 for fashion-vit's attention
FP16_ATTENTION, FP16_SCORE = 1e-2, 2e-2


def answer(r: TranslationRunner | ClassificationRunner, job: ClassifyJob | TranslateJob) -> object:
    work = r.preprocess(job)  # type: ignore[arg-type]
    return r.postprocess(work, r.infer([work])[0])


def test_a_float16_model_classifies_as_fp32_does(tiny_repository: Path, fp16_repository: Path) -> None:
    full, half = runner(tiny_repository, "fashion-vit"), runner(fp16_repository, "fashion-vit-fp16")
    half.warmup()
    for seed in range(5):
        job = ClassifyJob(image=canvas_png(seed)[0], top_k=3, attention="all")
        a, b = answer(full, job), answer(half, job)
        assert isinstance(a, Classified) and isinstance(b, Classified)
        assert b.indices[0] == a.indices[0]
        assert b.rollout is not None and b.attentions is not None
        assert a.rollout is not None and a.attentions is not None
        for values in (b.probabilities, b.rollout, b.attentions):  # answers stay float32
            assert values.dtype == np.float32
        assert np.abs(b.probabilities - a.probabilities).max() <= FP16_ATTENTION
        assert np.abs(b.attentions - a.attentions).max() <= FP16_ATTENTION
        assert np.abs(b.rollout - a.rollout).max() <= FP16_ATTENTION


@pytest.mark.parametrize("name", ["dates-bahdanau", "dates-transformer"])
def test_a_float16_model_translates_as_fp32_does(
    name: str, tiny_repository: Path, fp16_repository: Path
) -> None:
    full, half = runner(tiny_repository, name), runner(fp16_repository, f"{name}-fp16")
    job = TranslateJob(texts=DATES, beam_size=2, attention="all")
    a, b = answer(full, job), answer(half, job)
    assert isinstance(a, Translated) and isinstance(b, Translated)
    for x, y in zip(a.translations, b.translations, strict=True):
        assert y.target_tokens == x.target_tokens
        assert y.attention.dtype == np.float32
        assert np.abs(y.attention - x.attention).max() <= FP16_ATTENTION
        assert abs(y.score - x.score) <= FP16_SCORE


def test_image_refusals_name_the_request_as_its_protocol_spells_it(tiny_repository: Path) -> None:
    """A v2 request's every-layer answer is refused with the v2 way out (the ROLLOUT output, not
    ATTENTIONS; REST's is ``attention_layers``), and bad pixel rows are named PIXELS[i] (REST:
    ``pixels``)."""
    from service.api import kserve
    from service.inference.manifest import Manifest

    r = runner(tiny_repository, "fashion-vit", Limits(max_response_bytes=64 * 1024))  # every layer: ~197 kB
    manifest = Manifest.load(tiny_repository / "fashion-vit" / "1")
    png = canvas_png()[0]
    image = kserve.Tensor("IMAGE", "BYTES", [1], np.array([png], dtype=np.object_))
    [job] = kserve.to_requests(manifest, [image], {}, ["LABELS", "ATTENTIONS"])
    with pytest.raises(ResponseTooLarge, match=r"ask for the ROLLOUT output instead of ATTENTIONS") as v2:
        r.preprocess(job)
    assert "attention_layers" not in v2.value.message
    rest = ClassifyJob(image=png, attention="all")
    with pytest.raises(ResponseTooLarge, match=r"attention_layers 'rollout'"):
        r.preprocess(rest)
    rows = np.full((2, 4, 4), np.nan, dtype=np.float32)
    jobs = kserve.to_requests(manifest, [kserve.Tensor("PIXELS", "FP32", [2, 4, 4], rows)], {}, ["LABELS"])
    with pytest.raises(InvalidInput, match=r"^PIXELS\[1\]: values must be finite"):
        r.preprocess(jobs[1])
    with pytest.raises(InvalidInput, match=r"^pixels: values must be finite"):
        r.preprocess(ClassifyJob(pixels=rows[0]))
