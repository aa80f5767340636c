"""Image decoding and preprocessing: the libspng path (8-bit grey and RGB PNGs, converted to the
model's mode by Pillow) gives Pillow's pixels exactly, every other image goes through Pillow, and
bad or oversized images are refused naming the field."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pyspng
import pytest
from PIL import Image

from service.errors import InvalidInput, PayloadTooLarge
from service.inference import vision
from service.inference.manifest import ImageSpec
from service.inference.vision import decode_image, normalise, png_header, preprocess, resize

RNG = np.random.default_rng(0)
LIMIT = 1 << 24


def spec(channels: int) -> ImageSpec:
    return ImageSpec(
        height=48, width=48, channels=channels, mean=[0.1] * channels, std=[0.3] * channels,
        labels=["a", "b"], patch_size=8, num_layers=1, num_heads=1, prefix_tokens=1,
    )  # fmt: skip


def encoded(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def with_chunk(png: bytes, kind: bytes, payload: bytes) -> bytes:
    """``png`` with one more chunk right after IHDR (gAMA, sRGB … sit there)."""
    chunk = struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return png[:33] + chunk + png[33:]


def grey(size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, size[::-1], dtype=np.uint8))


def rgb(size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


IMAGES = {
    "grey": lambda s: encoded(grey(s)),
    "grey-transparency": lambda s: encoded(grey(s), transparency=7),
    "grey-gamma": lambda s: with_chunk(encoded(grey(s)), b"gAMA", struct.pack(">I", 45455)),
    "grey-srgb": lambda s: with_chunk(encoded(grey(s)), b"sRGB", b"\x00"),
    "rgb": lambda s: encoded(rgb(s)),
    "rgb-transparency": lambda s: encoded(rgb(s), transparency=(1, 2, 3)),
    "rgb-gamma": lambda s: with_chunk(encoded(rgb(s)), b"gAMA", struct.pack(">I", 100000)),
    "grey-16bit": lambda s: encoded(Image.fromarray(RNG.integers(0, 65536, s[::-1], dtype=np.uint16))),
    "palette": lambda s: encoded(rgb(s).convert("P", palette=Image.Palette.ADAPTIVE)),
    "grey-alpha": lambda s: encoded(rgb(s).convert("LA")),
    "rgba": lambda s: encoded(rgb(s).convert("RGBA")),
    "jpeg": lambda s: encoded(rgb(s), "JPEG"),
    "bmp": lambda s: encoded(grey(s), "BMP"),
}


def reference(data: bytes, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """What the service did before libspng: Pillow decodes, converts, resizes."""
    return preprocess(Image.open(io.BytesIO(data)), spec(channels))


@pytest.mark.parametrize("size", [(28, 28), (48, 48), (61, 37)])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", sorted(set(IMAGES) - {"grey-16bit"}))  # Pillow clips it: below
def test_every_image_preprocesses_to_pillows_pixels(kind: str, channels: int, size: tuple[int, int]) -> None:
    data = IMAGES[kind](size)
    mode = "L" if channels == 1 else "RGB"
    pixels, resized = preprocess(decode_image(data, LIMIT, mode), spec(channels))
    want_pixels, want_resized = reference(data, channels)
    assert resized.dtype == np.uint8 and resized.shape == want_resized.shape
    np.testing.assert_array_equal(resized, want_resized)
    np.testing.assert_array_equal(pixels, want_pixels)
    assert pixels.shape == (channels, 48, 48) and pixels.dtype == np.float32


@pytest.mark.parametrize("channels", [1, 3])
def test_a_batch_normalises_to_each_images_own_pixels(channels: int) -> None:
    """The runner resizes per request and normalises per batch: every row is, bit for bit, the
    image normalised alone and the plain formula ((x / 255 - mean) / std per channel, float32)."""
    s = spec(channels).model_copy(
        update={"mean": [0.1, 0.2, 0.3][:channels], "std": [0.3, 0.25, 0.2][:channels]}
    )
    make = grey if channels == 1 else rgb
    images = [resize(np.asarray(make(size)), s) for size in [(48, 48), (28, 28), (61, 37), (48, 48)]]
    every_byte = (np.arange(48 * 48 * channels) % 256).astype(np.uint8)  # each value in each channel
    images.append(
        every_byte.reshape(48, 48) if channels == 1 else every_byte.reshape(3, 48, 48).transpose(1, 2, 0)
    )
    batch = normalise(images, s)
    assert batch.shape == (5, channels, 48, 48) and batch.dtype == np.float32 and batch.flags.c_contiguous
    for row, image in zip(batch, images, strict=True):
        x = image.astype(np.float32) / 255.0
        x = x[None] if channels == 1 else x.transpose(2, 0, 1)
        mean = np.asarray(s.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(s.std, dtype=np.float32)[:, None, None]
        np.testing.assert_array_equal(row, (x - mean) / std)
        np.testing.assert_array_equal(row, preprocess(image, s)[0])


@pytest.mark.parametrize("size", [(28, 28), (61, 37)])
@pytest.mark.parametrize("channels", [1, 3])
def test_16bit_grey_pngs_read_as_their_8bit_pixels(channels: int, size: tuple[int, int]) -> None:
    """A 16-bit grey PNG is the 8-bit image in its high bytes (as Pillow and libpng read 16-bit
    RGB): Pillow's own convert("L") clips every value above 255 to white, so a mid-grey 16-bit
    image became almost all white and was misclassified."""
    eight = np.asarray(grey(size))
    sixteen = eight.astype(np.uint16) * 256 + RNG.integers(0, 256, eight.shape, dtype=np.uint16)
    data = encoded(Image.fromarray(sixteen))
    assert png_header(data) == (*size, 16, 0)
    mode = "L" if channels == 1 else "RGB"
    want = preprocess(decode_image(encoded(Image.fromarray(eight)), LIMIT, mode), spec(channels))
    got = preprocess(decode_image(data, LIMIT, mode), spec(channels))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    assert (np.asarray(Image.open(io.BytesIO(data)).convert("L")) == 255).mean() > 0.9  # Pillow's clip


@pytest.mark.parametrize(
    ("kind", "mode", "native"),
    [("grey", "L", "L"), ("grey-transparency", "L", "L"), ("rgb", "RGB", "RGB"), ("rgb-gamma", "RGB", "RGB"),
     ("rgb", "L", "RGB"), ("rgb-transparency", "L", "RGB"), ("grey", "RGB", "L"), ("grey-16bit", "L", None),
     ("palette", "RGB", None), ("grey-alpha", "L", None), ("rgba", "RGB", None), ("jpeg", "RGB", None)],
)  # fmt: skip
def test_libspng_decodes_8bit_grey_and_rgb_pngs(
    kind: str, mode: str, native: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoded by libspng in the PNG's own mode (then converted by Pillow where the model's
    differs: the pixels are Pillow's, above), or not at all."""
    calls, real = [], pyspng.load

    def load(data: bytes, fmt: str) -> np.ndarray:
        calls.append(fmt)
        return real(data, fmt)

    monkeypatch.setattr(vision.pyspng, "load", load)
    decode_image(IMAGES[kind]((28, 28)), LIMIT, mode)
    assert calls == ([native] if native else [])


def test_the_png_header_is_read_without_decoding() -> None:
    assert png_header(encoded(grey((30, 20)))) == (30, 20, 8, 0)
    assert png_header(encoded(rgb((5, 7)))) == (5, 7, 8, 2)
    assert png_header(encoded(rgb((5, 7)), "JPEG")) is None
    assert png_header(b"\x89PNG\r\n\x1a\n") is None


def lying_png(width: int, height: int) -> bytes:
    """A small file whose header declares ``width`` × ``height`` 8-bit grey pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    ihdr = struct.pack(">I", 13) + b"IHDR" + header + struct.pack(">I", zlib.crc32(b"IHDR" + header))
    data = zlib.compress(b"\x00" * 100)
    idat = struct.pack(">I", len(data)) + b"IDAT" + data + struct.pack(">I", zlib.crc32(b"IDAT" + data))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return vision.PNG_SIGNATURE + ihdr + idat + end


def test_oversized_images_are_refused_from_the_header() -> None:
    with pytest.raises(PayloadTooLarge, match=r"upload: 100000×100000 = 10000000000 pixels, over the limit"):
        decode_image(lying_png(100_000, 100_000), LIMIT, "L", "upload")
    with pytest.raises(PayloadTooLarge, match="pixels, over the limit"):
        decode_image(encoded(rgb((64, 64))), 64 * 63, "RGB")  # Pillow's path checks it too
    with pytest.raises(PayloadTooLarge, match="pixels, over the limit"):
        decode_image(encoded(rgb((64, 64)), "JPEG"), 64 * 63, "RGB")


def tiff_of_text_strip_offsets() -> bytes:
    """An 8×8 RGB TIFF whose StripOffsets entry (tag 273) says ASCII instead of LONG: Pillow's
    TIFF plugin seeks to a string and raises TypeError, none of its documented errors."""
    data = bytearray(encoded(Image.new("RGB", (8, 8)), "TIFF"))
    directory = struct.unpack_from("<I", data, 4)[0]
    for entry in range(struct.unpack_from("<H", data, directory)[0]):
        at = directory + 2 + 12 * entry
        if struct.unpack_from("<H", data, at)[0] == 273:
            struct.pack_into("<H", data, at + 2, 2)
    return bytes(data)


@pytest.mark.parametrize(
    "data",
    [
        tiff_of_text_strip_offsets(),
        encoded(grey((28, 28)))[:60],  # truncated
        lying_png(40, 40),  # too little pixel data for its header
        bytearray(encoded(grey((28, 28)))),  # a bad CRC, set below
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
        b"not an image at all",
    ],
)
def test_undecodable_images_are_invalid_input_naming_the_field(data: bytes | bytearray) -> None:
    if isinstance(data, bytearray):
        data[50] ^= 0xFF  # inside IDAT's data (from byte 41): its CRC no longer matches
        data = bytes(data)
    with pytest.raises(InvalidInput, match=r"^file: not a decodable image"):
        decode_image(data, LIMIT, "L", "file")


def with_scans(jpeg: bytes, copies: int) -> bytes:
    """A progressive JPEG whose last scan is repeated ``copies`` more times before its end: scans
    that refine nothing, as in the many-scan files that keep libjpeg busy."""
    last = jpeg.rindex(b"\xff\xda")
    return jpeg[:-2] + jpeg[last:-2] * copies + b"\xff\xd9"


def test_images_pillow_converts_to_grey_only_through_rgb_are_read() -> None:
    lab = Image.fromarray(np.dstack([np.full((8, 8), v, np.uint8) for v in (60, 128, 128)]), "LAB")
    data = encoded(lab, "TIFF")
    with pytest.raises(ValueError):  # Pillow's direct conversion
        Image.open(io.BytesIO(data)).convert("L")
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").convert("L"))
    assert np.array_equal(decode_image(data, LIMIT, "L"), expected)
    assert decode_image(data, LIMIT, "RGB").shape == (8, 8, 3)


def test_an_image_in_a_mode_pillow_cannot_convert_is_invalid_input() -> None:
    premultiplied = Image.new("La", (8, 8))
    with pytest.raises(InvalidInput, match=r"^file: an image in colour mode La cannot be read"):
        vision.converted(premultiplied, "L", "file")


@pytest.mark.parametrize("size", [(28, 28), (300, 260)])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_images_preprocess_to_the_same_pixels_on_the_loop_and_off_it(
    kind: str, channels: int, size: tuple[int, int]
) -> None:
    """``decode_resized`` (the runner's: a PNG over ``INLINE_PIXELS``, and any other image, in
    Pillow throughout, in a thread when large) gives the pixels of ``resize(decode_image(…))``
    (libspng where it applies, numpy's full-size copies)."""
    data = IMAGES[kind](size)
    mode = "L" if channels == 1 else "RGB"
    want = resize(decode_image(data, LIMIT, mode), spec(channels))
    got = vision.decode_resized(data, LIMIT, spec(channels))
    assert got.shape == want.shape == ((48, 48) if channels == 1 else (48, 48, 3))
    np.testing.assert_array_equal(got, want)


def lying_bmp(width: int, height: int) -> bytes:
    """A small BMP whose header declares ``width`` × ``height`` pixels (Pillow reads only it on open)."""
    data = bytearray(encoded(grey((4, 4)), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def test_the_decoding_cost_is_read_from_the_header() -> None:
    assert vision.decode_cost(encoded(grey((30, 20)))) == 600
    assert vision.decode_cost(lying_png(100_000, 100_000)) == 10**10
    assert vision.decode_cost(lying_bmp(3000, 2000)) == 6 * 10**6
    progressive = encoded(rgb((64, 64)), "JPEG", progressive=True)
    assert vision.decode_cost(progressive) == 64 * 64 * 10  # libjpeg reads each scan over the image
    assert vision.decode_cost(encoded(rgb((64, 64)), "JPEG")) == 64 * 64
    assert vision.decode_cost(b"not an image at all") == 0  # refused at once, on the loop
    assert vision.decode_cost(lying_bmp(20_000, 20_000)) == 0  # Pillow's own bomb refusal


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_large_images_off_the_loop_are_refused_as_on_it() -> None:
    with pytest.raises(
        PayloadTooLarge, match=r"^file: 3000×2000 = 6000000 pixels, over the limit of 4000000$"
    ):
        vision.decode_resized(lying_bmp(3000, 2000), 4_000_000, spec(1), "file")
    for side in (10_000, 20_000):  # past Pillow's warning (89 Mpx), and past its own refusal
        with pytest.raises(PayloadTooLarge, match=r"^file: .*over the limit of"):
            vision.decode_resized(lying_bmp(side, side), LIMIT, spec(1), "file")
    many = with_scans(encoded(grey((300, 300)), "JPEG", progressive=True), 500)
    with pytest.raises(PayloadTooLarge, match=r"^file: a JPEG of 506 scans"):
        vision.decode_resized(many, LIMIT, spec(1), "file")
    with pytest.raises(InvalidInput, match=r"^file: not a decodable image"):
        vision.decode_resized(lying_bmp(300, 300), LIMIT, spec(1), "file")


@pytest.mark.parametrize("kind", ["JPEG", "PNG"])
def test_images_are_read_upright_as_their_exif_orientation_says(kind: str) -> None:
    """A phone photo's pixels are stored turned, with an EXIF orientation that browsers (and the
    explorer) follow: the model read them as stored, and the rollout lay rotated over the picture
    the user saw. A white block stored top-left, orientation 6 (turn 90° clockwise): seen top-right."""
    stored = np.zeros((32, 48), np.uint8)
    stored[:8, :8] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(stored).save(
        buffer, format=kind, exif=exif.tobytes(), **({"quality": 95} if kind == "JPEG" else {})
    )
    seen = decode_image(buffer.getvalue(), 1 << 20, "L")
    assert seen.shape == (48, 32)  # turned: width and height swap
    assert seen[:8, -8:].mean() > 200 and seen[:8, :8].mean() < 50 and seen[-8:, :].mean() < 50
    plain = io.BytesIO()
    Image.fromarray(stored).save(plain, format=kind)
    assert decode_image(plain.getvalue(), 1 << 20, "L").shape == (32, 48)  # no orientation: as stored


def test_only_a_png_s_exif_chunk_turns_it_whatever_path_decodes_it() -> None:
    """Pillow also reads an orientation from ImageMagick's "Raw profile type exif" text chunk,
    which browsers ignore: a large PNG (decoded by Pillow) was turned by it and a small one
    (libspng) was not. Only the eXIf chunk counts, on both paths; one that says "as stored" keeps
    the PNG on libspng's path."""
    from PIL import PngImagePlugin

    exif = Image.Exif()
    exif[0x0112] = 6
    raw = exif.tobytes()
    text = PngImagePlugin.PngInfo()
    text.add_text("Raw profile type exif", f"\nexif\n{len(raw):8d}\n{raw.hex()}\n")
    buffer = io.BytesIO()
    Image.new("L", (48, 32)).save(buffer, format="PNG", pnginfo=text)
    with Image.open(io.BytesIO(buffer.getvalue())) as image:
        assert image.getexif().get(0x0112) == 6  # what Pillow reads
    assert decode_image(buffer.getvalue(), 1 << 20, "L").shape == (32, 48)  # libspng: as stored
    assert vision.pillow_image(buffer.getvalue(), 1 << 20).size == (48, 32)  # Pillow (large ones): too
    as_stored = Image.Exif()
    as_stored[0x0112] = 1
    for value, fast in ((as_stored, True), (exif, False)):
        buffer = io.BytesIO()
        Image.new("L", (48, 32)).save(buffer, format="PNG", exif=value.tobytes())
        assert vision.png_intact(buffer.getvalue(), unturned=True) is fast
        assert vision.png_intact(buffer.getvalue())
