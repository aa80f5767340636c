"""JSON request bodies read, and large JSON answers written, without holding the replica's event
loop, which serves every model and protocol on the replica.

Parsing costs per value, not per byte: on the development machine orjson took 190 ms for a
7 MB body of four million zeros, pydantic 310 ms, and numpy's conversion of the lists 260 ms. One
such request (10 kB on the wire when gzip-encoded) held the loop 0.6 s. So:

- a body holds at most ``limits.max_json_values`` values, counted by their commas and brackets
  before any parsing (:func:`check_values`; a comma inside a string counts too), else 413 naming
  ``body``;
- a body of at least :data:`IN_THREAD_BYTES` is parsed in a worker thread (:func:`off_loop`), and
  its arrays converted there in slices of about :data:`SLICE` values (:func:`array`): parsing and
  conversion hold the interpreter lock, but only for one call at a time, and the lock changes
  hands between calls. The loop then waits at most for the parse itself (orjson's for KServe v2,
  pydantic's for REST), ≈ 50–100 ms at the default limit on the development machine. What a
  refused body's traceback holds is freed in the thread too.

A KServe v2 or REST JSON answer of :data:`SLICE` values or more is written in a worker thread, its
arrays by orjson in slices (:func:`numbers`): 64 images' every attention layer (29 MB of JSON)
held the loop 220 ms through ``tolist()``.

Images sent encoded (PNG, JPEG …) and tensors in KServe's binary extension or gRPC's raw contents
are the way to send large inputs: their bytes are not parsed value by value.
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import orjson

from service.errors import PayloadTooLarge
from service.inference.jobs import Answer, Translated

T = TypeVar("T")

#: JSON bodies at least this long are parsed in a worker thread (≈ 16,000 numbers, ≈ 2 ms of
#: parsing and conversion); shorter ones, every body of the hot paths, on the loop
IN_THREAD_BYTES = 32 * 1024
#: values converted by one numpy call (≈ 4 ms): the most the loop waits for a conversion
SLICE = 64 * 1024


def check_values(body: bytes, limit: int) -> None:
    """Refuse a JSON body of more than ``limit`` values before it is parsed: 413 naming ``body``.
    Counted: the commas between array items and object members, and every ``[`` and ``{`` (a
    container is a value too: a body of nested brackets parses as slowly as one of numbers)."""
    values = body.count(b",") + body.count(b"[") + body.count(b"{")
    if values > limit:
        raise PayloadTooLarge(
            f"body: {values:,} JSON values, over the limit of {limit:,}; send images encoded (PNG, "
            "JPEG …) or tensors in KServe's binary extension"
        )


def heavy(json_bytes: int) -> bool:
    """Whether a body of ``json_bytes`` bytes of JSON is parsed in a worker thread:
    :data:`IN_THREAD_BYTES` or more."""
    return json_bytes >= IN_THREAD_BYTES


async def off_loop(in_thread: bool, work: Callable[[], T]) -> T:
    """``work()``: in a worker thread if ``in_thread`` (a body to parse that is :func:`heavy`, an
    answer of :data:`SLICE` values or more to write), else on the loop."""
    return await asyncio.to_thread(_freeing, work) if in_thread else work()


def _freeing(work: Callable[[], T]) -> T:
    """``work()``; if it raises, the locals of the frames its traceback holds (a parsed body) are
    freed here, in the thread, not on the loop when the refusal is answered."""
    try:
        return work()
    except Exception as exc:
        seen: Exception | BaseException | None = exc
        while seen is not None:
            traceback.clear_frames(seen.__traceback__)
            seen = seen.__cause__ or seen.__context__
        raise


def array(data: Any, dtype: Any) -> np.ndarray:
    """``np.asarray(data, dtype)`` of parsed JSON (a number, or flat or nested lists), converted in
    slices of about :data:`SLICE` values along its first axis, or row by row where a row is larger
    (recursively). Raises as ``np.asarray`` does (ValueError, TypeError, OverflowError), and
    ValueError for rows of different shapes."""
    if not isinstance(data, list) or not data:
        return np.asarray(data, dtype=dtype)
    row = _first_size(data[0])  # the size of a row, if the rows are alike: not yet checked
    if len(data) * row <= SLICE:
        return np.asarray(data, dtype=dtype)
    if row > SLICE:
        parts = [array(item, dtype)[None] for item in data]
    else:
        step = SLICE // row
        parts = [np.asarray(data[i : i + step], dtype=dtype) for i in range(0, len(data), step)]
    if any(p.shape[1:] != parts[0].shape[1:] for p in parts):
        raise ValueError("rows of different shapes")
    return np.concatenate(parts)


def _first_size(item: Any) -> int:
    """How many values ``item`` holds if every list in it is as long as its first: its length
    times its first item's size, down to a number."""
    size = 1
    while isinstance(item, list):
        size *= len(item)
        if not item:
            return max(size, 1)
        item = item[0]
    return max(size, 1)


def numbers(values: np.ndarray) -> orjson.Fragment:
    """A numeric array as JSON lists of its shape (a 0-d array as a list of one; pass a flat array
    for KServe v2's flat ``data``), written by orjson in slices of about :data:`SLICE` values
    along its first axes, each value as its dtype writes it: a float32 ``0.1``, not the float64
    ``0.10000000149011612`` of ``tolist()``; NaN as ``null``."""
    return orjson.Fragment(_written(np.ascontiguousarray(values)))


def _written(values: np.ndarray) -> bytes:
    if values.size <= SLICE:
        return orjson.dumps(values, option=orjson.OPT_SERIALIZE_NUMPY)
    row = values.size // values.shape[0]
    if row > SLICE:  # each row is itself written in slices
        parts = [_written(r) for r in values]
    else:
        step = SLICE // row
        parts = [orjson.dumps(values[i : i + step], option=orjson.OPT_SERIALIZE_NUMPY)[1:-1]
                 for i in range(0, len(values), step)]  # fmt: skip
    return b"[" + b",".join(parts) + b"]"


def answer_values(answers: list[Answer]) -> int:
    """About how many numbers the answers carry at most, their attention first: with
    :data:`SLICE`, whether an answer is written in a worker thread."""
    values = 0
    for answer in answers:
        result = answer.result
        if isinstance(result, Translated):
            values += sum(t.attention.size + len(t.target_tokens) for t in result.translations)
        else:
            values += result.probabilities.size * 2 + sum(
                a.size for a in (result.rollout, result.attentions) if a is not None
            )
    return values
