"""`sdit bench evaluator`: how well the shapes world's attribute evaluator reads images, and how fast.

Per-attribute accuracy on jittered renders, clean and under noise and blur; the share of "none" on images
that hold no single shape (noise, blank backgrounds, two shapes); images read per second.
"""

import time

import numpy as np
from PIL import Image, ImageFilter

from sdit.shapes import evaluator, world


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


def benchmark(
    n: int = 3000, seed: int = 12345, resolution: int = world.DEFAULT_RESOLUTION
) -> dict[str, dict[str, float]]:
    """Per-attribute accuracy on `n` jittered renders, clean and perturbed; the reading speed; and
    the share of "none" shapes on images that hold no single shape (n / 10 of each kind)."""
    rng = np.random.default_rng(seed)
    records = list(world.sample(n, seed, resolution))
    asked = [r.attrs for r in records]
    evaluator.prepare()  # templates and palette, built once per process: not part of the speed
    start = time.perf_counter()
    report = {"clean": evaluator.score(evaluator.evaluate_batch([r.image for r in records]), asked).accuracy}
    report["speed"] = {"images/s": n / (time.perf_counter() - start)}  # from PIL images, all steps
    for sigma in (0.05, 0.1):
        noisy = [with_noise(r.image, sigma, rng) for r in records]
        report[f"noise sd {sigma}"] = evaluator.score(evaluator.evaluate_batch(noisy), asked).accuracy
    for radius in (0.5, 1.0):
        blurred = [with_blur(r.image, radius) for r in records]
        report[f"blur sd {radius} px"] = evaluator.score(evaluator.evaluate_batch(blurred), asked).accuracy
    m = max(n // 10, 1)
    backgrounds = list(world.BACKGROUNDS)
    negatives = {
        "noise images": [noise_image(rng, resolution) for _ in range(m)],
        "blank images": [blank_image(backgrounds[i % 3], rng, 0.05 * (i % 2), resolution) for i in range(m)],
        "two-shape images": [two_shapes_image(rng, resolution) for _ in range(m)],
    }
    for name, images in negatives.items():
        report[name] = {"shape none": float(np.mean([r.shape is None for r in evaluator.evaluate_batch(images)]))}
    return report


def format_evaluator_table(report: dict[str, dict[str, float]]) -> str:
    return "\n".join(f"{condition:18s}  " + "  ".join(f"{key} {value:.4g}" for key, value in numbers.items())
                     for condition, numbers in report.items())
