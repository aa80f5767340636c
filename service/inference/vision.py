"""Image classification over an exported ViT graph: decode → preprocess → batched run → top-k.

Decoding yields a uint8 array in the model's colour mode, under a pixel limit (decompression bombs
are refused from the header, before the pixels are allocated) and the limits on what Pillow reads
in Python (``image_headers.py``): an 8-bit grey or RGB PNG of at most :data:`INLINE_PIXELS` is
decoded by libspng (``pyspng``) straight into an array — a third of Pillow's time on small images,
the same pixels (PNG is lossless) — and converted to the model's mode, where it differs, by
Pillow's own conversion from those pixels, as Pillow's path would. libspng stops reading once it
has every row and does not check the chunks' CRCs as pyspng calls it, so a damaged file could
decode to wrong pixels: the fast path takes only files whose chunks are whole and whose CRCs match
up to IEND. Every other image (palette, alpha, 16-bit, other formats) goes through Pillow and its
conversion, as before (which refuses a damaged one). Preprocessing follows the manifest (Pillow's
bilinear resize, scale to [0, 1], normalise). An image too large for the replica's event loop is
decoded in a thread, in Pillow throughout (:func:`decode_resized`), to the same pixels.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyspng
from PIL import Image, ImageOps

from service.errors import InvalidInput, PayloadTooLarge, ServiceError
from service.inference.image_headers import PNG_SIGNATURE, check_header, check_opened
from service.inference.manifest import ImageSpec, Manifest
from service.inference.runtime import GraphSession

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP", "PPM")  # Pillow's names
#: the PNG colour types libspng decodes (8-bit grey, 8-bit RGB) and the Pillow mode of their pixels
SPNG_MODES = {0: "L", 2: "RGB"}
ORIENTATION = 0x0112  # the EXIF tag
TURNED = range(2, 9)  # orientations other than "as stored" (1)
#: the most pixels (256 × 256; times its scans for a JPEG: :func:`decode_cost`) and bytes an image
#: may have to be decoded on the event loop: about a millisecond at most (1.1–1.3 ms for a 256 ×
#: 256 noise PNG or JPEG, decoded and resized; the bytes bound what Pillow reads of a header in
#: Python); a larger one is preprocessed in a thread, the loop free meanwhile
INLINE_PIXELS = 1 << 16
INLINE_BYTES = 8 * 1024


def mode_of(spec: ImageSpec) -> str:
    """The Pillow mode the model takes: ``L`` for one channel, ``RGB`` for three."""
    return "L" if spec.channels == 1 else "RGB"


def decode_image(data: bytes, max_pixels: int, mode: str, field: str = "image") -> np.ndarray:
    """Bytes of an encoded image → uint8 (H, W) for ``mode`` L, (H, W, 3) for RGB, or
    :class:`InvalidInput` / :class:`PayloadTooLarge` naming ``field``."""
    header = png_header(data)
    if header is not None:
        width, height, depth, colour = header
        check_pixels(width, height, max_pixels, field)
        check_header(data, field)  # its chunks, before png_intact walks them
        # an image an eXIf chunk turns (upright) is Pillow's
        if depth == 8 and colour in SPNG_MODES and png_intact(data, unturned=True):
            native = SPNG_MODES[colour]
            try:
                pixels = pyspng.load(data, native)
            except RuntimeError as exc:  # libspng's verdict: truncated, bad CRC, bad chunk …
                reason = str(exc).removeprefix("pyspng: ")
                raise InvalidInput(f"{field}: not a decodable image (PNG: {reason})") from exc
            if native == mode:
                return pixels
            # an RGB photo for a grey model (or the reverse): Pillow's conversion of the same
            # pixels, half the time of Pillow's decoding and conversion
            image = Image.frombuffer(native, (width, height), pixels, "raw", native, 0, 1)
            return np.asarray(image.convert(mode))
    return np.asarray(converted(pillow_image(data, max_pixels, field), mode, field))


def decode_cost(data: bytes) -> int:
    """The pixels decoding ``data`` writes, from its header: width × height, times the scans of a
    JPEG (libjpeg reads each scan over the whole image); 0 where no header can be read, or
    ``image_headers`` refuses it (such bytes are refused at once). With :data:`INLINE_PIXELS`,
    where an image is decoded."""
    header = png_header(data)
    if header is not None:
        return header[0] * header[1]
    try:
        check_header(data, "image")  # before Pillow reads it
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:  # its header: no pixels yet
            pixels = image.width * image.height
            return pixels * max(1, data.count(b"\xff\xda")) if image.format == "JPEG" else pixels
    except Exception:  # whatever Pillow makes of it, decode_image refuses it
        return 0


def decode_resized(data: bytes, max_pixels: int, spec: ImageSpec, field: str = "image") -> np.ndarray:
    """Bytes of an encoded image → the model-sized uint8 image (H, W[, C]), the pixels of
    ``resize(decode_image(…))``: a PNG within :data:`INLINE_PIXELS` by :func:`decode_image`
    (libspng where it applies), any other image in Pillow throughout, up to the resized image.
    Pillow's decoding, conversion and resizing let go of the interpreter lock, and libspng's
    decoding or a numpy copy of the full-size image hold it throughout: a one-colour 4096 × 4096
    PNG decoded in a thread held the event loop 49 ms through libspng, 16 ms at most through
    Pillow."""
    header = png_header(data)
    if header is not None and header[0] * header[1] <= INLINE_PIXELS:
        return resize(decode_image(data, max_pixels, mode_of(spec), field), spec)
    return resize(converted(pillow_image(data, max_pixels, field), mode_of(spec), field), spec)


def converted(image: Image.Image, mode: str, field: str) -> Image.Image:
    """``image``'s pixels in ``mode``. Pillow converts some modes to grey only through RGB (a
    CIELAB TIFF), which it takes when asked; a mode it cannot convert at all (premultiplied ``La``)
    is :class:`InvalidInput` naming ``field``."""
    failure = None
    for path in ((mode,), ("RGB", mode)):
        try:
            out = image
            for step in path:
                out = out.convert(step)
            return out
        except ValueError as exc:
            failure = exc
    raise InvalidInput(f"{field}: an image in colour mode {image.mode} cannot be read ({failure})")


def png_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, bit depth, colour type) from a PNG's IHDR, which the format puts first;
    None for anything else (Pillow then decides what it is)."""
    if len(data) < 33 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    return width, height, depth, colour


def png_intact(data: bytes, unturned: bool = False) -> bool:
    """Whether every chunk of a PNG is whole and matches its CRC, through IEND; with ``unturned``,
    also that no eXIf chunk turns it (:func:`orientation` 2–8: :func:`upright`'s to read)."""
    at, end = len(PNG_SIGNATURE), len(data)
    view = memoryview(data)
    while at + 12 <= end:
        (length,) = struct.unpack_from(">I", data, at)
        after = at + 12 + length
        if after > end:
            return False
        (crc,) = struct.unpack_from(">I", data, after - 4)
        if zlib.crc32(view[at + 4 : after - 4]) != crc:
            return False
        kind = data[at + 4 : at + 8]
        if kind == b"IEND":
            return True
        if unturned and kind == b"eXIf" and orientation(data[at + 8 : after - 4]) in TURNED:
            return False
        at = after
    return False


def orientation(exif: bytes) -> int | None:
    """The orientation an EXIF block (TIFF-structured, as in a PNG's eXIf chunk or a JPEG's APP1
    segment after its ``Exif`` header) gives; None without one, or where it cannot be read."""
    try:
        value = Image.Exif()
        value.load(exif)
        found = value.get(ORIENTATION)
    except Exception:
        return None
    return found if isinstance(found, int) else None


def check_pixels(width: int, height: int, max_pixels: int, field: str) -> None:
    pixels = width * height
    if pixels > max_pixels:
        raise PayloadTooLarge(f"{field}: {width}×{height} = {pixels} pixels, over the limit of {max_pixels}")


def pillow_image(data: bytes, max_pixels: int, field: str = "image") -> Image.Image:
    """Bytes of an encoded image → a loaded Pillow image, or :class:`InvalidInput` naming ``field``
    (:class:`PayloadTooLarge` over the limits). Pillow's own decompression-bomb check comes first,
    in ``Image.open``: past ``Image.MAX_IMAGE_PIXELS`` (89 Mpx) it warns, which only a
    ``max_pixels`` above that would let through to decoding, and past twice that it refuses. Its
    warning is not turned into an error here: ``warnings.catch_warnings`` swaps the process's
    filters, which threads decoding at once (:func:`decode_resized`) would leave crossed."""
    check_header(data, field)
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)  # no other plugin reads it
        check_pixels(image.width, image.height, max_pixels, field)
        check_opened(image, field)
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"{field}: over the limit of {max_pixels} pixels ({exc})") from exc
    except ServiceError:  # the limits' own refusals, naming the field
        raise
    except Exception as exc:  # whatever a plugin raises on bytes it misreads: a TIFF whose strip
        # offsets are text raised TypeError (a 500); the documented ones are UnidentifiedImageError,
        # OSError, SyntaxError and ValueError
        read = ", ".join(ALLOWED_FORMATS)
        raise InvalidInput(
            f"{field}: not a decodable image ({type(exc).__name__}; formats read: {read})"
        ) from exc
    seen = upright(image)
    if seen.mode.startswith("I;16"):  # 16-bit grey: Pillow's convert("L") clips at 255, not scales
        return Image.fromarray((np.asarray(seen) >> 8).astype(np.uint8), "L")
    return seen


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says it is seen, as browsers show it (a phone
    photo's pixels are stored turned): the model, its rollout and the overlay see the picture the
    user sees. An orientation that cannot be read leaves the pixels as stored, and so does one a
    PNG carries only in a text chunk (ImageMagick's "Raw profile type exif", which Pillow reads and
    browsers do not): a PNG's is its eXIf chunk's, whichever path decodes it."""
    try:
        if image.format == "PNG":
            turned = "exif" in image.info and orientation(image.info["exif"]) in TURNED
        else:
            turned = image.getexif().get(ORIENTATION) in TURNED
        if turned:
            return ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block: the pixels as stored
        pass
    return image


def pixels_to_image(pixels: np.ndarray, field: str = "pixels") -> Image.Image:
    """A raw (H, W) or (H, W, C) array of 0–255 values → a Pillow image."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (3, 4)):
        raise InvalidInput(f"{field}: expected shape [H, W] or [H, W, 3|4], got {list(pixels.shape)}")
    if pixels.size == 0:
        raise InvalidInput(f"{field}: the image has no pixels (shape {list(pixels.shape)})")
    if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 255:
        raise InvalidInput(f"{field}: values must be finite and within 0..255")
    return Image.fromarray(pixels.astype(np.uint8))


def resize(image: np.ndarray | Image.Image, spec: ImageSpec) -> np.ndarray:
    """A decoded image (an array in the model's mode, or any Pillow image) → the model-sized
    uint8 image (H, W[, C]): Pillow's bilinear resize where the size differs. The per-request half
    of the preprocessing; :func:`normalise` does the rest for a whole batch."""
    if isinstance(image, Image.Image):  # resized before its pixels are copied out
        if image.mode != (mode := mode_of(spec)):
            image = image.convert(mode)
        if image.size != (spec.width, spec.height):
            image = image.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
        return np.asarray(image)
    if image.shape[:2] != (spec.height, spec.width):
        resized = Image.fromarray(image).resize((spec.width, spec.height), Image.Resampling.BILINEAR)
        image = np.asarray(resized)
    return image


def normalise(images: Sequence[np.ndarray], spec: ImageSpec) -> np.ndarray:
    """Model-sized uint8 images, each (H, W[, C]) → the graph's input, float32 (B, C, H, W):
    scaled to [0, 1], then (x - mean) / std per channel. Once per batch, on the batcher's thread,
    whose time between two ONNX Runtime runs is spent waiting for the interpreter lock as much as
    computing: numpy lets go of the lock for each large array operation, and with the event loop
    busy, taking it back costs up to a switch interval each time. So the batch is one join of the
    images' bytes (``np.stack``'s copy let go of the lock; CPython's ``bytes.join`` keeps it below
    1 MiB — the demo's 32 × 48 × 48 — and lets go once above) and one lookup in the table of the
    256 values a channel's byte can take (:func:`_table`; arithmetic over the batch was four array
    operations). The table holds the same float32 operations in the same order, so the same values
    bit for bit. With a busy second thread: 2.0 ms → 0.8 ms per batch of 32 on the demo model."""
    shape = (len(images), spec.height, spec.width, spec.channels)
    batch = np.frombuffer(b"".join([image.tobytes() for image in images]), np.uint8).reshape(shape)
    table = _table(tuple(spec.mean), tuple(spec.std))  # (C, 256)
    if spec.channels == 1:
        return table[0][batch.transpose(0, 3, 1, 2)]  # (B, 1, H, W): a view of the same bytes
    pixels = table[np.arange(spec.channels), batch]  # (B, H, W, C)
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))  # (B, C, H, W)


@functools.lru_cache(maxsize=64)
def _table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(C, 256) float32: what :func:`normalise` gives each byte value of each channel."""
    x = np.tile(np.arange(256, dtype=np.float32), (len(mean), 1))
    x /= 255.0
    x -= np.asarray(mean, dtype=np.float32)[:, None]
    x /= np.asarray(std, dtype=np.float32)[:, None]
    x.flags.writeable = False  # shared by every batch of the models with these values
    return x


def preprocess(image: np.ndarray | Image.Image, spec: ImageSpec) -> tuple[np.ndarray, np.ndarray]:
    """One decoded image → (normalised float32 (C, H, W), the resized uint8 image (H, W[, C]) for
    overlays): :func:`resize`, then :func:`normalise` as a batch of one."""
    resized = resize(image, spec)
    return normalise([resized], spec)[0], resized


@dataclass
class Classification:
    probabilities: np.ndarray  # (classes,)
    ranked: np.ndarray  # (classes,) the classes from the most probable down (ties: lower index first)
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
        # ranked for the whole batch in one call, on this thread: a sort per answer on the event
        # loop was ≈ 5 % of its time per request on the demo image model
        ranked = np.argsort(-probs, axis=1, kind="stable")
        if not attention:
            return [Classification(p, r, None) for p, r in zip(probs, ranked, strict=True)]
        maps = out["attentions"].astype(np.float32, copy=False)
        return [Classification(p, r, a) for p, a, r in zip(probs, maps, ranked, strict=True)]
