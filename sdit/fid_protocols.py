"""FID protocols: how an image becomes the Inception network's input, step by step, as a named choice.

How images reach the network moves FID by more than many papers' margins (clean-fid's finding), so a figure is
comparable with a table only under that table's protocol. Each protocol here follows a published evaluator:

    bk-sdm  BK-SDM's COCO scripts, then `python -m pytorch_fid`. A sample is first saved as JPEG as drawn (PIL's
            default quality, 75); every image (sample or reference) is squashed to 256 x 256 by PIL's `resize`
            with its default filter, in the image's own mode (no crop), and saved as JPEG again; pytorch-fid reads
            it as RGB, scales to 0..1, resizes to 299 with torch's bilinear `interpolate` (align_corners=False,
            no antialias) and maps to [-1, 1] by 2x - 1. CLIP sees the 256-px JPEGs.
    clean   clean-fid's "clean" mode: each channel resized to 299 with PIL bicubic in float32 (antialiased, not
            quantised), clipped to 0..255, then (x - 128) / 128 as the network file does.
    tf      the TensorFlow original as StyleGAN2/3 and ADM run it (clean-fid's "legacy_tensorflow"): the uint8
            image goes into the network file, which resizes to 299 itself the TensorFlow-1 way (bilinear, corners
            aligned at the top left, edges repeated) and maps (x - 128) / 128.

For clean and tf every image is first its centre square at the FID size (PIL bicubic, rounded to uint8: what
StyleGAN's and ADM's dataset tools do). No protocol rotates images by their EXIF tag: none of those evaluators
does.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from sdit.errors import SDiTError

INPUT_SIZE = 299  # the network's input side
JPEG_MODES = ("L", "RGB", "CMYK")  # modes PIL writes as JPEG; others become RGB first


@dataclass(frozen=True)
class Protocol:
    """One evaluator's route from an image file to the network's input."""

    name: str
    size: int | None  # the side every image is fitted to; None: the samples' side
    squash: bool  # PIL `resize` to size x size with its default filter (no crop); else the centre square
    jpeg: bool  # JPEG round trips at PIL's default quality: a sample as drawn, and every image after the fit
    resize: str  # to 299: "torch-bilinear" (pytorch-fid), "pil-bicubic" (clean-fid), "network" (the file's own)
    clip_fitted: bool  # CLIP sees the fitted images (else the images as written)
    clip_score: str  # the CLIP score convention its tables use (sdit.config.CLIP_SCORES)
    summary: str

    def describe(self) -> dict:
        return {"name": self.name, "squash": self.squash, "jpeg": self.jpeg, "resize": self.resize,
                "clip_sees": "fitted" if self.clip_fitted else "as written"}


PROTOCOLS = {p.name: p for p in (
    Protocol("bk-sdm", 256, squash=True, jpeg=True, resize="torch-bilinear", clip_fitted=True, clip_score="bk-sdm",
             summary="BK-SDM's COCO evaluation: JPEG, squash to 256, JPEG, pytorch-fid's bilinear resize to 299"),
    Protocol("clean", None, squash=False, jpeg=False, resize="pil-bicubic", clip_fitted=False,
             clip_score="torchmetrics",
             summary="clean-fid's clean mode: PIL bicubic to 299 in float32"),
    Protocol("tf", None, squash=False, jpeg=False, resize="network", clip_fitted=False, clip_score="torchmetrics",
             summary="TensorFlow's original, as StyleGAN and ADM: the network resizes the uint8 image itself"),
)}
DEFAULT_PROTOCOL = "bk-sdm"


def get_protocol(name: str, option: str = "--fid-protocol") -> Protocol:
    if name not in PROTOCOLS:
        raise SDiTError(f"{option} {name!r}: choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def jpeg_round_trip(image: Image.Image) -> Image.Image:
    """The image saved as JPEG with PIL's defaults and read back."""
    if image.mode not in JPEG_MODES:
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        decoded.load()
        return decoded


def fit(image: Image.Image, protocol: Protocol, size: int, generated: bool) -> Image.Image:
    """An RGB image of size x size as the protocol makes it from an image as written (`generated`: a sample,
    which bk-sdm first saves as JPEG); what CLIP sees when `protocol.clip_fitted`."""
    if protocol.squash:
        if generated and protocol.jpeg:
            image = jpeg_round_trip(image)
        if image.mode not in JPEG_MODES:
            image = image.convert("RGB")
        image = image.resize((size, size))  # PIL's default filter for the mode, as BK-SDM calls it
    else:
        image = image.convert("RGB")
        if image.size != (size, size):
            image = ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)
    if protocol.jpeg:
        image = jpeg_round_trip(image)
    return image.convert("RGB")


def network_input(image: np.ndarray, protocol: Protocol) -> np.ndarray:
    """(H, W, 3) uint8 -> float32: for protocols that resize outside the network, (299, 299, 3) in [-1, 1], the
    input of its layers; for "network", the pixel values 0..255 at (H, W), which the network file resizes."""
    if protocol.resize == "network":
        return image.astype(np.float32)
    if protocol.resize == "torch-bilinear":
        import torch

        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).to(torch.float32)[None] / 255
        x = torch.nn.functional.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return (2 * x - 1)[0].numpy().transpose(1, 2, 0)
    channels = [np.asarray(Image.fromarray(image[:, :, c].astype(np.float32), mode="F")
                           .resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BICUBIC)) for c in range(3)]
    return (np.stack(channels, axis=-1).clip(0, 255) - 128) / 128
