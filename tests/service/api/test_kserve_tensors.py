"""KServe v2 tensors on the wire: BYTES serialisation and raw numeric tensors, and the lies they can tell."""

from __future__ import annotations

import numpy as np
import pytest

from service.api import kserve_tensors
from service.errors import InvalidInput, PayloadTooLarge


def test_bytes_round_trip_keeps_empty_and_non_ascii_elements() -> None:
    data = np.array([b"", "mars é".encode(), b"\x00\xff"], dtype=np.object_)
    raw = kserve_tensors.serialize_bytes(data)
    assert raw[:4] == b"\x00\x00\x00\x00"
    assert kserve_tensors.deserialize_bytes(raw, 3, "T").tolist() == data.tolist()


@pytest.mark.parametrize(
    ("raw", "count", "message"),
    [
        (b"\x05\x00\x00\x00ab", 1, "overruns"),
        (b"\x01\x00", 1, "truncated"),
        (b"\x01\x00\x00\x00a\x01\x00\x00\x00b", 1, "more than the 1 elements"),
        (b"\x01\x00\x00\x00a", 2, "holds 1"),
    ],
)
def test_bytes_that_lie_about_lengths_are_refused(raw: bytes, count: int, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        kserve_tensors.deserialize_bytes(raw, count, "T")


def test_raw_numeric_tensors_check_their_byte_length() -> None:
    t = kserve_tensors.from_raw("P", "FP32", [2, 2], np.arange(4, dtype="<f4").tobytes())
    assert t.data.tolist() == [[0, 1], [2, 3]]
    with pytest.raises(InvalidInput, match="do not fit"):
        kserve_tensors.from_raw("P", "FP32", [2, 3], np.arange(4, dtype="<f4").tobytes())
    with pytest.raises(InvalidInput, match="datatype"):
        kserve_tensors.from_raw("P", "COMPLEX", [1], b"")
    with pytest.raises(InvalidInput, match="shape"):
        kserve_tensors.from_raw("P", "FP32", [-1], b"")
    with pytest.raises(InvalidInput, match="too large"):
        kserve_tensors.from_raw("P", "UINT8", [1 << 20, 1 << 20], b"")
    with pytest.raises(InvalidInput, match="too large"):  # beside a zero the product passes
        kserve_tensors.from_raw("P", "UINT8", [0, 1 << 62], b"")


@pytest.mark.parametrize("decode", ["raw", "list"])
def test_a_bytes_tensor_over_max_items_is_refused_from_its_shape(decode: str) -> None:
    with pytest.raises(PayloadTooLarge, match="T: shape holds 65 elements, over the limit of 64"):
        if decode == "raw":
            kserve_tensors.from_raw("T", "BYTES", [65], b"", max_items=64)
        else:
            kserve_tensors.from_list("T", "BYTES", [65, 1], [["a"]] * 65, max_items=64)
    # an answer's tensors (no max_items) are not bounded so
    raw = kserve_tensors.serialize_bytes(np.array([b"a"] * 65, dtype=np.object_))
    assert kserve_tensors.from_raw("T", "BYTES", [65], raw).data.shape == (65,)
