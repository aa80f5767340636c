"""The request limits at the API edge: one Settings.limits object checks every protocol's jobs
(naming the field), and the same object writes the OpenAPI document and the KServe metadata."""

from __future__ import annotations

import numpy as np
import pytest

from service.api import limits
from service.errors import InvalidInput, PayloadTooLarge
from service.inference.jobs import ClassifyJob, TranslateJob
from service.settings import Limits

LIMITS = Limits(
    max_texts=2,
    max_text_chars=5,
    max_beam_size=3,
    max_image_bytes=2048,
    max_image_pixels=64,
    max_top_k=7,
    max_images=3,
)


@pytest.mark.parametrize(
    ("job", "error", "words"),
    [
        (TranslateJob(texts=["a", "b", "c"]), PayloadTooLarge, "text: 3 texts exceed the limit of 2"),
        (TranslateJob(texts=["ok", "too long"]), PayloadTooLarge, "text[1]: 8 characters"),
        (TranslateJob(texts=["ok", "too long"], field="TEXT"), PayloadTooLarge, "TEXT[1]: 8 characters"),
        (TranslateJob(texts=["a", "b", "c"], field="texts"), PayloadTooLarge, "texts: 3 texts exceed"),
        (TranslateJob(texts=["a"], beam_size=4), InvalidInput, "beam_size: 4 exceeds the limit of 3"),
        (ClassifyJob(image=b"x" * 2049), PayloadTooLarge, "image: 2049 bytes"),
        (ClassifyJob(image=b"x" * 2049, field="file"), PayloadTooLarge, "file: 2049 bytes"),
        (
            ClassifyJob(pixels=np.zeros((20, 20))),
            PayloadTooLarge,
            "pixels: 20×20 = 400 pixels, over the limit of 64",
        ),
        # within four values a pixel (RGBA), but more pixels than an encoded image may have: the
        # values alone let a 64-megapixel UINT8 tensor through a 16-megapixel limit
        (ClassifyJob(pixels=np.zeros((16, 16), np.uint8)), PayloadTooLarge, "pixels: 16×16 = 256 pixels"),
        (
            ClassifyJob(pixels=np.zeros((8, 8, 5))),
            PayloadTooLarge,
            "pixels: 320 values exceed the limit of 256",
        ),
        (ClassifyJob(image=b"x", top_k=8), InvalidInput, "top_k: 8 exceeds the limit of 7"),
    ],
)
def test_a_job_over_a_limit_is_refused_naming_the_field(job: object, error: type, words: str) -> None:
    with pytest.raises(error) as refused:
        limits.check(job, LIMITS)
    assert words in str(refused.value)


def test_jobs_within_the_limits_pass() -> None:
    limits.check(TranslateJob(texts=["a", "bcdef"], beam_size=3), LIMITS)
    limits.check(ClassifyJob(image=b"x" * 2048, top_k=7), LIMITS)
    limits.check(ClassifyJob(pixels=np.zeros((8, 8, 4))), LIMITS)


def test_a_request_of_more_images_than_the_limit_is_refused() -> None:
    """Each image of a KServe v2 batch holds a place in the model's queue: one request larger than
    the queue would be shed as overloaded (503) for ever; a limit answers 413 at once."""
    limits.check_count([ClassifyJob(image=b"x")] * 3, LIMITS)
    limits.check_count([TranslateJob(texts=["a"])] * 4, LIMITS)  # texts are bounded per job
    with pytest.raises(PayloadTooLarge, match="inputs: 4 images exceed the limit of 3 per request"):
        limits.check_count([ClassifyJob(image=b"x")] * 4, LIMITS)


def test_the_same_object_is_what_the_documents_show() -> None:
    assert limits.request_limits("translation", LIMITS)["max_texts"] == 2
    assert limits.request_limits("image-classification", LIMITS)["max_image_bytes"] == 2048
    assert limits.request_limits("image-classification", LIMITS)["max_images"] == 3
    schema = {"properties": {"text": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
                             "beam_size": {"maximum": 64}}}  # fmt: skip
    limits.write_openapi({"paths": [schema]}, LIMITS)
    assert schema["properties"]["beam_size"]["maximum"] == 3
    assert schema["properties"]["text"]["anyOf"][1]["maxItems"] == 2  # type: ignore[index]
