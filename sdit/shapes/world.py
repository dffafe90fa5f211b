"""The shapes world: a procedural, seeded generator of captioned images, and its data splits.

One image holds one flat-coloured shape on a plain background. Five attributes describe it:

    shape       circle, square, triangle, cross, star, ring
    colour      red, yellow, green, cyan, blue, purple  (saturated hues about 60 degrees apart)
    background  white, grey, black                      (achromatic, so never a shape colour)
    position    a 3x3 grid: top left, top, top right, left, center, right, bottom left, ...
    size        small (7/32 of the image side: 14 px at 64), large (3/8: 24 px)

Images are 64 px by default: SD's VAE downsamples 8x, so 64 px gives 8x8 latents, and room for a 3x3 grid with a
small shape still 14 px (under 2 latent cells) across. At 32 px the latents would be 4x4 and a small shape 7 px.

Shapes are drawn on a 4x canvas and box-downsampled, so edges are anti-aliased and every pixel is
an exact mix alpha * colour + (1 - alpha) * background (the reader relies on this). A seeded
jitter moves the shape by up to 3% of the side, scales it by 0.92 to 1.08 and shifts colours by a
few levels, so no two images are identical. Shapes are never rotated.

Held out of the student's images (`HELDOUT`): the whole shape "cross", the whole colour "yellow",
and five shape-colour pairs of otherwise seen values. They appear only in `prompt_bank()` (text)
and in the evaluation prompts, so the student can learn them only from the teacher.

Randomness: record i of a stream is drawn from `np.random.default_rng((seed, stream, i))`, so a
record does not depend on how many came before it, and the whole-world stream and the limited
split never share a draw.

The API, in the order data flows:
    Attributes, vocabulary(name), all_attributes()      what an image can show
    render(attrs, rng, resolution) -> PIL image          rng=None: the canonical, unjittered image
    caption(attrs, rng, template) -> str                 TEMPLATES: 8 wordings; 4 state everything,
                                                         2 omit size, 1 position, 1 both
    sample(n, seed) -> Records                           the whole world (the teacher's data)
    limited_split(n, seed) -> Records                    the student's images, no HELDOUT concept
    heldout_prompts(), seen_prompts(), prompt_bank()     Prompts (text + attributes) to evaluate, or
                                                         to ask the teacher about without images
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from sdit.errors import SDiTError

DEFAULT_RESOLUTION = 64  # 8x8 latents through SD's 8x VAE; see the module docstring
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-downsampled: anti-aliasing with exact coverage

# --- the vocabularies ------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "cross", "star", "ring")
COLOURS: dict[str, tuple[int, int, int]] = {  # hues about 0, 52, 128, 187, 229, 283 degrees
    "red": (215, 35, 35),
    "yellow": (235, 205, 30),
    "green": (35, 160, 55),
    "cyan": (30, 190, 210),
    "blue": (40, 70, 215),
    "purple": (150, 50, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "grey": (128, 128, 128),
    "black": (15, 15, 15),
}
POSITIONS: dict[str, tuple[int, int]] = {  # name -> (column, row) in the 3x3 grid
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}  # fmt: skip
GRID_CENTRES = (0.25, 0.5, 0.75)  # shape centres, as fractions of the side; inset so large shapes fit
SIZES: dict[str, float] = {"small": 0.21875, "large": 0.375}  # side of the shape's square box / image side

# --- the jitter that keeps images apart --------------------------------------------------------

POSITION_JITTER = 0.03  # +- fraction of the image side
SIZE_JITTER = (0.92, 1.08)  # scale factor range
COLOUR_JITTER = 8  # +- levels per channel of the shape colour
BACKGROUND_JITTER = 6  # +- levels, one for all three channels (backgrounds stay achromatic)

ATTRIBUTE_NAMES = ("shape", "colour", "background", "position", "size")


@dataclass(frozen=True)
class Attributes:
    """What one image shows. Every value must come from the world's vocabularies."""

    shape: str
    colour: str
    background: str
    position: str
    size: str

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value not in vocabulary(name):
                raise SDiTError(f"unknown {name} {value!r}; choose one of {', '.join(vocabulary(name))}")


def vocabulary(attribute: str) -> tuple[str, ...]:
    """The values one attribute can take, in the world's fixed order."""
    table = {"shape": SHAPES, "colour": COLOURS, "background": BACKGROUNDS, "position": POSITIONS, "size": SIZES}
    if attribute not in table:
        raise SDiTError(f"unknown attribute {attribute!r}; choose one of {', '.join(ATTRIBUTE_NAMES)}")
    return tuple(table[attribute])


def all_attributes() -> list[Attributes]:
    """Every combination in the world (6 x 6 x 3 x 9 x 2 = 1,944), in a fixed order."""
    return [Attributes(*values) for values in itertools.product(*(vocabulary(a) for a in ATTRIBUTE_NAMES))]


# --- held-out concepts -----------------------------------------------------------------------


@dataclass(frozen=True)
class Concept:
    """A set of attribute values: a whole shape, a whole colour, or a shape-colour pair.

    `matches` accepts anything with `shape` and `colour` fields (Attributes, or the reader's
    Reading, whose rejected fields are None and so never match).
    """

    name: str
    shape: str | None = None
    colour: str | None = None

    def matches(self, x: Any) -> bool:
        return (self.shape is None or x.shape == self.shape) and (self.colour is None or x.colour == self.colour)


HELDOUT_SHAPES = ("cross",)
HELDOUT_COLOURS = ("yellow",)
# A diagonal: each seen shape loses one seen colour and each seen colour one seen shape.
HELDOUT_PAIRS = (
    ("circle", "red"), ("square", "green"), ("triangle", "blue"), ("star", "cyan"), ("ring", "purple"),
)  # fmt: skip
HELDOUT: tuple[Concept, ...] = (
    *(Concept(s, shape=s) for s in HELDOUT_SHAPES),
    *(Concept(c, colour=c) for c in HELDOUT_COLOURS),
    *(Concept(f"{c} {s}", shape=s, colour=c) for s, c in HELDOUT_PAIRS),
)
SEEN_SHAPES = tuple(s for s in SHAPES if s not in HELDOUT_SHAPES)
SEEN_COLOURS = tuple(c for c in COLOURS if c not in HELDOUT_COLOURS)


def is_heldout(attrs: Attributes) -> bool:
    """True when the student must never see an image with these attributes."""
    return any(concept.matches(attrs) for concept in HELDOUT)


def _seen_pairs() -> list[tuple[str, str]]:
    return [(s, c) for s in SEEN_SHAPES for c in SEEN_COLOURS if (s, c) not in HELDOUT_PAIRS]


def _heldout_pairs() -> list[tuple[str, str]]:
    """Pairs with a held-out shape or colour, then the held-out pairs of seen values."""
    pairs = [(s, c) for s in SHAPES for c in COLOURS if s in HELDOUT_SHAPES or c in HELDOUT_COLOURS]
    return pairs + list(HELDOUT_PAIRS)


# --- drawing -----------------------------------------------------------------------------------

_Draw = Callable[[ImageDraw.ImageDraw, Callable[[float, float], tuple[float, float]]], None]
STAR_INNER_RADIUS = 0.45  # of the outer radius; fatter than a regular star (0.38) so points survive 14 px
CROSS_ARM = 0.34  # arm width / box side (a third: arms stay 5 px wide on a small cross)
RING_HOLE = 0.5  # hole diameter / outer diameter


def _ellipse(draw: ImageDraw.ImageDraw, to_px, r: float, fill: int) -> None:
    (x0, y0), (x1, y1) = to_px(-r, -r), to_px(r, r)
    draw.ellipse((x0, y0, x1, y1), fill=fill)


def _polygon(draw: ImageDraw.ImageDraw, to_px, points: Iterable[tuple[float, float]]) -> None:
    draw.polygon([to_px(x, y) for x, y in points], fill=255)


def _star_points() -> list[tuple[float, float]]:
    """Five points up, stretched to fill the box [-1, 1]^2 like every other shape."""
    angles = [math.radians(-90 + 36 * k) for k in range(10)]
    radii = [1.0 if k % 2 == 0 else STAR_INNER_RADIUS for k in range(10)]
    xs = [r * math.cos(a) for r, a in zip(radii, angles)]
    ys = [r * math.sin(a) for r, a in zip(radii, angles)]
    sx, sy = max(xs), (max(ys) - min(ys)) / 2
    oy = (max(ys) + min(ys)) / 2
    return [(x / sx, (y - oy) / sy) for x, y in zip(xs, ys)]


def _draw_cross(draw: ImageDraw.ImageDraw, to_px) -> None:
    a = CROSS_ARM  # half the arm width, in box half-sides
    _polygon(draw, to_px, [(-a, -1), (a, -1), (a, 1), (-a, 1)])
    _polygon(draw, to_px, [(-1, -a), (1, -a), (1, a), (-1, a)])


def _draw_ring(draw: ImageDraw.ImageDraw, to_px) -> None:
    _ellipse(draw, to_px, 1.0, 255)
    _ellipse(draw, to_px, RING_HOLE, 0)  # the hole is background, not a colour


_STAR = _star_points()
_DRAWERS: dict[str, _Draw] = {  # each fills the box [-1, 1]^2 exactly, y down
    "circle": lambda draw, to_px: _ellipse(draw, to_px, 1.0, 255),
    "square": lambda draw, to_px: _polygon(draw, to_px, [(-1, -1), (1, -1), (1, 1), (-1, 1)]),
    "triangle": lambda draw, to_px: _polygon(draw, to_px, [(0, -1), (1, 1), (-1, 1)]),
    "cross": _draw_cross,
    "star": lambda draw, to_px: _polygon(draw, to_px, _STAR),
    "ring": _draw_ring,
}
assert set(_DRAWERS) == set(SHAPES)


def shape_alpha(shape: str, centre: tuple[float, float], side: float, resolution: int) -> np.ndarray:
    """Coverage of `shape` in a square box of `side` px centred at `centre` (px, x right, y down).

    Returns (resolution, resolution) float32 in [0, 1]: the fraction of each pixel the shape
    covers, from a 4x drawing box-downsampled.
    """
    if shape not in _DRAWERS:
        raise SDiTError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    big = resolution * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    cx, cy, half = centre[0] * SUPERSAMPLE, centre[1] * SUPERSAMPLE, side * SUPERSAMPLE / 2

    def to_px(x: float, y: float) -> tuple[float, float]:
        return cx + x * half, cy + y * half

    _DRAWERS[shape](ImageDraw.Draw(canvas), to_px)
    small = canvas.reduce(SUPERSAMPLE)  # box filter: each output pixel is the mean of a 4x4 block
    return np.asarray(small, dtype=np.float32) / 255.0


@dataclass(frozen=True)
class Layout:
    """Where and how one image is drawn, after jitter; all in pixels and 0..255 levels."""

    centre: tuple[float, float]
    side: float
    colour: tuple[float, float, float]
    background: tuple[float, float, float]


def layout(attrs: Attributes, resolution: int, rng: np.random.Generator | None = None) -> Layout:
    """The geometry and colours of `attrs`, jittered by `rng` (none: the canonical image)."""
    col, row = POSITIONS[attrs.position]
    dx, dy, scale, dc, db = 0.0, 0.0, 1.0, np.zeros(3), 0.0
    if rng is not None:
        dx, dy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
        scale = rng.uniform(*SIZE_JITTER)
        dc = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
        db = rng.integers(-BACKGROUND_JITTER, BACKGROUND_JITTER + 1)
    centre = (float(GRID_CENTRES[col] + dx) * resolution, float(GRID_CENTRES[row] + dy) * resolution)
    colour = np.clip(np.array(COLOURS[attrs.colour]) + dc, 0, 255)
    background = np.clip(np.array(BACKGROUNDS[attrs.background]) + db, 0, 255)
    side = float(SIZES[attrs.size] * scale * resolution)
    return Layout(centre, side, tuple(map(float, colour)), tuple(map(float, background)))


def render(
    attrs: Attributes, rng: np.random.Generator | None = None, resolution: int = DEFAULT_RESOLUTION
) -> Image.Image:
    """An RGB image of `attrs`; `rng` draws the jitter (none: the canonical, unjittered image)."""
    if resolution < 16:
        raise SDiTError(f"resolution {resolution} is too small for a 3x3 grid of shapes; use 32 or more")
    lay = layout(attrs, resolution, rng)
    alpha = shape_alpha(attrs.shape, lay.centre, lay.side, resolution)[..., None]  # (H, W, 1)
    pixels = alpha * np.array(lay.colour) + (1 - alpha) * np.array(lay.background)  # (H, W, 3)
    return Image.fromarray(np.rint(pixels).astype(np.uint8), "RGB")


# --- captions ----------------------------------------------------------------------------------


class Template(NamedTuple):
    text: str
    names: tuple[str, ...]  # the attributes the caption states


_AT = {  # the position as a prepositional phrase
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}  # fmt: skip
_ALL = ATTRIBUTE_NAMES
_NO_SIZE = ("shape", "colour", "background", "position")
_NO_POSITION = ("shape", "colour", "background", "size")
# Template 0 states everything and is the canonical wording of evaluation prompts.
TEMPLATES: tuple[Template, ...] = (
    Template("a {size} {colour} {shape} {at} on a {background} background", _ALL),
    Template("{colour} {shape}, {position}, {background} background", _NO_SIZE),
    Template("a picture of a {size} {colour} {shape} {at} over a {background} background", _ALL),
    Template("a {colour} {shape} on a {background} background", ("shape", "colour", "background")),
    Template("a {background} background with a {size} {colour} {shape} {at}", _ALL),
    Template("a {size} {colour} {shape} on a plain {background} background", _NO_POSITION),
    Template("{size} {colour} {shape}, {position}, {background} background", _ALL),
    Template("an image of a {colour} {shape} {at} against a {background} background", _NO_SIZE),
)


def caption(attrs: Attributes, rng: np.random.Generator | None = None, template: int | None = None) -> str:
    """A plain-English caption; the template is `template`, else drawn by `rng`, else template 0."""
    if template is None:
        template = 0 if rng is None else int(rng.integers(len(TEMPLATES)))
    if not 0 <= template < len(TEMPLATES):
        raise SDiTError(f"caption template {template} does not exist; choose 0 to {len(TEMPLATES) - 1}")
    text = TEMPLATES[template].text.format(**asdict(attrs), at=_AT[attrs.position])
    return re.sub(r"\ba (?=[aeiou])", "an ", text)  # "a orange" -> "an orange", should a vowel appear


# --- records and streams -----------------------------------------------------------------------


class Record(NamedTuple):
    attrs: Attributes
    image: Image.Image
    caption: str


_WORLD_STREAM = 0  # the whole world: the teacher's training data
_LIMITED_STREAM = 1  # the student's limited split: different images, never a held-out concept
_PROMPT_STREAM = 2  # the prompt bank's choice of wording


def _draw_record(
    seed: int, stream: int, index: int, pairs: Sequence[tuple[str, str]], resolution: int
) -> Record:
    """Record `index` of a stream: a shape-colour pair from `pairs`, the rest uniform, then jitter and wording."""
    rng = np.random.default_rng((seed, stream, index))
    shape, colour = pairs[int(rng.integers(len(pairs)))]
    background, position, size = (_pick(rng, vocabulary(name)) for name in ("background", "position", "size"))
    attrs = Attributes(shape, colour, background, position, size)
    image = render(attrs, rng, resolution)
    return Record(attrs, image, caption(attrs, rng))


def _pick(rng: np.random.Generator, values: Sequence[str]) -> str:
    return values[int(rng.integers(len(values)))]


def sample(n: int, seed: int, resolution: int = DEFAULT_RESOLUTION) -> Iterator[Record]:
    """`n` records drawn uniformly from the whole world, held-out concepts included."""
    pairs = [(s, c) for s in SHAPES for c in COLOURS]
    for i in range(n):
        yield _draw_record(seed, _WORLD_STREAM, i, pairs, resolution)


def limited_split(n: int, seed: int, resolution: int = DEFAULT_RESOLUTION) -> Iterator[Record]:
    """`n` records for the student: uniform over the world less every `HELDOUT` concept.

    Meant to be a few percent of what the teacher trains on (e.g. 1,500 records beside a teacher
    trained on 50,000 `sample` records); it holds 5 shapes x 5 colours - 5 pairs = 20 shape-colour
    pairs, each with every background, position and size.
    """
    pairs = _seen_pairs()
    for i in range(n):
        yield _draw_record(seed, _LIMITED_STREAM, i, pairs, resolution)


# --- prompts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """A text prompt and the attributes it asks for. `said` lists those its wording states;
    `concepts` names the held-out concepts it asks for (empty for a seen prompt)."""

    text: str
    attrs: Attributes
    said: tuple[str, ...] = _ALL
    concepts: tuple[str, ...] = ()


def _prompt(attrs: Attributes, template: int = 0) -> Prompt:
    names = tuple(c.name for c in HELDOUT if c.matches(attrs))
    return Prompt(caption(attrs, template=template), attrs, TEMPLATES[template].names, names)


def _evaluation_prompts(pairs: list[tuple[str, str]]) -> list[Prompt]:
    """Each pair with every background and size, positions cycling so that all nine appear."""
    prompts = []
    combos = [(s, c, b, z) for (s, c) in pairs for b in BACKGROUNDS for z in SIZES]
    for k, (shape, colour, background, size) in enumerate(combos):
        position = tuple(POSITIONS)[k % len(POSITIONS)]
        prompts.append(_prompt(Attributes(shape, colour, background, position, size)))
    return prompts


def heldout_prompts() -> list[Prompt]:
    """Evaluation prompts that ask for a held-out concept, in the canonical wording (template 0).

    16 shape-colour pairs (cross with each colour, yellow with each shape, the 5 held-out pairs),
    each with 3 backgrounds x 2 sizes: 96 prompts. Sample several images per prompt.
    """
    return _evaluation_prompts(_heldout_pairs())


def seen_prompts() -> list[Prompt]:
    """Evaluation prompts for the 20 shape-colour pairs in the student's images: 120 prompts."""
    return _evaluation_prompts(_seen_pairs())


def prompt_bank(seed: int = 0, per_pair: int | None = None) -> list[Prompt]:
    """Text-only prompts for the whole world: every one of the 1,944 combinations once, held-out
    concepts included, each in a seeded choice of caption template (some omit size or position).

    With `per_pair`, a smaller bank that still covers the world evenly: a seeded choice of `per_pair`
    combinations of each of the 36 shape-colour pairs (so 36 x per_pair prompts), in the same order."""
    rng = np.random.default_rng((seed, _PROMPT_STREAM))
    bank = [_prompt(attrs, int(rng.integers(len(TEMPLATES)))) for attrs in all_attributes()]
    if per_pair is None:
        return bank
    pick = np.random.default_rng((seed, _PROMPT_STREAM, per_pair))
    pairs: dict[tuple[str, str], list[int]] = {}
    for i, p in enumerate(bank):
        pairs.setdefault((p.attrs.shape, p.attrs.colour), []).append(i)
    keep = sorted(i for members in pairs.values() for i in pick.choice(members, size=per_pair, replace=False))
    return [bank[i] for i in keep]
