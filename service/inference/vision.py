"""Image classification over an exported ViT graph: decode → preprocess → batched run → top-k.

Decoding is Pillow under a pixel limit (decompression bombs are refused before the pixels are
allocated); preprocessing follows the manifest (resize, scale to [0, 1], normalise).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.errors import InvalidInput, PayloadTooLarge
from service.inference.manifest import ImageSpec, Manifest
from service.inference.runtime import GraphSession

ALLOWED_FORMATS = {"PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM"}


def decode_image(data: bytes, max_pixels: int, field: str = "image") -> Image.Image:
    """Bytes of an encoded image → a loaded Pillow image, or :class:`InvalidInput` naming ``field``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ALLOWED_FORMATS:
                raise InvalidInput(f"{field}: unsupported image format {image.format}")
            if image.width * image.height > max_pixels:
                raise PayloadTooLarge(
                    f"{field}: {image.width}×{image.height} pixels exceeds the limit of {max_pixels}"
                )
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:  # fmt: skip
        raise InvalidInput(f"{field}: not a decodable image ({type(exc).__name__})") from exc
    return image


def pixels_to_image(pixels: np.ndarray, field: str = "pixels") -> Image.Image:
    """A raw (H, W) or (H, W, C) array of 0–255 values → a Pillow image."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (3, 4)):
        raise InvalidInput(f"{field}: expected shape [H, W] or [H, W, 3|4], got {list(pixels.shape)}")
    if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 255:
        raise InvalidInput(f"{field}: values must be finite and within 0..255")
    return Image.fromarray(pixels.astype(np.uint8))


def preprocess(image: Image.Image, spec: ImageSpec) -> tuple[np.ndarray, np.ndarray]:
    """→ (normalised float32 (C, H, W), the resized uint8 image (H, W[, C]) for overlays)."""
    image = image.convert("L" if spec.channels == 1 else "RGB")
    if image.size != (spec.width, spec.height):
        image = image.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    resized = np.asarray(image)
    x = resized.astype(np.float32) / 255.0
    x = x[None] if spec.channels == 1 else x.transpose(2, 0, 1)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    return (x - mean) / std, resized


@dataclass
class Classification:
    probabilities: np.ndarray  # (classes,)
    attentions: np.ndarray | None  # (layers, heads, T, T); None when not asked for


class Classifier:
    def __init__(self, directory: Path, manifest: Manifest, providers: list[str], threads: int = 1) -> None:
        if manifest.image is None:
            raise ValueError(f"{manifest.name} is not an image model")
        self.spec = manifest.image
        graph = manifest.graphs["model"]
        self.session = GraphSession(directory / graph.file, graph, providers, threads)

    def classify(self, pixels: np.ndarray, attention: bool = True) -> list[Classification]:
        """pixels (B, C, H, W) normalised → one result per row; without ``attention`` the graph's
        attention output is neither kept nor copied out."""
        wanted = None if attention else ["logits"]
        out = self.session.run({"pixels": pixels}, wanted)  # fed as the graph's declared dtype
        # answers are float32 whatever the graph computes in (a float16 graph's too)
        logits = out["logits"].astype(np.float32, copy=False)
        logits = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        if not attention:
            return [Classification(p, None) for p in probs]
        maps = out["attentions"].astype(np.float32, copy=False)
        return [Classification(p, a) for p, a in zip(probs, maps, strict=True)]
