"""KServe v2 tensors on the wire: BYTES serialisation and raw numeric tensors, and the lies they can tell."""

from __future__ import annotations

import numpy as np
import pytest

from service.api import kserve_tensors
from service.errors import InvalidInput


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
        (b"\x01\x00\x00\x00a\x01\x00\x00\x00b", 1, "holds 2"),
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
