"""Read a shapes-world image back into its attributes, with a "none of these" answer for each.

`read(image)` -> `Reading(shape, colour, background, position, size)`, None where rejected;
`read_batch(images)` does the same for many, batched in torch. `sdit.shapes.scores` turns readings into
accuracies; `sdit.shapes.templates` holds the references the reading compares against.

The reader is analytic and built only on the world's own drawing code (no training):

1. Background: the median colour of a 2 px border ring (a shape may touch the border; the
   median ignores it). The ring's spread gives the noise level; a noisy image is box-blurred
   3x3 before segmenting, and a very noisy one (a noise image, a texture) is not read at all.
2. Object: pixels along the colour axis from the background to the peak-contrast pixels, or
   far from the background in any colour; 8-connected components, the largest is the object.
   A second component, or a solid patch of the object (3x3 px or more) that is no mix of its colour
   and the background (another colour touching it), means two things were drawn: no shape, position
   or size. Thinner off-mix seams are JPEG's halved chroma and ringing, and do not count.
3. Colour: the mean of the object's solid interior, less the background's tint (a teacher whose
   whole image drifts pink still draws a red red). Named by hue against the palette's own hues,
   with a reject band between neighbours; rejected when the object differs from the background
   mostly in lightness (grey) or is not one flat colour. Hue survives fading toward the
   background, so a washed-out shape keeps its name.
4. Coverage: each pixel's position along the background-to-colour axis, least squares with luma
   weighed 9x over chroma (JPEG keeps luma at full resolution, chroma at half: a small green ring
   on grey loses its hole in chroma, not in luma). Renders are exact mixes, so this recovers the
   drawing's anti-aliased mask whatever the weights; for a model's image it is a soft mask.
5. Shape: the mask is centred on its centroid, scaled by sqrt(area), its x/y spread evened out,
   and sampled on a 24x24 grid; soft IoU against templates drawn by `world.shape_alpha` (turned
   by up to 12 degrees and blurred a little, best variant). The best must reach `MIN_IOU`, less
   `ALIAS_IOU` x its outline length over its area in px (an 11 to 14 px star or ring drawn with
   whole-pixel edges needs 0.05 to 0.07 less than an anti-aliased one; a large circle 0.02), and
   beat the runner-up by `MIN_MARGIN`, and the aspect ratio must be within 20% of the shape's, so
   ragged blobs and in-between drawings (a rounded square) are "none".
6. Position: the mask's bounding-box centre, to the nearest grid centre. Size: the side of the
   box the best-matching shape would fill with the mask's coverage (blur and noise move edges,
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sdit.errors import SDiTError
from sdit.shapes import templates, world

FLOAT_SLACK = 0.1  # float images may overshoot [0, 1] this much (a raw VAE decode) and are clipped

# --- thresholds; fractions of the image side or area, or RGB distances in [0, 1] units ------------

BORDER = 1 / 32  # border ring width (2 px at 64)
SMOOTH = 0.012  # noise sd (per channel) above which the image is box-blurred 3x3 before segmenting
MAX_NOISE = 0.15  # noise sd above which nothing is read (a noise image, a texture)
MAX_BORDER_COVERED = 0.5  # fraction of the border ring the object may cover before the background is unreadable
MIN_CONTRAST = 0.12  # RGB distance from the background an object must reach
SECOND_CONTRAST = 0.25  # of the peak: a second object this faint still counts
NOISE_K = 6.0  # segmentation threshold in noise sds (after smoothing)
MIN_AREA = 0.005  # of the image: a component smaller than this is a speck, not an object
FOREIGN = 0.2  # RGB distance off the background-to-colour line that makes a pixel another colour
MAX_AREA = 0.5  # of the image: a larger "object" is a background we failed to see
CC_STEPS_PER_SIDE = 2  # label propagation steps per image side: more than any shape's geodesic diameter
MAX_ASPECT = 0.2  # |log aspect ratio| off the template's: a 20% squash or stretch is still the shape
MIN_IOU = 0.85  # best template soft IoU; clean renders score 0.91 to 0.99
ALIAS_IOU = 0.09  # MIN_IOU is lowered by this x outline length / area, in px: what whole-pixel edges cost
MIN_MARGIN = 0.05  # over the second best; circle and square templates overlap at 0.84

MIN_CHROMA = 0.1  # max - min channel of the object's colour: below it, hue is noise
MIN_CHROMA_SHARE = 0.3  # chroma / contrast: an object that differs from the background mostly in lightness is grey
MAX_SPREAD = 0.3  # rms colour spread of the interior, as a fraction of the object's contrast

BACKGROUND_BANDS = {"black": (0.0, 0.25), "grey": (0.3, 0.7), "white": (0.75, 1.0)}  # mean level
MAX_BACKGROUND_CHROMA = 0.15  # max - min channel

SIZE_REJECT = 0.06  # relative band around the geometric mean of the two sizes


@dataclass(frozen=True)
class Reading:
    """What the reader saw. A field is None where it rejected ("none of these")."""

    shape: str | None
    colour: str | None
    background: str | None
    position: str | None
    size: str | None


# --- the reading ---------------------------------------------------------------------------------------


def _as_batch(images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
    """Images (PIL, or H x W x 3 arrays: uint8, or floats in [0, 1]) -> (N, 3, H, W) float32 in [0, 1]."""
    arrays = [_as_array(image) for image in images]
    if len({a.shape for a in arrays}) > 1:
        raise SDiTError("images in one batch must share one size; read differently sized images apart")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise SDiTError(f"an image array must be H x W x 3 (RGB, channels last), got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    a = a.astype(np.float32)
    if a.min() < -FLOAT_SLACK or a.max() > 1 + FLOAT_SLACK:
        raise SDiTError(
            f"float image values must lie in [0, 1], got [{a.min():.3g}, {a.max():.3g}]; "
            "map a model's [-1, 1] output with (x + 1) / 2, or pass uint8"
        )
    return a.clip(0, 1)


def _norm(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm over dim 1; torch's own norm over a strided dim is about 50x slower on the CPU."""
    return (x * x).sum(1).sqrt()


def _box(x: torch.Tensor, k: int) -> torch.Tensor:
    p = k // 2
    return F.avg_pool2d(F.pad(x, (p, p, p, p), mode="replicate"), k, stride=1)


def _border(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Background colour (N, 3), per-channel noise sd (N,), border pixels (N, 3, P)."""
    h, w = x.shape[-2:]
    b = max(1, round(h * BORDER))
    ring = torch.ones(h, w, dtype=torch.bool)
    ring[b:-b, b:-b] = False
    pixels = x[:, :, ring]  # (N, 3, P)
    background = pixels.median(dim=2).values  # (N, 3)
    distance = _norm(pixels - background[..., None])  # (N, P)
    noise = distance.median(dim=1).values / 1.54  # the median of a 3-d chi is 1.54 sd
    return background, noise, pixels


def _mean_over(x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) averaged over the pixels of a (N, H, W) mask -> (N, C); zeros for empty masks."""
    weight = where[:, None].to(x.dtype)
    return (x * weight).sum((2, 3)) / weight.sum((2, 3)).clamp_min(1)


def _project(
    x: torch.Tensor, background: torch.Tensor, axis: torch.Tensor, metric: torch.Tensor | None = None
) -> torch.Tensor:
    """Each pixel's position along background -> background + axis: (N, 3, H, W) -> (N, H, W), least
    squares in the (3, 3) `metric` (None: plain RGB distance)."""
    weighted = axis if metric is None else axis @ metric  # (N, 3): M axis (M is symmetric)
    along = ((x - background[..., None, None]) * weighted[..., None, None]).sum(1)
    return along / (axis * weighted).sum(1).clamp_min(1e-12)[:, None, None]


def _max3(x: torch.Tensor) -> torch.Tensor:
    """(N, H, W) maximum over each 3x3 neighbourhood, zero outside the image. Separable slices are
    about 25x faster than max_pool2d on the CPU, and int16 labels halve the memory traffic again."""
    p = F.pad(x, (1, 1, 1, 1))
    rows = torch.maximum(torch.maximum(p[:, :, :-2], p[:, :, 1:-1]), p[:, :, 2:])  # (N, H + 2, W)
    return torch.maximum(torch.maximum(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])  # (N, H, W)


def _components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected labels (N, H, W) of a boolean mask: each component takes its largest pixel index + 1."""
    n, h, w = mask.shape
    dtype = torch.int16 if h * w < 2**15 else torch.int32
    labels = torch.arange(1, h * w + 1, dtype=dtype).view(1, h, w) * mask  # (N, H, W)
    for step in range(CC_STEPS_PER_SIDE * max(h, w)):
        grown = _max3(labels) * mask
        if step % 4 == 3 and torch.equal(grown, labels):
            break
        labels = grown
    return labels


@dataclass(frozen=True)
class Measurements:
    """Per-image measurements, batched (N leading); colours and distances in [0, 1] RGB units."""

    background: torch.Tensor  # (N, 3) border median, after smoothing
    noise: torch.Tensor  # (N,) per-channel noise sd of the border, before smoothing
    noise_smoothed: torch.Tensor  # (N,) and after
    covered: torch.Tensor  # (N,) fraction of the border ring that belongs to something else
    peak: torch.Tensor  # (N,) largest distance from the background
    area: torch.Tensor  # (N,) the largest component, fraction of the image
    second: torch.Tensor  # (N,) the second largest component
    foreign: torch.Tensor  # (N,) solid 3x3 patches of the object off its colour's mixing line, fraction of the image
    colour: torch.Tensor  # (N, 3) mean of the object's interior
    spread: torch.Tensor  # (N,) rms colour spread of the interior / the object's contrast
    ious: torch.Tensor  # (N, K) soft IoU with each shape's template, best variant
    aspect_error: torch.Tensor  # (N, K) |log aspect ratio - the template's|
    min_iou: torch.Tensor  # (N, K) the IoU each shape's template must reach, lower for small objects
    centre: torch.Tensor  # (N, 2) bounding-box centre (x, y), fractions of the side
    extent: torch.Tensor  # (N,) side of the box the best-matching shape would fill, fraction of the image side


def _smooth(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Box-blur noisy images (3x3) so that segmentation sees shapes, not grain."""
    noisy = noise > SMOOTH
    if not noisy.any():
        return x
    out = x.clone()
    out[noisy] = _box(x[noisy], 3)
    return out


def _segment(
    x: torch.Tensor, background: torch.Tensor, noise: torch.Tensor, distance: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The largest object (N, H, W), its area and the second largest (N,), and the threshold (N,).

    A first colour guess (the pixels near peak contrast) gives a colour axis; the projection onto
    it sees a weak-contrast object through noise, and plain distance from the background, at a
    quarter of the peak, still sees a second object of another, fainter colour.
    """
    n, _, h, w = x.shape
    peak = distance.flatten(1).amax(1)  # (N,)
    guess = _mean_over(x, distance >= 0.75 * peak[:, None, None]) - background  # (N, 3)
    threshold = torch.maximum(SECOND_CONTRAST * peak, NOISE_K * noise).clamp_min(MIN_CONTRAST / 2)  # (N,)
    mask = (_project(x, background, guess) > 0.5) | (distance > threshold[:, None, None])
    labels = _components(mask).long().flatten(1)  # (N, HW)
    counts = torch.zeros(n, h * w + 1).scatter_add_(1, labels, torch.ones(n, h * w))
    counts[:, 0] = 0  # the background
    top = counts.topk(2, dim=1)
    main = (labels == top.indices[:, :1]).view(n, h, w)
    return main, top.values[:, 0] / (h * w), top.values[:, 1] / (h * w), threshold


def _object_colour(
    x: torch.Tensor, main: torch.Tensor, distance: torch.Tensor, background: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The object's colour (N, 3) from its solid interior, and the interior's rms spread / contrast (N,).

    Solid: past half the peak contrast, then eroded by one pixel where anything is left, so that
    soft edges do not pull the colour toward the background.
    """
    n = len(x)
    peak = distance.flatten(1).amax(1)[:, None, None]
    solid = main & (distance >= 0.5 * peak)
    interior = solid & ~_max3((~solid).to(torch.uint8)).bool()
    core = torch.where(interior.flatten(1).sum(1).view(n, 1, 1) >= 4, interior, solid)  # (N, H, W)
    colour = _mean_over(x, core)  # (N, 3)
    deviation = ((x - colour[..., None, None]) ** 2).sum(1, keepdim=True)  # (N, 1, H, W)
    spread = _mean_over(deviation, core)[:, 0].sqrt() / _norm(colour - background).clamp_min(1e-6)
    return colour, spread


def _measure(x: torch.Tensor) -> Measurements:
    """(N, 3, H, W) in [0, 1] -> what the naming rules need."""
    n, _, h, w = x.shape
    _, noise, _ = _border(x)
    x = _smooth(x, noise)
    background, noise_s, border = _border(x)  # re-estimated after smoothing
    distance = _norm(x - background[..., None, None])  # (N, H, W)
    main, area, second, threshold = _segment(x, background, noise_s, distance)
    colour, spread = _object_colour(x, main, distance, background)

    # Coverage: the position along the background-to-colour axis, near the object only. Renders
    # are exact mixes, so this is the drawing's anti-aliased mask.
    axis = colour - background  # (N, 3)
    along = _project(x, background, axis, templates.luma_metric()).clamp(0, 1)  # (N, H, W)
    support = _max3(main.to(torch.uint8)).to(x.dtype)  # the object dilated by 1 px
    alpha = along * support

    # Pixels of the object that are no mix of its colour and the background: a second object of
    # another colour touching the first. Only those whose whole 3x3 neighbourhood is foreign count:
    # JPEG's halved chroma and ringing leave 1 to 2 px seams of off-mix pixels along every edge.
    off_axis = _norm(x - background[..., None, None] - along[:, None] * axis[..., None, None])
    limit = (NOISE_K * noise_s).clamp_min(FOREIGN)[:, None, None]
    off_mix = (off_axis > limit) & (support > 0)  # (N, H, W)
    foreign = (off_mix & ~_max3((~off_mix).to(torch.uint8)).bool()).flatten(1).float().mean(1)

    samples, aspect = templates.normalised_samples(alpha)
    references, template_aspect = templates.shape_templates()
    ious = _soft_iou(samples, references)
    return Measurements(
        background=background,
        noise=noise,
        noise_smoothed=noise_s,
        covered=(_norm(border - background[..., None]) > threshold[:, None]).float().mean(1),
        peak=distance.flatten(1).amax(1),
        area=area,
        second=second,
        foreign=foreign,
        colour=colour,
        spread=spread,
        ious=ious,
        aspect_error=(aspect[:, None] - template_aspect[None]).abs(),
        min_iou=MIN_IOU - ALIAS_IOU * templates.outlines()[None] / alpha.sum((1, 2)).clamp_min(1).sqrt()[:, None],
        centre=_box_centre(alpha > 0.5),
        extent=_box_side(alpha, ious) / max(h, w),
    )


def _name(m: Measurements) -> list[Reading]:
    """Measurements -> Readings, None wherever a rule rejects."""
    readable = m.noise <= MAX_NOISE
    found = readable & (m.peak >= MIN_CONTRAST) & (m.peak >= NOISE_K * m.noise_smoothed)
    found &= (m.area >= MIN_AREA) & (m.area <= MAX_AREA)
    single = found & (m.second < MIN_AREA) & (m.foreign < MIN_AREA)  # else shape, position, size are moot
    has_colour = found & (m.spread <= MAX_SPREAD)
    has_background = readable & (m.covered <= MAX_BORDER_COVERED)

    tint = m.background - m.background.mean(1, keepdim=True)  # (N, 3) the background's drift from grey
    colours = _name_colours((m.colour - tint).clamp(0, 1).numpy(), _norm(m.colour - m.background).numpy())
    backgrounds = _name_backgrounds(m.background.numpy())
    shape_names = _name_shapes(m.ious, m.aspect_error, m.min_iou)
    out = []
    for i in range(len(m.peak)):
        one = bool(single[i])
        out.append(
            Reading(
                shape=shape_names[i] if one else None,
                colour=colours[i] if has_colour[i] else None,
                background=backgrounds[i] if has_background[i] else None,
                position=_position_name(m.centre[i]) if one else None,
                size=_size_name(float(m.extent[i])) if one else None,
            )
        )
    return out


def _soft_iou(samples: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """(N, G, G) x (V, K, G, G) -> (N, K): sum of minima over sum of maxima, best variant V.

    min(a, t) + max(a, t) = a + t and max - min = |a - t|, so the ratio needs only the masses and
    the L1 distance, which cdist computes for all pairs at once."""
    v, k = references.shape[:2]
    a, t = samples.flatten(1), references.flatten(2).flatten(0, 1)  # (N, G*G), (V*K, G*G)
    mass = a.sum(1)[:, None] + t.sum(1)[None]  # (N, V*K)
    l1 = torch.cdist(a, t, p=1)  # (N, V*K)
    iou = (mass - l1) / (mass + l1).clamp_min(1e-6)
    return iou.view(-1, v, k).amax(1)  # (N, K)


def _box_centre(mask: torch.Tensor) -> torch.Tensor:
    """(N, H, W) -> (N, 2) bounding-box centre (x, y) as fractions of the side; 0.5 for empty masks."""
    h, w = mask.shape[-2:]
    cols, rows = mask.any(1), mask.any(2)  # (N, W), (N, H)
    centres = []
    for occupied, size in ((cols, w), (rows, h)):
        idx = torch.arange(size)
        first = torch.where(occupied, idx, size).amin(1)
        last = torch.where(occupied, idx, -1).amax(1)
        centres.append(torch.where(last >= first, (first + last + 1) / 2 / size, torch.tensor(0.5)))
    return torch.stack(centres, 1)


def _box_side(alpha: torch.Tensor, ious: torch.Tensor) -> torch.Tensor:
    """(N, H, W), (N, K) -> (N,) px: the side of the square box that the best-matching shape would
    fill with this much coverage. Coverage sums survive blur and noise, where edges and thin star
    points do not."""
    fill = templates.fill_fractions()[ious.argmax(1)]  # (N,)
    return (alpha.sum((1, 2)) / fill).sqrt()


def _name_shapes(ious: torch.Tensor, aspect_error: torch.Tensor, min_iou: torch.Tensor) -> list[str | None]:
    top = ious.topk(2, dim=1)
    best = top.indices[:, 0]
    ok = top.values[:, 0] >= min_iou.gather(1, best[:, None])[:, 0]
    ok &= top.values[:, 0] - top.values[:, 1] >= MIN_MARGIN
    ok &= aspect_error.gather(1, best[:, None])[:, 0] <= MAX_ASPECT
    return [world.SHAPES[int(k)] if bool(good) else None for k, good in zip(best, ok)]


def _name_colours(rgb: np.ndarray, contrast: np.ndarray) -> list[str | None]:
    """(N, 3) tint-corrected object colours and (N,) their distance from the background -> palette
    names by hue, or None. Hue and chroma survive mixing with a grey background, so a washed-out
    drawing keeps its name; saturation (chroma / value) would not."""
    hue, _, _ = templates.hsv(rgb)
    chroma = rgb.max(1) - rgb.min(1)
    hues, half = templates.palette_hues()
    signed = (hue[:, None] - hues[None] + 180) % 360 - 180  # (N, K)
    nearest = np.abs(signed).argmin(1)
    offset = signed[np.arange(len(rgb)), nearest]
    limit = np.where(offset < 0, half[nearest, 0], half[nearest, 1])
    ok = (chroma >= MIN_CHROMA) & (chroma >= MIN_CHROMA_SHARE * contrast) & (np.abs(offset) <= limit)
    names = tuple(world.COLOURS)
    return [names[k] if good else None for k, good in zip(nearest, ok)]


def _name_backgrounds(rgb: np.ndarray) -> list[str | None]:
    level, chroma = rgb.mean(1), rgb.max(1) - rgb.min(1)
    out = []
    for lv, ch in zip(level, chroma):
        names = [name for name, (lo, hi) in BACKGROUND_BANDS.items() if lo <= lv <= hi]
        out.append(names[0] if names and ch <= MAX_BACKGROUND_CHROMA else None)
    return out


def _position_name(centre: torch.Tensor) -> str:
    col, row = (int(np.abs(np.array(world.GRID_CENTRES) - float(c)).argmin()) for c in centre)
    return next(name for name, cell in world.POSITIONS.items() if cell == (col, row))


def _size_name(extent: float) -> str | None:
    small, large = world.SIZES["small"], world.SIZES["large"]
    ratio = math.log(extent / math.sqrt(small * large)) if extent > 0 else -math.inf
    if abs(ratio) < SIZE_REJECT:
        return None
    return "large" if ratio > 0 else "small"


def prepare() -> None:
    """Build the templates and the palette now (each process builds them once, on first use)."""
    templates.shape_templates(), templates.fill_fractions(), templates.palette_hues()


def read(image: Image.Image | np.ndarray) -> Reading:
    """Read one image (PIL, or an H x W x 3 array: uint8, or floats in [0, 1])."""
    return _name(_measure(_as_batch([image])))[0]


def read_batch(images: Iterable[Image.Image | np.ndarray], batch_size: int = 256) -> list[Reading]:
    """Read many same-sized images, `batch_size` at a time (memory is bounded by the batch)."""
    out: list[Reading] = []
    chunk: list[Image.Image | np.ndarray] = []
    for image in images:
        chunk.append(image)
        if len(chunk) == batch_size:
            out += _name(_measure(_as_batch(chunk)))
            chunk = []
    if chunk:
        out += _name(_measure(_as_batch(chunk)))
    return out
