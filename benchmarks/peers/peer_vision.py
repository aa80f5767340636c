"""The model code both peers run around the ``fashion-vit`` graph, as a user of either would write it.

Imported as a top-level module inside a peer's own venv: TorchServe's archive carries this file
beside ``torchserve_handler.py``, and ``pytriton_server.py`` finds it in its own directory. It must
not import service code. Preprocessing replicates ``service/inference/vision.py``: Pillow decode,
grey (or RGB) conversion, a bilinear resize only when the size differs, /255, then (x - mean) / std
with the manifest's statistics; then one ONNX Runtime ``run`` of ``logits`` on the whole batch
(CPU, one intra-op and one inter-op thread), softmax and the top 5.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

TOP_K = 5
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_or_base64(data: bytes) -> bytes:
    """Raw PNG bytes as they are; anything else is taken for the base64 text of an image."""
    if data.startswith(PNG_SIGNATURE):
        return data
    try:
        return base64.b64decode(data, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"neither a PNG nor base64: {exc}") from exc


class Model:
    """The graph and its manifest's preprocessing, loaded from a model version directory."""

    def __init__(self, directory: Path) -> None:
        manifest = json.loads((directory / "manifest.json").read_text())
        spec = manifest["image"]
        self.labels: list[str] = list(spec["labels"])
        self.size = (int(spec["width"]), int(spec["height"]))  # as Pillow counts
        self.mode = "L" if spec["channels"] == 1 else "RGB"
        self.mean = np.asarray(spec["mean"], dtype=np.float32)[:, None, None]
        self.std = np.asarray(spec["std"], dtype=np.float32)[:, None, None]
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        graph = directory / manifest["graphs"]["model"]["file"]
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])

    def preprocess(self, data: bytes) -> np.ndarray:
        """Encoded image → normalised float32 (C, H, W)."""
        image = Image.open(io.BytesIO(data)).convert(self.mode)
        if image.size != self.size:
            image = image.resize(self.size, Image.Resampling.BILINEAR)
        x = np.asarray(image).astype(np.float32) / 255.0
        x = x[None] if self.mode == "L" else x.transpose(2, 0, 1)
        return (x - self.mean) / self.std

    def top_k(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, C, H, W) → the top classes (B, K) int64 and their softmax probabilities (B, K) float32."""
        (logits,) = self.session.run(["logits"], {"pixels": pixels})
        logits = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        top = np.argsort(-probs, axis=1, kind="stable")[:, :TOP_K].astype(np.int64)
        return top, np.take_along_axis(probs, top, axis=1)
