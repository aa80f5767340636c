"""JSON bodies parsed and answers written without holding the event loop: the value limit, the
sliced conversion of arrays, the sliced writing of answers."""

from __future__ import annotations

import asyncio
import threading
import weakref

import numpy as np
import orjson
import pytest

from service.api import json_body, rest_codec
from service.api.schemas import ClassifyOptions
from service.errors import PayloadTooLarge
from service.inference.jobs import Answer, AnswerMetrics, Classified


def test_a_body_over_the_value_limit_is_refused_before_parsing() -> None:
    """Counted: commas, and brackets (a list is a value to parse as a number is)."""
    body = orjson.dumps({"pixels": [[0] * 100] * 100})  # 9,999 commas, 101 lists, 1 object
    json_body.check_values(body, 10_101)
    with pytest.raises(PayloadTooLarge, match=r"^body: 10,101 JSON values, over the limit of 10,100"):
        json_body.check_values(body, 10_100)
    nested = b"[" + b",".join([b"[" * 50 + b"0" + b"]" * 50] * 100) + b"]"  # 99 commas, 5,001 lists
    with pytest.raises(PayloadTooLarge, match=r"^body: 5,100 JSON values"):
        json_body.check_values(nested, 5_000)


@pytest.mark.parametrize(
    "data",
    [
        3,
        [],
        [1.5],
        list(range(200_000)),
        [[i % 256] * 1000 for i in range(300)],
        [[[i, i, i]] * 500 for i in range(200)],
        np.arange(3 * 70_000).reshape(3, 70_000).tolist(),  # rows larger than a slice
        np.arange(300 * 300).reshape(1, 300, 300).tolist(),  # one image as KServe's [1, H, W]
        np.arange(2 * 300 * 300 * 3).reshape(2, 300, 300, 3).tolist(),
        [[]] * 5,
    ],
    ids=["scalar", "empty", "one", "flat", "rows", "rgb", "wide", "one-image", "two-rgb", "empties"],
)
def test_arrays_are_converted_in_slices_to_what_numpy_gives(data: object) -> None:
    got = json_body.array(data, np.float32)
    want = np.asarray(data, dtype=np.float32)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "data",
    [
        [[1, 2]] * 70_000 + [[1, 2, 3]],  # a longer row in the last slice only
        [[1, 2]] * 70_000 + [[1]] * 70_000,  # each slice rectangular, different widths
        [1] * 70_000 + [[1]],
        [1] * 70_000 + ["x"],
        [[1, 2], [3]],
        [np.zeros((300, 300)).tolist(), np.zeros((300, 299)).tolist()],  # rows of a slice each
        [np.zeros((300, 300)).tolist(), 1],
    ],
    ids=["last-row", "slices", "nested-late", "string", "ragged", "large-rows", "large-and-scalar"],
)
def test_ragged_or_non_numeric_arrays_are_refused_as_numpy_refuses_them(data: list) -> None:
    with pytest.raises((ValueError, TypeError)):
        json_body.array(data, np.float64)


@pytest.mark.parametrize(
    "shape",
    [(0,), (5,), (json_body.SLICE,), (json_body.SLICE + 1,), (3 * json_body.SLICE + 7, 1), (3, 70_000),
     (1, 200_000), (2, 3, 40_000), (300, 500, 3)],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_answers_are_written_in_slices_as_their_values(shape: tuple[int, ...], dtype: type) -> None:
    values = (np.random.default_rng(len(shape)).random(shape) * 1000).astype(dtype)
    text = orjson.dumps({"data": json_body.numbers(values)})
    parsed = np.asarray(orjson.loads(text)["data"], dtype=dtype)
    assert parsed.shape == values.shape
    np.testing.assert_array_equal(parsed, values)  # float32 written shortest: the same float32


def test_a_float32_answer_is_written_as_float32_and_nan_as_null() -> None:
    text = orjson.dumps(json_body.numbers(np.array([0.1, np.nan, 1e-8], dtype=np.float32)))
    assert text == b"[0.1,null,1e-8]"


def test_heavy_work_runs_in_a_thread_and_light_work_on_the_loop() -> None:
    async def where(heavy: bool) -> bool:
        return await json_body.off_loop(heavy, lambda: threading.current_thread() is threading.main_thread())

    assert asyncio.run(where(False)) and not asyncio.run(where(True))
    assert not json_body.heavy(json_body.IN_THREAD_BYTES - 1) and json_body.heavy(json_body.IN_THREAD_BYTES)


def test_rest_attention_past_a_slice_is_written_in_slices_and_its_answer_in_a_thread() -> None:
    """A REST answer's attention arrays: rounded to 6 decimals whatever their size, written in
    slices past :data:`json_body.SLICE` values, and such an answer built in a worker thread."""
    small, large = (np.random.default_rng(2).random(shape) for shape in ((4, 7), (6, 8, 30, 50)))
    for values in (small, large):
        written = orjson.loads(
            orjson.dumps({"v": rest_codec.rounded(values)}, option=orjson.OPT_SERIALIZE_NUMPY)
        )
        np.testing.assert_array_equal(np.asarray(written["v"]), np.round(values, 6))
    assert isinstance(rest_codec.rounded(large), orjson.Fragment)
    assert not isinstance(rest_codec.rounded(small), orjson.Fragment)
    options = ClassifyOptions(return_attention=True, attention_format="array", attention_layers="all")
    answer = Answer("m", 1, Classified(np.arange(5), np.full(5, 0.2), list("abcde"), np.zeros((28, 28), np.uint8),
                                       rollout=small, attentions=small), AnswerMetrics(0, 0, 1, None, "r", "n"))  # fmt: skip
    assert not rest_codec.heavy(answer, options)
    answer.result.attentions = large  # type: ignore[union-attr]
    assert rest_codec.heavy(answer, options)


def test_what_a_refused_body_holds_is_freed_in_the_thread() -> None:
    """A refusal raised in the worker thread: the parsed body its traceback's frames hold is freed
    there, not on the event loop when the refusal is answered (1M values took 19 ms to free)."""
    held: list[weakref.ref] = []

    def work() -> None:
        parsed = np.zeros(1000)
        held.append(weakref.ref(parsed))
        raise PayloadTooLarge("body: too much")

    with pytest.raises(PayloadTooLarge) as refused:
        asyncio.run(json_body.off_loop(True, work))
    assert refused.value.args == ("body: too much",) and held[0]() is None
