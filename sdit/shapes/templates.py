"""The shapes reader's references, built once per process from the world's own drawing code.

Shape templates (each shape drawn large, turned, blurred and normalised like an object the reader finds), each
shape's outline length and box fill, the palette's hues with the reject bands between them, and the metric that
weighs luma over chroma; with the image helpers that build them.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from sdit.shapes import world

GRID = 24  # template grid side
EXTENT = 1.1  # the grid covers +-EXTENT * sqrt(area) around the centroid; every shape fits
TEMPLATE_BLURS = (0.0, 0.075, 0.15)  # a drawing may be sharp or soft; each shape's best variant counts
TEMPLATE_ROTATIONS = (-12.0, -6.0, 0.0, 6.0, 12.0)  # degrees; the world never turns a shape, a teacher might
HUE_REJECT = 3.0  # degrees either side of the midpoint between two palette hues
MAX_HUE_DISTANCE = 35.0  # degrees from the nearest palette hue
LUMA_WEIGHT = 9.0  # coverage weighs luma 9x (3x in amplitude) over chroma, which JPEG halves in resolution


def normalised_samples(alpha: torch.Tensor, antialias: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W) coverage -> (N, GRID, GRID) samples and (N,) log aspect ratio.

    The mask is resampled around its centroid, scaled by sqrt(area), and stretched so that its
    spread is the same along x and y: a drawing squashed by 10% still meets its template, and the
    aspect ratio that was taken out is returned for a separate check. With `antialias`, each mask
    is first blurred to half a grid cell, so a large object is averaged over each cell rather
    than point-sampled (templates are blurred by the caller).
    """
    n, h, w = alpha.shape
    area = alpha.sum((1, 2)).clamp_min(1e-6)  # (N,)
    scale = area.sqrt()  # (N,) px per unit
    if antialias:
        cell = 2 * EXTENT * scale / GRID  # (N,) px
        pixel = 0.29  # the sd of a 1 px box: what pixels already average over
        alpha = gaussian(alpha, ((cell / 2) ** 2 - pixel**2).clamp_min(0).sqrt())
    ys = torch.arange(h, dtype=alpha.dtype) + 0.5
    xs = torch.arange(w, dtype=alpha.dtype) + 0.5
    px, py = alpha.sum(1), alpha.sum(2)  # (N, W), (N, H) projections
    cx, cy = (px * xs).sum(1) / area, (py * ys).sum(1) / area  # (N,)
    var_x = (px * (xs - cx[:, None]) ** 2).sum(1) / area
    var_y = (py * (ys - cy[:, None]) ** 2).sum(1) / area
    aspect = 0.25 * torch.log(var_x.clamp_min(1e-6) / var_y.clamp_min(1e-6))  # (N,) half the log sd ratio
    u = torch.linspace(-EXTENT, EXTENT, GRID, dtype=alpha.dtype)  # (G,)
    gx = (cx[:, None] + u[None] * (scale * aspect.exp())[:, None]) / w * 2 - 1  # (N, G)
    gy = (cy[:, None] + u[None] * (scale / aspect.exp())[:, None]) / h * 2 - 1  # (N, G)
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # (N, G, G, 2)
    out = F.grid_sample(alpha[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, 0], 2 * aspect  # (N, G, G), (N,) log(sd_x / sd_y)


@functools.cache
def shape_templates() -> tuple[torch.Tensor, torch.Tensor]:
    """(V, K, GRID, GRID) templates and (K,) log aspect ratios of the upright shapes.

    Each shape is drawn large (96 px box on 160 px), turned by each of `TEMPLATE_ROTATIONS`,
    blurred to half a grid cell and further by each of `TEMPLATE_BLURS` (units of sqrt(area)),
    and normalised like an object: V = rotations x blurs variants.
    """
    masks = torch.from_numpy(np.stack([world.shape_alpha(s, (80.0, 80.0), 96.0, 160) for s in world.SHAPES]))
    scale = masks.sum((1, 2)).sqrt()  # (K,) px per unit
    half_cell = EXTENT / GRID  # units of sqrt(area)
    variants = []
    for degrees in TEMPLATE_ROTATIONS:
        turned = rotate(masks, degrees)
        for blur in TEMPLATE_BLURS:
            sigma = math.hypot(half_cell, blur) * scale  # (K,) px
            variants.append(normalised_samples(gaussian(turned, sigma), antialias=False)[0])
    return torch.stack(variants), normalised_samples(masks, antialias=False)[1]


def rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """(N, H, W) turned about the image centre, bilinear, zero outside."""
    if degrees == 0:
        return images
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    theta = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=images.dtype).expand(len(images), 2, 3)
    grid = F.affine_grid(theta, [len(images), 1, *images.shape[-2:]], align_corners=False)
    return F.grid_sample(images[:, None], grid, mode="bilinear", align_corners=False)[:, 0]


def gaussian(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """(N, H, W) each blurred by a Gaussian of its own `sigma` (N,) px, rounded to 0.25 px; zero padding."""
    sigma = torch.round(sigma * 4) / 4  # few distinct values, so few convolutions
    out = images.clone()
    for s in sigma.unique().tolist():
        if s <= 0:
            continue
        r = int(math.ceil(3 * s))
        taps = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=images.dtype) / s) ** 2)
        taps = (taps / taps.sum()).view(1, 1, 1, -1)
        pick = sigma == s
        x = F.conv2d(images[pick][:, None], taps, padding=(0, r))
        out[pick] = F.conv2d(x, taps.transpose(2, 3), padding=(r, 0))[:, 0]
    return out


@functools.cache
def luma_metric() -> torch.Tensor:
    """(3, 3) RGB metric that weighs JPEG's luma `LUMA_WEIGHT` times its two chroma channels."""
    ycc = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
    return ycc.T @ torch.diag(torch.tensor([LUMA_WEIGHT, 1.0, 1.0])) @ ycc


@functools.cache
def outlines() -> torch.Tensor:
    """(K,) each shape's outline length over the square root of its area (a circle's is 2 sqrt(pi))."""
    masks = torch.from_numpy(np.stack([world.shape_alpha(s, (64.0, 64.0), 96.0, 128) for s in world.SHAPES]))
    gy, gx = torch.gradient(masks, dim=(1, 2))
    return (gx**2 + gy**2).sqrt().sum((1, 2)) / masks.sum((1, 2)).sqrt()  # |gradient| sums to the outline's length


@functools.cache
def fill_fractions() -> torch.Tensor:
    """(K,) the fraction of its square box each shape covers."""
    masks = [world.shape_alpha(s, (64.0, 64.0), 96.0, 128) for s in world.SHAPES]
    return torch.tensor([float(m.sum()) / 96**2 for m in masks])


@functools.cache
def palette_hues() -> tuple[np.ndarray, np.ndarray]:
    """Palette hues (K,) in degrees, and each colour's accepted half-width toward each neighbour."""
    hues = np.array([hsv(np.array(rgb) / 255.0)[0] for rgb in world.COLOURS.values()])
    gaps = (hues[:, None] - hues[None, :] + 180) % 360 - 180  # signed, (K, K)
    np.fill_diagonal(gaps, np.nan)
    below = np.nanmin(np.where(gaps > 0, gaps, np.nan), axis=1)  # nearest neighbour at lower hue
    above = np.nanmin(np.where(gaps < 0, -gaps, np.nan), axis=1)
    half = np.minimum(np.stack([below, above], 1) / 2 - HUE_REJECT, MAX_HUE_DISTANCE)  # (K, 2)
    return hues, half


def hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(..., 3) RGB in [0, 1] -> hue in degrees, saturation, value."""
    mx, mn = rgb.max(-1), rgb.min(-1)
    delta = np.where(mx > mn, mx - mn, 1.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hue = np.where(mx == r, (g - b) / delta % 6, np.where(mx == g, (b - r) / delta + 2, (r - g) / delta + 4))
    return hue * 60.0 % 360, np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0), mx
