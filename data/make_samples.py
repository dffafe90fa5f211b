"""Write data/samples/: a tiny folder source that covers the image modes and faults of real data.

`make demo` and the tests encode it. Each record is a 64 px coloured shape with a .txt caption,
saved in one of the modes a scraped dataset contains, plus a few deliberately broken records that
the encoder must reject (see data/samples/README.md). Deterministic: rerunning rewrites the same
files (for a given Pillow build).

    python data/make_samples.py
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

OUT = Path(__file__).parent / "samples"
SIZE = 64
Shape = Callable[[ImageDraw.ImageDraw, int, int, object], None]


def circle(draw: ImageDraw.ImageDraw, w: int, h: int, fill: object) -> None:
    r = min(w, h) * 0.35
    draw.ellipse((w / 2 - r, h / 2 - r, w / 2 + r, h / 2 + r), fill=fill)


def square(draw: ImageDraw.ImageDraw, w: int, h: int, fill: object) -> None:
    r = min(w, h) * 0.3
    draw.rectangle((w / 2 - r, h / 2 - r, w / 2 + r, h / 2 + r), fill=fill)


def triangle(draw: ImageDraw.ImageDraw, w: int, h: int, fill: object) -> None:
    draw.polygon([(w / 2, h * 0.15), (w * 0.85, h * 0.85), (w * 0.15, h * 0.85)], fill=fill)


def star(draw: ImageDraw.ImageDraw, w: int, h: int, fill: object) -> None:
    radii = [min(w, h) * (0.42 if i % 2 == 0 else 0.18) for i in range(10)]  # five points, five notches
    angles = np.pi * (np.arange(10) / 5 - 0.5)
    draw.polygon([(w / 2 + r * np.cos(a), h / 2 + r * np.sin(a)) for r, a in zip(radii, angles)], fill=fill)


def wide_rectangle(draw: ImageDraw.ImageDraw, w: int, h: int, fill: object) -> None:
    draw.rectangle((w * 0.3, h * 0.3, w * 0.7, h * 0.7), fill=fill)


def shape(
    mode: str, background: object, draw_shape: Shape, fill: object, size: tuple[int, int] = (SIZE, SIZE)
) -> Image.Image:
    img = Image.new(mode, size, background)
    draw_shape(ImageDraw.Draw(img), *size, fill)
    return img


def jpeg_bytes(img: Image.Image, **options: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **options)
    return buf.getvalue()


def palette_with_transparency() -> Image.Image:
    """Index 0 is fully transparent, as in a GIF-style PNG with a tRNS chunk."""
    img = Image.new("P", (SIZE, SIZE), 0)
    img.putpalette([0, 0, 0, 0, 160, 0] + [0] * 762)
    star(ImageDraw.Draw(img), SIZE, SIZE, 1)
    img.info["transparency"] = 0
    return img


def gray16() -> Image.Image:
    """Mid-grey (32768 of 65535) circle on white: Pillow's own convert would clip it to white."""
    a = np.full((SIZE, SIZE), 65535, np.uint16)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    a[(yy - SIZE / 2 + 0.5) ** 2 + (xx - SIZE / 2 + 0.5) ** 2 < (SIZE * 0.35) ** 2] = 32768
    return Image.fromarray(a)


def exif_rotated() -> bytes:
    """Stored sideways with EXIF Orientation 6 (rotate 90° clockwise to view), as phone cameras save."""
    upright = shape("RGB", "white", triangle, (0, 150, 0), size=(48, SIZE))
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg_bytes(upright.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())


def save(name: str, image: Image.Image | bytes | None, caption: str | None, **options: object) -> None:
    path = OUT / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, bytes):
        path.write_bytes(image)
    elif image is not None:
        image.save(path, **options)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")


@dataclass
class Record:
    """One row of the README's table: the file, its caption, what it tests and what should happen."""

    name: str
    image: Image.Image | bytes | None
    caption: str | None
    tests: str
    expected: str = "accepted"
    options: dict[str, object] = field(default_factory=dict)  # for Image.save


def on_white(thing: str) -> str:
    return f"{thing} on a white background"


def records() -> list[Record]:
    black_circle = shape("RGB", "white", circle, (0, 0, 0))
    wide = shape("RGB", "white", wide_rectangle, (130, 30, 160), size=(96, SIZE))
    return [
        # Good records: one per mode a real dataset brings.
        Record("red_circle.jpg", jpeg_bytes(shape("RGB", "white", circle, (220, 20, 20))), on_white("a red circle"),
               "RGB JPEG"),
        Record("blue_square.png", shape("RGB", "white", square, (20, 40, 220)), on_white("a blue square"), "RGB PNG"),
        Record("gray_triangle.png", shape("L", 230, triangle, 60), "a dark grey triangle on a light grey background",
               "grayscale (L) PNG"),
        Record("green_star_palette.png", palette_with_transparency(), on_white("a green star"),
               "palette (P) PNG with a transparent index: composited on white", options={"transparency": 0}),
        Record("yellow_circle_rgba.png", shape("RGBA", (0, 0, 0, 0), circle, (240, 200, 0, 255)),
               on_white("a yellow circle"), "RGBA PNG, transparent background: composited on white"),
        Record("magenta_square_cmyk.jpg", jpeg_bytes(shape("CMYK", (0, 0, 0, 0), square, (0, 255, 0, 0))),
               on_white("a magenta square"), "CMYK JPEG"),
        Record("gray_circle_16bit.png", gray16(), on_white("a grey circle"),
               "16-bit grayscale (I;16) PNG: mid-grey stays mid-grey, not clipped to white"),
        Record("orange_triangle.webp", shape("RGB", "white", triangle, (250, 130, 0)), on_white("an orange triangle"),
               "WebP", options={"quality": 90}),
        Record("purple_rectangle_wide.png", wide, on_white("a purple rectangle"),
               "non-square (96x64): short side resized, centre cropped"),
        Record("green_triangle_exif.jpg", exif_rotated(), on_white("a green triangle pointing up"),
               "EXIF Orientation 6 (stored sideways): rotated upright"),
        Record("nested/cyan_circle.png", shape("RGB", "white", circle, (0, 190, 200)), on_white("a cyan circle"),
               "subfolder: id `nested/cyan_circle`"),
        # Bad records: each must be skipped and listed with its reason.
        Record("zero_byte.png", b"", on_white("a black circle"), "zero-byte image with a caption",
               "rejected: `unreadable_image`"),
        Record("truncated.jpg", jpeg_bytes(black_circle)[:400], on_white("a black circle"),
               "JPEG cut off after 400 bytes", "rejected: `unreadable_image`"),
        Record("orphan_caption.txt", None, "a white square on a black background", "caption with no image",
               "rejected: `missing_image`"),
        Record("empty_caption.png", shape("RGB", "white", square, (0, 0, 0)), " ",
               "image whose .txt is whitespace only", "rejected: `empty_caption`"),
        Record("no_caption.png", black_circle, None, "image with no .txt", "rejected: `missing_caption`"),
    ]


README = """# Sample image-caption set

A tiny folder source for `make demo` and the tests: 64 px shapes, each with a same-name `.txt`
caption, saved in the modes and with the faults that scraped datasets contain. Generated by
`python data/make_samples.py`; do not edit by hand (this README is generated too).

| file | what it tests | expected |
|---|---|---|
"""


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    rows = []
    for r in records():
        save(r.name, r.image, r.caption, **r.options)
        has_txt = r.caption is not None and not r.name.endswith(".txt")
        caption_file = f" + `{Path(r.name).with_suffix('.txt')}`" if has_txt else ""
        rows.append(f"| `{r.name}`{caption_file} | {r.tests} | {r.expected} |\n")
    (OUT / "README.md").write_text(README + "".join(rows), encoding="utf-8")


if __name__ == "__main__":
    main()
