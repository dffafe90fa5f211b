from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sdit.decode import load_image
from sdit.errors import RejectedInput, SDiTError

WHITE = np.ones(3, np.float32)


def encode(img: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def centre_and_corner(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RGB at the centre and at the top-left corner of a (3, R, R) array."""
    r = array.shape[1]
    return array[:, r // 2, r // 2], array[:, 1, 1]


def disc(mode: str, background: object, fill: object, size: int = 64) -> Image.Image:
    img = Image.new(mode, (size, size), background)
    ImageDraw.Draw(img).ellipse((16, 16, 48, 48), fill=fill)
    return img


def palette_disc() -> Image.Image:
    img = Image.new("P", (64, 64), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    ImageDraw.Draw(img).ellipse((16, 16, 48, 48), fill=1)
    return img


def gray16(centre: int, background: int) -> Image.Image:
    a = np.full((64, 64), background, np.uint16)
    a[16:48, 16:48] = centre
    return Image.fromarray(a)


def float_gray(centre: float, background: float) -> Image.Image:
    a = np.full((64, 64), background, np.float32)
    a[16:48, 16:48] = centre
    return Image.fromarray(a, mode="F")


# ---- load_image: every mode becomes RGB in [-1, 1] -------------------------------------------

RED, GREY = [1.0, -1.0, -1.0], [0.0, 0.0, 0.0]
MODES = {
    # name: (encoded image, expected centre RGB, expected corner RGB), colours in [-1, 1]
    "rgb_jpeg": (lambda: encode(disc("RGB", "white", (255, 0, 0)), "JPEG", quality=95), RED, WHITE),
    "rgb_png": (lambda: encode(disc("RGB", "white", (255, 0, 0))), RED, WHITE),
    "gray_png": (lambda: encode(disc("L", 255, 128)), GREY, WHITE),
    "bilevel_png": (lambda: encode(disc("1", 1, 0)), -WHITE, WHITE),
    "palette_transparent_png": (lambda: encode(palette_disc(), transparency=0), RED, WHITE),
    "rgba_png": (lambda: encode(disc("RGBA", (0, 0, 0, 0), (255, 0, 0, 255))), RED, WHITE),
    "la_png": (lambda: encode(disc("LA", (0, 0), (128, 255))), GREY, WHITE),
    "rgb_colour_key_png": (lambda: encode(disc("RGB", (0, 0, 0), (255, 0, 0)), transparency=(0, 0, 0)), RED, WHITE),
    "cmyk_jpeg": (lambda: encode(disc("CMYK", (0, 0, 0, 0), (0, 255, 255, 0)), "JPEG", quality=95), RED, WHITE),
    "ycbcr_jpeg": (lambda: encode(disc("RGB", "white", (255, 0, 0)).convert("YCbCr"), "JPEG", quality=95), RED, WHITE),
    "gray16_png": (lambda: encode(gray16(32768, 65535)), GREY, WHITE),
    "gray32_tiff": (lambda: encode(gray16(32768, 65535).convert("I"), "TIFF"), GREY, WHITE),
    "float_tiff": (lambda: encode(float_gray(0.5, 1.0), "TIFF"), GREY, WHITE),
    "webp": (lambda: encode(disc("RGB", "white", (255, 0, 0)), "WEBP", lossless=True), RED, WHITE),
    "gif": (lambda: encode(disc("RGB", "white", (255, 0, 0)).convert("P"), "GIF"), RED, WHITE),
    "bmp": (lambda: encode(disc("RGB", "white", (255, 0, 0)), "BMP"), RED, WHITE),
}


@pytest.mark.parametrize("name", MODES)
def test_every_mode_becomes_rgb_in_range(name: str) -> None:
    make, centre, corner = MODES[name]
    array = load_image(make(), 32)
    assert array.shape == (3, 32, 32) and array.dtype == np.float32
    assert array.min() >= -1 and array.max() <= 1
    got_centre, got_corner = centre_and_corner(array)
    np.testing.assert_allclose(got_centre, centre, atol=0.05)  # JPEG and grey rounding
    np.testing.assert_allclose(got_corner, corner, atol=0.05)  # transparent pixels are white


def test_high_depth_grey_is_scaled_not_clipped() -> None:
    """Pillow's convert("RGB") turns 16-bit mid-grey white and float 0.5 black; ours keeps the grey."""
    assert Image.open(io.BytesIO(encode(gray16(32768, 0)))).convert("RGB").getpixel((32, 32)) == (255, 255, 255)
    for image in (gray16(32768, 0), float_gray(0.5, 0.0)):
        centre, corner = centre_and_corner(load_image(encode(image, "TIFF"), 64))
        np.testing.assert_allclose(centre, 0.0, atol=0.01)
        np.testing.assert_allclose(corner, -1.0, atol=0.01)


def test_exif_orientation_is_applied() -> None:
    """Stored 64x32 sideways (red left, blue right) with Orientation 6: upright it is 32x64, red on top."""
    stored = Image.new("RGB", (64, 32), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    array = load_image(encode(stored, exif=exif.tobytes()), 32)
    np.testing.assert_allclose(array[:, 4, 16], RED, atol=0.01)
    np.testing.assert_allclose(array[:, 28, 16], [-1, -1, 1], atol=0.01)


@pytest.mark.parametrize("size", [(128, 64), (64, 128)])
def test_resize_short_side_and_keep_centre(size: tuple[int, int]) -> None:
    """The long side is cropped equally at both ends: only the centre square (green) is kept."""
    w, h = size
    img = Image.new("RGB", size, (255, 0, 0))
    left, top = (w - 64) // 2, (h - 64) // 2
    img.paste((0, 255, 0), (left, top, left + 64, top + 64))
    green = np.array([-1, 1, -1], np.float32)[:, None, None]
    exact = load_image(encode(img), 64)  # no scaling: the crop is exactly the green square
    np.testing.assert_allclose(exact, np.broadcast_to(green, exact.shape), atol=1e-6)
    small = load_image(encode(img), 16)
    assert small.shape == (3, 16, 16)
    # the bicubic kernel reaches a few source pixels past the crop, as resize-then-crop would
    np.testing.assert_allclose(small[:, 1:-1, 1:-1], np.broadcast_to(green, (3, 14, 14)), atol=0.02)


def test_small_image_is_upscaled_and_large_jpeg_drafted() -> None:
    assert load_image(encode(Image.new("RGB", (10, 20), "white")), 64).shape == (3, 64, 64)
    big = load_image(encode(Image.new("RGB", (2048, 1024), (255, 0, 0)), "JPEG"), 64)
    np.testing.assert_allclose(big[:, 32, 32], RED, atol=0.02)


@pytest.mark.parametrize(
    "data, min_size, reason",
    [
        (b"", 0, "unreadable_image"),
        (b"not an image at all", 0, "unreadable_image"),
        (encode(Image.new("RGB", (64, 64), "red"), "JPEG")[:300], 0, "unreadable_image"),
        (encode(Image.new("RGB", (64, 64), "red"))[:100], 0, "unreadable_image"),
        (encode(Image.new("RGB", (40, 100), "red")), 64, "too_small"),
    ],
    ids=["zero_byte", "not_image", "truncated_jpeg", "truncated_png", "too_small"],
)
def test_rejects(data: bytes, min_size: int, reason: str) -> None:
    with pytest.raises(RejectedInput) as info:
        load_image(data, 32, min_size=min_size)
    assert info.value.reason == reason


def test_decompression_bomb_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(RejectedInput, match="DecompressionBombError") as info:
        load_image(encode(Image.new("RGB", (64, 64))), 32)
    assert info.value.reason == "unreadable_image"


@pytest.mark.parametrize("resolution", [0, -8, 30])
def test_resolution_must_be_multiple_of_8(resolution: int) -> None:
    with pytest.raises(SDiTError, match="multiple of 8"):
        load_image(encode(Image.new("RGB", (64, 64))), resolution)
