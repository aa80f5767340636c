"""The gRPC codec (``service/api/grpc_codec.py``): its hand-off of arrays to protobuf (an
``attention.v1.Tensor`` written as wire bytes is the message protobuf builds from the values), and
KServe v2 typed contents read as their datatype's values."""

from __future__ import annotations

import numpy as np
import pytest

from service.api.grpc_codec import inputs, tensor_bytes
from service.api.protos import attention_pb2 as apb
from service.api.protos import grpc_service_pb2 as pb


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


@pytest.mark.parametrize(
    ("datatype", "field", "values"),
    [
        ("UINT8", "uint_contents", [0, 7, 255]),
        ("UINT16", "uint_contents", [0, 65_535]),
        ("INT8", "int_contents", [-128, 0, 127]),
        ("INT16", "int_contents", [-32_768, 32_767]),
        ("UINT32", "uint_contents", [0, 4_294_967_295]),
    ],
)
def test_typed_contents_at_their_datatype_s_bounds_are_read_exactly(
    datatype: str, field: str, values: list[int]
) -> None:
    """(Outside the bounds they are refused: ``test_grpc_refusals``.)"""
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="X", datatype=datatype, shape=[len(values)])
    getattr(tensor.contents, field).extend(values)
    [read] = inputs(request, 100)
    assert read.data.dtype == np.dtype(datatype.lower()) and read.data.tolist() == values
