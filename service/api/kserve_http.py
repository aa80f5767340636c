"""KServe v2 over HTTP: JSON tensors and the binary tensor data extension, both directions.

Binary extension: the body is a JSON header followed by raw tensor bytes; the header's length is
in ``Inference-Header-Content-Length``. Inputs with ``parameters.binary_data_size`` take their
bytes from the tail in order. An output goes binary when its own parameters say
``"binary_data": true``, or say nothing and the request sets ``"binary_data_output": true``
(tritonclient's default): an output's own ``binary_data`` overrides the request's, either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from service.api import json_body, kserve, kserve_tensors
from service.api.rest_codec import dumps
from service.errors import InvalidInput

HEADER_LENGTH = "inference-header-content-length"


@dataclass
class InferRequest:
    id: str | None
    inputs: list[kserve_tensors.Tensor]
    parameters: dict[str, Any]
    outputs: list[str]
    #: output name → its own ``binary_data`` parameter, where it gives one
    binary_outputs: dict[str, bool]
    #: the request's ``binary_data_output``: for the outputs that say nothing themselves
    binary_default: bool
    #: output name → its ``classification`` parameter (Triton's extension), where one is given
    classification: dict[str, Any]

    def binary(self, output: str) -> bool:
        return self.binary_outputs.get(output, self.binary_default)


def json_length(body: bytes, header_length: str | None) -> int:
    """How many bytes of a v2 infer body are JSON: the Inference-Header-Content-Length where it is
    a valid one, else the whole body."""
    if header_length is not None and header_length.isascii() and header_length.isdigit():
        return min(int(header_length), len(body))
    return len(body)


def parse_request(body: bytes, header_length: str | None, max_items: int, max_values: int) -> InferRequest:
    """Decode a v2 infer body; every problem becomes an :class:`InvalidInput` naming the part.
    ``max_items``: the most elements a BYTES input may hold (``limits.tensor_items``);
    ``max_values``: the most values its JSON may hold (``json_body.check_values``)."""
    if header_length is not None:
        # ASCII digits only: str.isdigit() also takes "²", which int() refuses
        if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(body):
            raise InvalidInput(
                f"Inference-Header-Content-Length: {header_length!r} does not fit a {len(body)}-byte body"
            )
        split = int(header_length)
        header_bytes, tail = body[:split], body[split:]
    else:
        header_bytes, tail = body, b""
    json_body.check_values(header_bytes, max_values)
    try:
        header = orjson.loads(header_bytes)
    except orjson.JSONDecodeError as exc:  # invalid UTF-8 too
        raise InvalidInput(f"body: not a JSON inference request ({exc.__class__.__name__})") from exc
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list) or not header["inputs"]:
        raise InvalidInput("inputs: a non-empty list of input tensors is required")
    params = _parameters(header.get("parameters"), "parameters")
    requested = header.get("outputs")
    if requested is not None and not isinstance(requested, list):
        raise InvalidInput(f"outputs: a list of output tensors, got {type(requested).__name__}")
    kserve_tensors.check_counts(len(header["inputs"]), len(requested or ()), len(params))
    inputs, offset = [], 0
    for i, spec in enumerate(header["inputs"]):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise InvalidInput(f"inputs[{i}]: needs a name, datatype and shape")
        name, datatype, shape = spec["name"], spec.get("datatype"), spec.get("shape")
        if not isinstance(datatype, str):
            raise InvalidInput(f"{name}: datatype is required")
        size = _parameters(spec.get("parameters"), name).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidInput(f"{name}: binary_data_size must be a non-negative integer, got {size!r}")
            if offset + size > len(tail):
                raise InvalidInput(
                    f"{name}: binary_data_size {size!r} overruns the {len(tail)} bytes after the header"
                )
            data = tail[offset : offset + size]
            inputs.append(kserve_tensors.from_raw(name, datatype, shape, data, max_items))
            offset += size
        elif "data" in spec:
            inputs.append(kserve_tensors.from_list(name, datatype, shape, spec["data"], max_items))
        else:
            raise InvalidInput(f"{name}: needs data, or binary_data_size with the binary extension")
    if offset != len(tail):
        raise InvalidInput(f"body: {len(tail) - offset} bytes after the header belong to no input")
    outputs: list[str] = []
    binary: dict[str, bool] = {}
    classification: dict[str, Any] = {}
    for i, spec in enumerate(requested or []):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise InvalidInput(f"outputs[{i}]: needs a name")
        outputs.append(spec["name"])
        output_params = _parameters(spec.get("parameters"), spec["name"])
        if "binary_data" in output_params:
            binary[spec["name"]] = kserve.flag(output_params, "binary_data", spec["name"])
        if "classification" in output_params:
            classification[spec["name"]] = output_params["classification"]
    request_id = header.get("id")
    if request_id is not None and (not isinstance(request_id, str | int) or isinstance(request_id, bool)):
        raise InvalidInput(f"id: expected a string, got {type(request_id).__name__}")
    request_id = str(request_id) if request_id is not None else None
    binary_default = kserve.flag(params, "binary_data_output")
    return InferRequest(request_id, inputs, params, outputs, binary, binary_default, classification)


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{where}: parameters must be an object")
    return value


def encode_response(
    model: str, version: int, request: InferRequest, tensors: list[kserve_tensors.Tensor]
) -> tuple[bytes, dict[str, str]]:
    """→ body and headers. JSON only, or JSON header + binary tail when any output is binary."""
    outputs, tail = [], bytearray()
    for t in tensors:
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if request.binary(t.name):
            raw = (
                kserve_tensors.serialize_bytes(t.data)
                if t.datatype == "BYTES"
                else np.ascontiguousarray(t.data).tobytes()
            )
            entry["parameters"] = {"binary_data_size": len(raw)}
            tail += raw
        elif t.datatype == "BYTES":
            entry["data"] = [x.decode("utf-8", "replace") for x in t.data.ravel()]
        else:
            entry["data"] = json_body.numbers(t.data.ravel())
        outputs.append(entry)
    header: dict[str, Any] = {"model_name": model, "model_version": str(version), "outputs": outputs}
    if request.id is not None:
        header["id"] = request.id
    body = dumps(header)
    if not tail:
        return body, {"content-type": "application/json"}
    return body + bytes(tail), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(body))}


def ready_flag(body: bytes, max_values: int) -> bool:
    """The ``ready`` field of a repository-index request (an empty body: false); ``max_values`` as
    for :func:`parse_request`."""
    if not body.strip():
        return False
    json_body.check_values(body, max_values)
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"body: not a JSON repository-index request ({exc.__class__.__name__})") from exc
    if not isinstance(request, dict):
        raise InvalidInput("body: a JSON object is required")
    ready = request.get("ready", False)
    if not isinstance(ready, bool):
        raise InvalidInput(f"ready: a boolean is required, got {ready!r}"[:200])
    return ready
