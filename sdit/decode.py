"""One image's bytes into the VAE's input: EXIF orientation, RGB (transparency on white), the centre square at the
training resolution, scaled to [-1, 1]. A record that cannot be used raises `RejectedInput` (invariant 6).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from sdit.errors import RejectedInput, SDiTError

REDUCING_GAP = 2.0  # Pillow's thumbnail default: JPEG DCT scaling and box reduction up to 2x the target, then bicubic
_HIGH_DEPTH_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")




def load_image(data: bytes, resolution: int, *, min_size: int = 0) -> np.ndarray:
    """Decode image bytes to float32 (3, resolution, resolution) in [-1, 1], the VAE's input.

    EXIF orientation is applied, every mode becomes RGB (transparency on white), the short side is
    resized to `resolution` (bicubic) and the centre square kept. Raises RejectedInput
    ("unreadable_image", "too_small") for bad records and SDiTError for a bad resolution.
    """
    if resolution <= 0 or resolution % 8:
        raise SDiTError(f"resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {resolution}")
    if not data:
        raise RejectedInput("unreadable_image", "zero-byte file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            short = min(img.size)  # from the header: reject before paying for the decode
            if short < min_size:
                raise RejectedInput("too_small", f"{img.width}x{img.height}, short side under {min_size} px")
            scale = REDUCING_GAP * resolution / short
            img.draft(None, (int(img.width * scale), int(img.height * scale)))  # JPEG: decode at 1/2..1/8 scale
            ImageOps.exif_transpose(img, in_place=True)
            rgb = _to_rgb(img)
            array = np.asarray(_centre_square(rgb, resolution), dtype=np.float32)  # (R, R, 3) in 0..255
    except RejectedInput:
        raise
    except Exception as e:  # decoders of untrusted bytes raise many types; one bad file must not stop a run
        raise RejectedInput("unreadable_image", f"{type(e).__name__}: {e}") from None
    return np.ascontiguousarray(array.transpose(2, 0, 1)) / np.float32(127.5) - np.float32(1.0)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB; transparent pixels become white, as a viewer on a white page shows them."""
    if img.mode in _HIGH_DEPTH_MODES:
        img = Image.fromarray(_high_depth_to_8bit(np.asarray(img), img.mode), mode="L")
    if img.has_transparency_data:  # RGBA, LA, PA, palette or RGB/L with a tRNS colour key
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return img.convert("RGB")


def _high_depth_to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    """Scale 16/32-bit and float grey to 0..255.

    Pillow's own convert("L"/"RGB") clips instead of scaling: a 16-bit mid-grey becomes white and
    a float 0.5 becomes black. Integers are read as 16-bit samples (PNG and TIFF), floats in [0, 1]
    or [0, 255] as such; anything else is stretched from its min to its max.
    """
    a = np.nan_to_num(values.astype(np.float32))
    lo, hi = float(a.min()), float(a.max())
    if mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255
    elif mode != "F" and lo >= 0 and hi <= 65535:
        a = a / 257
    elif not (mode == "F" and lo >= 0 and hi <= 255) and hi > lo:
        a = (a - lo) * (255 / (hi - lo))
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _centre_square(img: Image.Image, resolution: int) -> Image.Image:
    """Resize the centre square of `img` to resolution², one resampling pass (same as resize then crop)."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    box = (left, top, left + side, top + side)
    return img.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box, reducing_gap=REDUCING_GAP)
