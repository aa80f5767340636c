"""TorchServe custom handler for ``fashion-vit``: what a TorchServe user writes around the ONNX graph.

Runs in TorchServe's Python backend worker (the ``torchserve`` venv of ``versions.py``), packed by
``torch-model-archiver`` with the graph, its ``manifest.json`` and ``peer_vision.py`` (the decode,
preprocessing and top-5 shared with the PyTriton peer). A batch that TorchServe's batcher formed
comes in as a list of requests; each is either a JSON body ``{"image": "<base64 PNG>"}``
(``data[i]["body"]``: a dict, or bytes when TorchServe did not decode it) or a multipart upload
whose field ``image`` holds the PNG bytes (``data[i]["image"]``). The decodable images go through
one ONNX Runtime ``run``; an undecodable one gets a 400 answer without failing the rest of its batch.

TorchServe wants exactly one class defined in the module; it does not derive from ``BaseHandler``,
whose module imports torch.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
from peer_vision import Model  # beside this file in the model directory, on the worker's path


def request_png(request: dict[str, Any]) -> bytes:
    """The encoded image of one request: a multipart field ``image``, or ``{"image": base64}``."""
    field = request.get("image")
    if isinstance(field, (bytes, bytearray)):
        return bytes(field)
    body = request.get("body")
    if isinstance(body, (bytes, bytearray)):
        body = json.loads(body)
    if not isinstance(body, dict) or not isinstance(body.get("image"), str):
        raise ValueError('expected a multipart field "image" or a JSON body {"image": "<base64>"}')
    return base64.b64decode(body["image"], validate=True)


class FashionViTHandler:
    """Loads the graph once per worker; ``handle`` classifies one batch."""

    def __init__(self) -> None:
        self.model: Model | None = None

    def initialize(self, context: Any) -> None:
        self.model = Model(Path(context.system_properties["model_dir"]))

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[dict[str, Any]]:
        assert self.model is not None, "initialize() first"
        out: list[dict[str, Any]] = [{} for _ in data]
        rows: list[int] = []
        pixels: list[np.ndarray] = []
        for i, request in enumerate(data):
            try:
                pixels.append(self.model.preprocess(request_png(request)))
                rows.append(i)
            except (ValueError, OSError) as exc:  # bad base64, JSON or image (UnidentifiedImageError)
                context.set_response_status(400, "Bad Request", i)
                out[i] = {"error": f"bad image: {type(exc).__name__}: {exc}"}
        if not rows:
            return out
        top, probs = self.model.top_k(np.stack(pixels))
        labels = self.model.labels
        for i, indices, p in zip(rows, top, probs, strict=True):
            out[i] = {
                "predictions": [
                    {"label": labels[k], "index": int(k), "probability": float(q)}
                    for k, q in zip(indices, p, strict=True)
                ]
            }
        return out
