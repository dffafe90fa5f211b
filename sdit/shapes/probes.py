"""Probe images for the shapes reader: renders under noise and blur, images drawn without the world's
rasteriser (`independent_image`: the reader's templates come from that rasteriser, so reading its own renders
proves little), and images that hold no single shape (noise, blank backgrounds, two shapes, blobs, polygons and
scribbles). `sdit bench evaluator` and the reader's tests both draw from here.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from sdit.shapes import world


def with_noise(image: Image.Image, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """The image plus Gaussian noise of `sigma` (in [0, 1] units), clipped: H x W x 3 float32."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return np.clip(a + rng.normal(0.0, sigma, a.shape), 0, 1).astype(np.float32)


def with_blur(image: Image.Image, radius: float) -> Image.Image:
    """The image under a Gaussian blur of `radius` px (Pillow's radius is the sd)."""
    return image.filter(ImageFilter.GaussianBlur(radius))


def noise_image(rng: np.random.Generator, resolution: int = world.DEFAULT_RESOLUTION) -> np.ndarray:
    """Uniform RGB noise: nothing to read."""
    return rng.random((resolution, resolution, 3), dtype=np.float32)


def blank_image(
    background: str, rng: np.random.Generator, sigma: float = 0.0, resolution: int = world.DEFAULT_RESOLUTION
) -> np.ndarray:
    """A plain background with Gaussian noise of `sigma`: a background and no shape."""
    level = np.array(world.BACKGROUNDS[background], dtype=np.float32) / 255.0
    return np.clip(level + rng.normal(0.0, sigma, (resolution, resolution, 3)), 0, 1).astype(np.float32)


def two_shapes_image(rng: np.random.Generator, resolution: int = world.DEFAULT_RESOLUTION) -> Image.Image:
    """Two random shapes in two different grid cells (they may touch) on one background."""
    cells = rng.choice(len(world.POSITIONS), size=2, replace=False)
    background = str(rng.choice(list(world.BACKGROUNDS)))
    pixels = None
    for cell in cells:
        attrs = world.Attributes(
            str(rng.choice(world.SHAPES)),
            str(rng.choice(list(world.COLOURS))),
            background,
            list(world.POSITIONS)[int(cell)],
            str(rng.choice(list(world.SIZES))),
        )
        lay = world.layout(attrs, resolution, rng)
        if pixels is None:
            pixels = np.zeros((resolution, resolution, 3)) + np.array(lay.background)
        alpha = world.shape_alpha(attrs.shape, lay.centre, lay.side, resolution)[..., None]
        pixels = alpha * np.array(lay.colour) + (1 - alpha) * pixels
    return Image.fromarray(np.rint(pixels).astype(np.uint8), "RGB")


# --- an independent drawing path: images the reader's templates did not come from --------------------------

INDEPENDENT_SCALE = (0.8, 1.25)  # times the world's size; the world itself jitters only 0.92 to 1.08
INDEPENDENT_TURN = 10.0  # +- degrees; the world never turns a shape
JPEG_QUALITY = 75  # Pillow's default: 4:2:0 chroma subsampling, visible ringing at 64 px


def _turned(points: list[tuple[float, float]], degrees: float) -> list[tuple[float, float]]:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return [(c * x - s * y, s * x + c * y) for x, y in points]


def _star_outline() -> list[tuple[float, float]]:
    """A five-pointed star, point up, its inner radius the world's stated ratio of the outer, scaled on
    each axis to fill the box (as the world's size rule says every shape does)."""
    angles = [math.radians(-90 + 36 * k) for k in range(10)]
    points = [(math.cos(a), math.sin(a)) if k % 2 == 0 else (world.STAR_INNER_RADIUS * math.cos(a),
              world.STAR_INNER_RADIUS * math.sin(a)) for k, a in enumerate(angles)]
    xs, ys = [x for x, _ in points], [y for _, y in points]
    middle, half_height = (max(ys) + min(ys)) / 2, (max(ys) - min(ys)) / 2
    return [(x / max(xs), (y - middle) / half_height) for x, y in points]


def _cross_outline() -> list[tuple[float, float]]:
    """One 12-point polygon (the world draws two overlapping bars), arms the world's stated width."""
    a = world.CROSS_ARM
    quarter = [(a, -1.0), (a, -a), (1.0, -a)]  # the top arm's right edge to the right arm's top edge
    return [p for k in range(4) for p in _turned(quarter, 90.0 * k)]


_OUTLINES = {  # polygons in the unit box [-1, 1]^2, y down; circle and ring are ellipses
    "square": [(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)],
    "triangle": [(0.0, -1.0), (1.0, 1.0), (-1.0, 1.0)],
    "cross": _cross_outline(),
    "star": _star_outline(),
}


# ImageDraw fills a pixel when its corner, not its centre, lies inside, and includes the far edge:
# a 10 px box comes out 11 px. These correct for that, so an outline covers about the pixels whose
# centres it holds: a drawing's area is within about 5% of its true area (14 px discs and triangles
# come out 4% small, squares exact).


def _pixel_box(cx: float, cy: float, radius: float) -> tuple[float, float, float, float]:
    """The ImageDraw box of a disc of `radius` px centred at (`cx`, `cy`)."""
    return cx - radius, cy - radius, cx + radius - 1, cy + radius - 1


def _pixel_polygon(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The ImageDraw polygon for an outline in px: moved to pixel centres, and each edge moved in by
    half a pixel (corners along the bisector, so edges stay parallel)."""
    p = np.array(points) - 0.5  # (V, 2)
    edge = np.roll(p, -1, 0) - p
    normal = np.stack([edge[:, 1], -edge[:, 0]], 1) / np.linalg.norm(edge, axis=1, keepdims=True)  # (V, 2)
    if (p[:, 0] * np.roll(p[:, 1], -1) - np.roll(p[:, 0], -1) * p[:, 1]).sum() > 0:
        normal = -normal  # point the normals inward
    before, after = np.roll(normal, 1, 0), normal  # the edges into and out of each vertex
    inset = p + 0.5 * (before + after) / (1 + (before * after).sum(1, keepdims=True))
    return [(float(x), float(y)) for x, y in inset]


def independent_image(
    attrs: world.Attributes, rng: np.random.Generator, resolution: int = world.DEFAULT_RESOLUTION
) -> Image.Image:
    """`attrs` drawn by `draw_shape`, scaled by `INDEPENDENT_SCALE`, turned by up to `INDEPENDENT_TURN`
    degrees, moved and recoloured by the world's own jitter, as JPEG of `JPEG_QUALITY`."""
    return draw_shape(
        attrs,
        scale=rng.uniform(*INDEPENDENT_SCALE),
        turn=rng.uniform(-INDEPENDENT_TURN, INDEPENDENT_TURN),
        shift=tuple(rng.uniform(-world.POSITION_JITTER, world.POSITION_JITTER, 2)),
        colour_shift=tuple(rng.integers(-world.COLOUR_JITTER, world.COLOUR_JITTER + 1, 3)),
        background_shift=int(rng.integers(-world.BACKGROUND_JITTER, world.BACKGROUND_JITTER + 1)),
        resolution=resolution,
    )


def draw_shape(
    attrs: world.Attributes,
    scale: float = 1.0,
    turn: float = 0.0,
    shift: tuple[float, float] = (0.0, 0.0),
    colour_shift: tuple[int, int, int] = (0, 0, 0),
    background_shift: int = 0,
    resolution: int = world.DEFAULT_RESOLUTION,
    quality: int | None = JPEG_QUALITY,
) -> Image.Image:
    """`attrs` drawn without the world's rasteriser: aliased ImageDraw polygons and ellipses straight at
    `resolution`, the shape `scale` times the world's size, turned `turn` degrees, its centre moved by
    `shift` (fractions of the side), then saved and reloaded as JPEG of `quality` (None: not)."""
    background = tuple(int(v) for v in np.clip(np.add(world.BACKGROUNDS[attrs.background], background_shift), 0, 255))
    colour = tuple(int(v) for v in np.clip(np.add(world.COLOURS[attrs.colour], colour_shift), 0, 255))
    col, row = world.POSITIONS[attrs.position]
    cx, cy = ((world.GRID_CENTRES[i] + d) * resolution for i, d in zip((col, row), shift))
    half = world.SIZES[attrs.size] * scale * resolution / 2
    image = Image.new("RGB", (resolution, resolution), background)
    draw = ImageDraw.Draw(image)
    if attrs.shape in ("circle", "ring"):
        draw.ellipse(_pixel_box(cx, cy, half), fill=colour)
        if attrs.shape == "ring":
            draw.ellipse(_pixel_box(cx, cy, half * world.RING_HOLE), fill=background)
    else:
        outline = [(cx + half * x, cy + half * y) for x, y in _turned(_OUTLINES[attrs.shape], turn)]
        draw.polygon(_pixel_polygon(outline), fill=colour)
    return image if quality is None else as_jpeg(image, quality)


def as_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> Image.Image:
    """The image saved and reloaded as JPEG of `quality`."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def independent_set(
    n: int, rng: np.random.Generator, resolution: int = world.DEFAULT_RESOLUTION
) -> tuple[list[Image.Image], list[world.Attributes]]:
    """`n` independently drawn images of uniformly drawn attributes, and the attributes."""
    asked = [
        world.Attributes(*(str(rng.choice(world.vocabulary(name))) for name in world.ATTRIBUTE_NAMES))
        for _ in range(n)
    ]
    return [independent_image(a, rng, resolution) for a in asked], asked


def _blob_frame(rng: np.random.Generator, resolution: int) -> tuple[Image.Image, tuple[int, ...], float, float, float]:
    """A plain background, a palette colour, and a centre and radius (px) like a shape's."""
    background = world.BACKGROUNDS[str(rng.choice(list(world.BACKGROUNDS)))]
    colour = world.COLOURS[str(rng.choice(list(world.COLOURS)))]
    col, row = world.POSITIONS[str(rng.choice(list(world.POSITIONS)))]
    cx, cy = world.GRID_CENTRES[col] * resolution, world.GRID_CENTRES[row] * resolution
    radius = world.SIZES[str(rng.choice(list(world.SIZES)))] * rng.uniform(*INDEPENDENT_SCALE) * resolution / 2
    return Image.new("RGB", (resolution, resolution), background), colour, cx, cy, radius


def smooth_blob(rng: np.random.Generator, resolution: int = world.DEFAULT_RESOLUTION) -> Image.Image:
    """A filled outline whose radius wanders smoothly (harmonic 2 by 10% to 30%, 3 by half that, 4 by a
    third): a potato."""
    image, colour, cx, cy, radius = _blob_frame(rng, resolution)
    theta = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    r = np.ones_like(theta)
    for k in (2, 3, 4):
        r += rng.uniform(0.1, 0.3) / (k - 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r *= radius / r.max()
    ImageDraw.Draw(image).polygon(list(zip(cx + r * np.cos(theta), cy + r * np.sin(theta))), fill=colour)
    return as_jpeg(image)


def jagged_polygon(rng: np.random.Generator, resolution: int = world.DEFAULT_RESOLUTION) -> Image.Image:
    """6 to 11 vertices at random angles and radii (30% to 100%): a ragged shard."""
    image, colour, cx, cy, radius = _blob_frame(rng, resolution)
    k = int(rng.integers(6, 12))
    theta, r = np.sort(rng.uniform(0, 2 * np.pi, k)), radius * rng.uniform(0.3, 1.0, k)
    ImageDraw.Draw(image).polygon(list(zip(cx + r * np.cos(theta), cy + r * np.sin(theta))), fill=colour)
    return as_jpeg(image)


def scribble(rng: np.random.Generator, resolution: int = world.DEFAULT_RESOLUTION) -> Image.Image:
    """4 to 9 joined straight strokes, 2 to 4 px wide, between random points in a shape's box."""
    image, colour, cx, cy, radius = _blob_frame(rng, resolution)
    points = [(cx + x, cy + y) for x, y in rng.uniform(-radius, radius, (int(rng.integers(5, 11)), 2))]
    ImageDraw.Draw(image).line(points, fill=colour, width=int(rng.integers(2, 5)), joint="curve")
    return as_jpeg(image)
