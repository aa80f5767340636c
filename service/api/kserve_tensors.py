"""KServe v2 tensors on the wire, transport-free: JSON data, raw little-endian bytes (the binary
extension over HTTP, ``raw_input_contents`` over gRPC) and BYTES elements (a 4-byte length each),
decoded into :class:`Tensor` objects under a size bound, every problem an :class:`InvalidInput`
naming the tensor. A request's BYTES tensor is refused past ``max_items`` elements from its
shape, before any element is decoded: one element per text or encoded image, and decoding
millions of one-byte elements held the event loop for seconds before the per-request limits
were looked at."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.api import json_body
from service.errors import InvalidInput, PayloadTooLarge

NUMPY_OF = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}
#: per numpy dtype (``dtype.name`` is a Python property, slow on every tensor of every answer)
DATATYPE_BY_DTYPE = {np.dtype(v): k for k, v in NUMPY_OF.items()}
#: the little-endian dtype of each datatype, as raw tensor contents are read
_LITTLE_ENDIAN = {k: np.dtype(v).newbyteorder("<") for k, v in NUMPY_OF.items() if k != "BYTES"}


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray  # BYTES: an object array of ``bytes``


# -- BYTES serialisation (binary extension and gRPC raw contents) ---------------------------------


def serialize_bytes(data: np.ndarray) -> bytes:
    """Each element as a 4-byte little-endian length and its bytes, row-major."""
    out = bytearray()
    for item in data.ravel():
        raw = item if isinstance(item, bytes) else str(item).encode("utf-8")
        out += len(raw).to_bytes(4, "little") + raw
    return bytes(out)


def deserialize_bytes(buffer: bytes, count: int, name: str) -> np.ndarray:
    """``count`` elements, each a 4-byte little-endian length and its bytes; data holding more
    or fewer is refused (more: as soon as the count is reached, not after reading them all)."""
    items: list[bytes] = []
    offset = 0
    while offset < len(buffer):
        if len(items) == count:
            raise InvalidInput(f"{name}: data holds more than the {count} elements of its shape")
        if offset + 4 > len(buffer):
            raise InvalidInput(f"{name}: truncated BYTES element header")
        size = int.from_bytes(buffer[offset : offset + 4], "little")
        offset += 4
        if offset + size > len(buffer):
            raise InvalidInput(f"{name}: BYTES element of {size} bytes overruns the tensor data")
        items.append(buffer[offset : offset + size])
        offset += size
    if len(items) != count:
        raise InvalidInput(f"{name}: shape needs {count} elements, data holds {len(items)}")
    array = np.empty(count, dtype=np.object_)
    array[:] = items
    return array


def from_raw(name: str, datatype: str, shape: Any, raw: bytes, max_items: int | None = None) -> Tensor:
    """A tensor from raw little-endian bytes (binary extension, gRPC raw_input_contents);
    ``max_items``: a request's bound on BYTES elements (None: an answer's, unbounded)."""
    dims = _check_shape(name, shape)
    count = math.prod(dims)
    if datatype == "BYTES":
        _check_items(name, count, max_items)
        return Tensor(name, datatype, dims, deserialize_bytes(raw, count, name).reshape(dims))
    _numpy_dtype(name, datatype)  # refuses a datatype that is not one of NUMPY_OF's
    dtype = _LITTLE_ENDIAN[datatype]
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(f"{name}: {len(raw)} bytes of data do not fit shape {dims} of {datatype}")
    return Tensor(name, datatype, dims, np.frombuffer(raw, dtype=dtype).reshape(dims))


def from_list(name: str, datatype: str, shape: Any, data: Any, max_items: int | None = None) -> Tensor:
    """A tensor from JSON data (flat or nested lists; strings for BYTES) or gRPC's typed contents
    (a repeated field, read by numpy without a list of Python numbers); ``max_items`` as for
    :func:`from_raw`."""
    dims = _check_shape(name, shape)
    count = math.prod(dims)
    if datatype == "BYTES":
        _check_items(name, count, max_items)
        # flat data holds count elements, nested data dims[0] (≤ count) lists: more is refused unread
        if not isinstance(data, Sequence) or len(data) > max(count, 1):
            raise InvalidInput(f"{name}: BYTES data must be {count} strings for shape {dims}")
        flat = np.array(data, dtype=np.object_).ravel()
        if flat.size != count or not all(isinstance(x, str | bytes) for x in flat):
            raise InvalidInput(f"{name}: BYTES data must be {count} strings for shape {dims}")
        array = np.empty(count, dtype=np.object_)
        array[:] = [x.encode("utf-8") if isinstance(x, str) else x for x in flat]
        return Tensor(name, datatype, dims, array.reshape(dims))
    dtype = _numpy_dtype(name, datatype)
    try:
        array = json_body.array(data, dtype).ravel()
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(f"{name}: data is not a rectangular array of {datatype}") from exc
    if array.size != count:
        raise InvalidInput(f"{name}: shape {dims} needs {count} values, data holds {array.size}")
    return Tensor(name, datatype, dims, array.reshape(dims))


def _numpy_dtype(name: str, datatype: str) -> Any:
    if datatype not in NUMPY_OF:
        raise InvalidInput(f"{name}: unknown datatype {datatype!r}")
    return NUMPY_OF[datatype]


MAX_ELEMENTS = 64 * 1024 * 1024
MAX_DIMS = 8
#: input and output tensors per request (the models here take one and answer at most five),
#: parameters per request: a message of millions of empty entries fits the size limits
MAX_INPUTS = MAX_OUTPUTS = 16
MAX_PARAMETERS = 64


def check_counts(inputs: int, outputs: int, parameters: int) -> None:
    """Refuse a request of more tensors or parameters than the bounds above, before any is read."""
    for what, count, most in (("inputs", inputs, MAX_INPUTS), ("outputs", outputs, MAX_OUTPUTS),
                              ("parameters", parameters, MAX_PARAMETERS)):  # fmt: skip
        if count > most:
            raise InvalidInput(f"{what}: {count} entries, at most {most} per request")


def _check_shape(name: str, shape: Any) -> list[int]:
    if (
        not isinstance(shape, list)
        or not all(type(d) is int and d >= 0 for d in shape)  # JSON true / false are not dimensions
        or len(shape) > MAX_DIMS
    ):
        raise InvalidInput(f"{name}: shape must be a list of at most {MAX_DIMS} non-negative integers")
    # zeros counted as ones: beside a zero the product passes, and numpy still refuses a shape
    # whose other dimensions multiply past what it can address
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise InvalidInput(f"{name}: shape {shape} is too large")
    return list(shape)


def _check_items(name: str, count: int, max_items: int | None) -> None:
    if max_items is not None and count > max_items:
        raise PayloadTooLarge(
            f"{name}: shape holds {count} elements, over the limit of {max_items} texts or images per request"
        )
