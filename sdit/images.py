"""Images on disk and in grids: PNGs that carry their settings, plain grids, and captioned grids.

What several stages and benchmarks share (`sdit sample`, `sdit inspect`, training's sample grids, bench distill).
Images are (H, W, 3) uint8 arrays throughout.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from sdit.files import replacing


def save_png(image: np.ndarray, path: Path, text: dict[str, str]) -> None:
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    with replacing(path) as tmp:
        Image.fromarray(image).save(tmp, pnginfo=info)


def grid(images: list[np.ndarray] | np.ndarray, columns: int, pad: int = 2) -> Image.Image:
    """Images (H, W, 3) uint8, row-major into a grid with a white border."""
    images = list(images)
    h, w = images[0].shape[:2]
    rows = -(-len(images) // columns)
    canvas = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + pad) + pad), "white")
    for i, image in enumerate(images):
        canvas.paste(Image.fromarray(image), (pad + (i % columns) * (w + pad), pad + (i // columns) * (h + pad)))
    return canvas


PAD = 4
FONT_SIZE = 10
LINE_HEIGHT = 12
CAPTION_LINES = 3
MIN_CELL = 96  # px: room for a readable caption under small (64 px) images


def captioned_grid(rows: dict[str, list[np.ndarray]], captions: list[str], columns: int) -> Image.Image:
    """Images (H, W, 3) uint8 in bands of `columns`: in each band one row per model (labelled at the left
    when there are several), then each column's caption."""
    font = ImageFont.load_default(size=FONT_SIZE)
    models = list(rows)
    n, (h, w) = len(captions), rows[models[0]][0].shape[:2]
    columns = min(columns, n)
    cell = max(w, MIN_CELL)
    label = max(int(font.getlength(m)) for m in models) + 2 * PAD if len(models) > 1 else 0
    caption_h = CAPTION_LINES * LINE_HEIGHT + PAD
    band_h = len(models) * (h + PAD) + caption_h
    bands = -(-n // columns)
    canvas = Image.new("RGB", (label + columns * (cell + PAD) + PAD, bands * band_h + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    for i, caption in enumerate(captions):
        band, col = divmod(i, columns)
        x = label + PAD + col * (cell + PAD)
        y = PAD + band * band_h
        for r, model in enumerate(models):
            canvas.paste(Image.fromarray(rows[model][i]), (x + (cell - w) // 2, y + r * (h + PAD)))
            if col == 0 and label:
                draw.text((PAD, y + r * (h + PAD) + h // 2 - FONT_SIZE // 2), model, fill="black", font=font)
        for k, line in enumerate(wrap(caption, font, cell)):
            draw.text((x + (cell - font.getlength(line)) // 2, y + len(models) * (h + PAD) + k * LINE_HEIGHT), line,
                      fill="black", font=font)
    return canvas


def wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """At most CAPTION_LINES lines that fit `width` px; an ellipsis where the text is cut."""
    chars = max(4, int(width / max(font.getlength("n"), 1)))
    lines = textwrap.wrap(text, chars, break_long_words=True) or [""]
    while any(font.getlength(line) > width for line in lines) and chars > 4:
        chars -= 1
        lines = textwrap.wrap(text, chars, break_long_words=True)
    if len(lines) > CAPTION_LINES:
        lines = lines[:CAPTION_LINES]
        lines[-1] = lines[-1][:max(0, len(lines[-1]) - 1)] + "…"
    return lines
