"""FID without torchvision: the standard Inception-v3 features from a local file, statistics, the distance.

FID is defined on one network: TensorFlow's Inception-v3 of 2015-12-05, its 2,048-d pool features. pytorch-fid,
clean-fid, torch-fidelity and the StyleGAN/ADM evaluators all carry ports of it; every packaged one but NVlabs'
TorchScript file needs torchvision, which cannot be installed beside this torch. So the extractor is that file,
`inception-2015-12-05.pt` (published at INCEPTION_URL; clean-fid and StyleGAN2-ADA/3 load it the same way),
loaded with `torch.jit.load` from a path the user gives: the architecture is in the file, nothing here
rebuilds it, and nothing is downloaded. Its interface:

    extractor(images, return_features=True) -> (N, 2048) float32
    images: (N, 3, H, W) pixel values 0..255, any H and W; the file resizes to 299 x 299 inside (bilinear,
    TensorFlow-1's sampling: source pixel j * size / 299, edges repeated), then maps (x - 128) / 128
    extractor.layers(x) -> (N, 2048, 1, 1): the network alone, on (N, 3, 299, 299) inputs already in [-1, 1]

How images reach it is the protocol (sdit.fid_protocols), recorded with every figure and in every statistics
file. Statistics are pytorch-fid's: mu, and sigma as np.cov (divided by N - 1), in an .npz with keys `mu` and
`sigma`, so its published files load here and ours load there; ours add `protocol` and `size`.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdit.errors import SDiTError
from sdit.fid_protocols import Protocol, fit, get_protocol, network_input
from sdit.progress import Progress, no_progress

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
FEATURES = 2048  # the pool3 features FID is defined on
STATS_VERSION = 2  # of the cached statistics' key: bump when what goes into a statistic changes
EXPECTED = (f"NVlabs' TorchScript Inception-v3 {INCEPTION_FILE} (the FID extractor of clean-fid and StyleGAN), "
            f"published at {INCEPTION_URL}")


# --- the extractor ---------------------------------------------------------------------------------------
@dataclass
class Extractor:
    """A loaded feature extractor and its identity (what a cached statistic is keyed by)."""

    module: torch.nn.Module
    path: str
    sha256: str
    dim: int
    device: torch.device

    @torch.no_grad()
    def features(self, images: np.ndarray, resized: bool) -> np.ndarray:
        """(N, H, W, 3) float32 -> (N, dim) float64. `resized`: (N, 299, 299, 3) in [-1, 1], given to the
        network's `layers` (the file's own resize and scaling skipped, as clean-fid does); else pixel values
        0..255 at any size, which the file resizes and scales itself."""
        x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(self.device, torch.float32)
        if not resized:
            return self.module(x, return_features=True).double().cpu().numpy()
        layers = getattr(self.module, "layers", None)
        out = layers(x) if layers is not None else self.module(x * 128 + 128, return_features=True)
        return out.reshape(len(x), -1).double().cpu().numpy()

    def describe(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "features": self.dim}


def load_extractor(path: str | Path, device: torch.device) -> Extractor:
    """The TorchScript extractor at `path`, checked on a probe image; one line naming the file it expects."""
    path = Path(path)
    if not path.is_file():
        raise SDiTError(f"--fid-inception {path}: no such file; FID needs {EXPECTED}: download it once and pass "
                        "its path")
    try:
        with warnings.catch_warnings():  # torch 2.13 calls TorchScript deprecated; the file is TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device).eval()
    except (RuntimeError, ValueError, OSError) as err:
        raise SDiTError(f"--fid-inception {path} is not a TorchScript file ({_first_line(err)}); FID needs "
                        f"{EXPECTED}") from err
    try:
        with torch.no_grad():
            probe = module(torch.full((1, 3, 64, 64), 128.0, device=device), return_features=True)
    except Exception as err:  # a scripted module of another signature raises its own types
        raise SDiTError(f"--fid-inception {path} does not take (images, return_features=True) "
                        f"({_first_line(err)}); FID needs {EXPECTED}") from err
    if not isinstance(probe, torch.Tensor) or probe.ndim != 2 or probe.shape[0] != 1:
        shape = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe).__name__
        raise SDiTError(f"--fid-inception {path} returned {shape} for one image, not (1, D) features; FID needs "
                        f"{EXPECTED}")
    return Extractor(module, str(path.resolve()), file_sha256(path), int(probe.shape[1]), device)


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# --- statistics ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stats:
    """A Gaussian fitted to features: mu (D,), sigma (D, D), from `count` images (0: unknown, e.g. a published
    file), under `protocol` at `size` px ("" and 0: the file does not say)."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int = 0
    protocol: str = ""
    size: int = 0

    def save(self, path: Path, info: dict | None = None) -> None:
        """pytorch-fid's .npz (mu, sigma) plus the count, protocol, size and what made it, written whole or not at
        all."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, mu=self.mu, sigma=self.sigma, count=np.int64(self.count), protocol=np.array(self.protocol),
                 size=np.int64(self.size), info=np.array(json.dumps(info or {})))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path, what: str = "--fid-stats") -> Stats:
        """Any .npz with `mu` (D,) and `sigma` (D, D): ours, pytorch-fid's, clean-fid's."""
        path = Path(path)
        if not path.is_file():
            raise SDiTError(f"{what} {path}: no such file (an .npz with mu and sigma, as pytorch-fid writes)")
        try:
            with np.load(path, allow_pickle=False) as f:
                missing = [key for key in ("mu", "sigma") if key not in f.files]
                if missing:
                    raise SDiTError(f"{what} {path} has no {missing[0]!r} array: FID statistics are an .npz with "
                                    "mu and sigma, as pytorch-fid writes")
                mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
                count = int(f["count"]) if "count" in f.files else 0
                protocol = str(f["protocol"]) if "protocol" in f.files else ""
                size = int(f["size"]) if "size" in f.files else 0
        except (OSError, ValueError) as err:
            raise SDiTError(f"{what} {path} is not an .npz file ({_first_line(err)})") from err
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise SDiTError(f"{what} {path}: mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)")
        return cls(mu, sigma, count, protocol, size)


class FeatureSums:
    """Running float64 sums of features, so a statistic of any number of images needs O(D²) memory."""

    def __init__(self, dim: int):
        self.n, self.total, self.outer = 0, np.zeros(dim), np.zeros((dim, dim))

    def add(self, features: np.ndarray) -> None:
        """features: (B, D)."""
        self.n += len(features)
        self.total += features.sum(axis=0)
        self.outer += features.T @ features

    def stats(self, protocol: str = "", size: int = 0) -> Stats:
        if self.n < 2:
            raise SDiTError(f"FID needs at least 2 images, got {self.n}")
        mu = self.total / self.n
        sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)  # np.cov's unbiased estimate
        return Stats(mu, (sigma + sigma.T) / 2, self.n, protocol, size)


def image_features(images: list[Image.Image], extractor: Extractor, protocol: Protocol, size: int,
                   generated: bool) -> np.ndarray:
    """(N, D) features of images as written, through every step of the protocol."""
    inputs = [network_input(np.asarray(fit(image, protocol, size, generated), dtype=np.uint8), protocol)
              for image in images]
    return extractor.features(np.stack(inputs), resized=protocol.resize != "network")


def image_stats(images: Iterable[Image.Image], extractor: Extractor, protocol: Protocol, size: int,
                generated: bool, batch_size: int = 32, progress: Progress = no_progress) -> Stats:
    """Statistics of images as written (`generated`: samples), streamed in batches."""
    sums = FeatureSums(extractor.dim)
    for batch in _batches(images, batch_size):
        sums.add(image_features(batch, extractor, protocol, size, generated))
        progress(len(batch))
    return sums.stats(protocol.name, size)


def _batches(items: Iterable, n: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


# --- the distance ----------------------------------------------------------------------------------------
def frechet_distance(a: Stats, b: Stats) -> float:
    """|mu_a − mu_b|² + tr(S_a) + tr(S_b) − 2 tr((S_a S_b)^½), the Fréchet distance of two Gaussians.

    tr((S_a S_b)^½) is the sum of the square roots of the eigenvalues of S_a S_b, which are those of the
    symmetric PSD matrix S_a^½ S_b S_a^½: two symmetric eigendecompositions in float64, no complex sqrtm and no
    scipy. Eigenvalues that rounding pushes below zero count as zero.
    """
    if a.mu.shape != b.mu.shape:
        raise SDiTError(f"FID statistics of {a.mu.shape[0]} and {b.mu.shape[0]} features cannot be compared: "
                        "were they made with the same extractor?")
    values, vectors = np.linalg.eigh(a.sigma)
    root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T  # S_a^½
    middle = root @ b.sigma @ root
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * cross)


# --- reference statistics, cached ------------------------------------------------------------------------
def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdit" / "fid-stats"


def reference_key(location: str, limit: int | None, size: int, protocol: Protocol, extractor: Extractor) -> str:
    """A hash of the reference image list (names, sizes, modification times: listed, never read), the number
    taken, the size and protocol, and the extractor's sha256."""
    listing = {"version": STATS_VERSION, "images": _listing(location, limit), "limit": limit, "size": size,
               "protocol": protocol.name, "extractor": extractor.sha256}
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


def _listing(location: str, limit: int | None) -> list:
    from sdit.sources import open_source

    source = open_source(location)
    files = getattr(source, "files", None) or getattr(source, "shards", None)
    if files:  # parquet or tar: the images are inside the files; listing rows would read them
        return [[os.path.abspath(f), *_stat(f)] for f in files]
    listing = []
    for item in source:  # folders: the items name their image files
        if limit is not None and len(listing) == limit:
            break
        listing.append([item.id, *(_stat(item.path) if item.path else ())])
    return listing


def _stat(path: str) -> tuple[int, int]:
    try:
        s = os.stat(path)
    except OSError:
        return (-1, -1)
    return (s.st_size, s.st_mtime_ns)


def reference_images(location: str, limit: int | None) -> Iterator[Image.Image]:
    """The images of a folder, parquet or webdataset source as decoded, in its order, never rotated by their EXIF
    tag (as pytorch-fid, clean-fid and BK-SDM read them); unreadable ones skipped."""
    import io

    from sdit.errors import RejectedInput
    from sdit.sources import open_source

    taken = 0
    for item in open_source(location):
        if limit is not None and taken == limit:
            return
        try:
            image = Image.open(io.BytesIO(item.read()))
            image.load()
        except (RejectedInput, OSError, Image.DecompressionBombError, ValueError):
            continue
        taken += 1
        yield image


@dataclass(frozen=True)
class Reference:
    """Statistics to compare samples with, and where they came from."""

    stats: Stats
    info: dict


def reference_stats(location: str, extractor: Extractor, protocol: Protocol, size: int, *,
                    limit: int | None = None, cache: Path | None = None, batch_size: int = 32,
                    progress: Progress = no_progress,
                    on_total: Callable[[int], None] | None = None) -> Reference:
    """Statistics of the reference images at `location`, computed once and cached as `.npz` under `cache`,
    keyed by `reference_key`; a second call with the same images and settings reads only the cache."""
    key = reference_key(location, limit, size, protocol, extractor)
    path = (cache or default_cache()) / f"{key[:32]}.npz"
    info = {"source": str(location), "limit": limit, "protocol": protocol.name, "size": size, "key": key,
            "extractor": extractor.describe(), "cache": str(path)}
    if path.is_file():
        stats = Stats.load(path, "cached FID statistics")
        return Reference(stats, info | {"images": stats.count, "cached": True})
    if on_total:
        from sdit.sources import open_source

        count = getattr(open_source(location), "num_items", lambda: None)()
        on_total(min(count, limit) if count is not None and limit is not None else (count or limit or 0))
    stats = image_stats(reference_images(location, limit), extractor, protocol, size, False, batch_size, progress)
    stats.save(path, info | {"images": stats.count})
    return Reference(stats, info | {"images": stats.count, "cached": False})


def published_stats(path: str, extractor: Extractor, protocol: Protocol, size: int,
                    declared: str | None = None) -> Reference:
    """Statistics from a file (pytorch-fid's, clean-fid's or ours), checked against the extractor's width and
    the samples' protocol: the file's own `protocol` key, else `declared` (--fid-stats-protocol), must name it."""
    stats = Stats.load(path)
    if len(stats.mu) != extractor.dim:
        raise SDiTError(f"--fid-stats {path} holds {len(stats.mu)} features; the extractor gives {extractor.dim}")
    if declared is not None:
        get_protocol(declared, "--fid-stats-protocol")
    if stats.protocol and declared and declared != stats.protocol:
        raise SDiTError(f"--fid-stats {path} declares protocol {stats.protocol!r}, --fid-stats-protocol says "
                        f"{declared!r}: drop --fid-stats-protocol, the file's own key stands")
    theirs = stats.protocol or declared
    if theirs is None:
        raise SDiTError(f"--fid-stats {path} does not say its protocol; the samples are measured with "
                        f"{protocol.name!r}: if the file was made that way, say so with --fid-stats-protocol "
                        f"{protocol.name}")
    if theirs != protocol.name:
        raise SDiTError(f"--fid-stats {path} holds protocol {theirs!r} statistics; the samples are measured with "
                        f"{protocol.name!r}: pass --fid-protocol {theirs}, or statistics made with {protocol.name!r}")
    if stats.size and stats.size != size:
        raise SDiTError(f"--fid-stats {path} holds {protocol.name!r} statistics at {stats.size} px; the samples are "
                        f"measured at {size} px: pass --fid-size {stats.size}")
    return Reference(stats, {"stats": str(Path(path).resolve()), "images": stats.count or None, "protocol": theirs,
                             "protocol_from": "file" if stats.protocol else "--fid-stats-protocol",
                             "size": stats.size or None})
