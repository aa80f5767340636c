"""The gRPC codec's hand-off of arrays to protobuf (``service/api/grpc_codec.py``): an
``attention.v1.Tensor`` written as wire bytes is the message protobuf builds from the values."""

from __future__ import annotations

import numpy as np
import pytest

from service.api.grpc_codec import tensor_bytes
from service.api.protos import attention_pb2 as apb


@pytest.mark.parametrize(
    "values",
    [
        np.zeros((0,), np.float32),
        np.zeros((3, 0), np.float32),
        np.array([0.1, -2.5, np.inf, 1e-40], np.float32),  # a subnormal, an infinity
        np.arange(12, dtype=np.float64).reshape(3, 4) / 7,  # float64 written as float32
        np.random.default_rng(0).random((5, 128, 64), dtype=np.float32)[:, ::2, 1::3],  # strided
        np.random.default_rng(1).random((200, 300)).astype(np.float32),  # a length of 3 varint bytes
    ],
    ids=["empty", "no-columns", "special", "float64", "strided", "large"],
)
def test_tensor_bytes_parse_to_the_tensor_protobuf_builds_from_the_values(values: np.ndarray) -> None:
    built = apb.Tensor(shape=list(values.shape), values=values.astype(np.float32).ravel().tolist())
    parsed = apb.Tensor.FromString(tensor_bytes(values))
    assert parsed == built
    assert list(parsed.shape) == list(values.shape)
    np.testing.assert_array_equal(np.array(parsed.values, np.float32), values.astype(np.float32).ravel())
    message = apb.Translation(text="t")
    message.attention.MergeFromString(tensor_bytes(values))  # as the codec fills an answer
    assert message.attention == built and message.text == "t"


def test_a_nan_survives_as_a_nan() -> None:
    parsed = apb.Tensor.FromString(tensor_bytes(np.array([np.nan, 1.0], np.float32)))
    assert np.isnan(parsed.values[0]) and parsed.values[1] == 1.0
