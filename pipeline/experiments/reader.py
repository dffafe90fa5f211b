"""`sdit bench evaluator`: how well the shapes reader reads images, and how fast.

Per-attribute accuracy on jittered renders, clean, under noise and blur and as JPEG; on images drawn
independently of the world's rasteriser (`sdit.shapes.probes.independent_image`); the share of "none" on images
that hold no single shape (noise, blank backgrounds, two shapes, blobs and scribbles); images read per second.
"""

import time

import numpy as np

from sdit.shapes import reader, world
from sdit.shapes.probes import (
    JPEG_QUALITY,
    as_jpeg,
    blank_image,
    independent_set,
    jagged_polygon,
    noise_image,
    scribble,
    smooth_blob,
    two_shapes_image,
    with_blur,
    with_noise,
)
from sdit.shapes.scores import score


def benchmark(
    n: int = 3000, seed: int = 12345, resolution: int = world.DEFAULT_RESOLUTION
) -> dict[str, dict[str, float]]:
    """Per-attribute accuracy on `n` jittered renders, clean, perturbed and as JPEG, and on `n` images
    drawn independently of the world's rasteriser (`independent_image`); the reading speed; and the
    share of "none" shapes on images that hold no single shape (n / 10 of each kind: noise, blank,
    two shapes, smooth blobs, jagged polygons, scribbles; the last three as JPEG)."""
    rng = np.random.default_rng(seed)
    records = list(world.sample(n, seed, resolution))
    asked = [r.attrs for r in records]
    reader.prepare()  # templates and palette, built once per process: not part of the speed
    start = time.perf_counter()
    report = {"clean": score(reader.read_batch([r.image for r in records]), asked).accuracy}
    report["speed"] = {"images/s": n / (time.perf_counter() - start)}  # from PIL images, all steps
    for sigma in (0.05, 0.1):
        noisy = [with_noise(r.image, sigma, rng) for r in records]
        report[f"noise sd {sigma}"] = score(reader.read_batch(noisy), asked).accuracy
    for radius in (0.5, 1.0):
        blurred = [with_blur(r.image, radius) for r in records]
        report[f"blur sd {radius} px"] = score(reader.read_batch(blurred), asked).accuracy
    jpeg = [as_jpeg(r.image) for r in records]
    report[f"JPEG {JPEG_QUALITY}"] = score(reader.read_batch(jpeg), asked).accuracy
    images, independent = independent_set(n, rng, resolution)
    report["independent"] = score(reader.read_batch(images), independent).accuracy
    m = max(n // 10, 1)
    backgrounds = list(world.BACKGROUNDS)
    negatives = {
        "noise images": [noise_image(rng, resolution) for _ in range(m)],
        "blank images": [blank_image(backgrounds[i % 3], rng, 0.05 * (i % 2), resolution) for i in range(m)],
        "two-shape images": [two_shapes_image(rng, resolution) for _ in range(m)],
        "smooth blobs": [smooth_blob(rng, resolution) for _ in range(m)],
        "jagged polygons": [jagged_polygon(rng, resolution) for _ in range(m)],
        "scribbles": [scribble(rng, resolution) for _ in range(m)],
    }
    for name, images in negatives.items():
        report[name] = {"shape none": float(np.mean([r.shape is None for r in reader.read_batch(images)]))}
    return report


def format_evaluator_table(report: dict[str, dict[str, float]]) -> str:
    return "\n".join(f"{condition:18s}  " + "  ".join(f"{key} {value:.4g}" for key, value in numbers.items())
                     for condition, numbers in report.items())
