"""`sdit eval`'s sampling protocol: the student (and the teacher) on a fixed prompt list, then FID and CLIP score.

    OUT/settings.json          everything that makes the images; a rerun with other settings is refused
    OUT/student/000000.png     image i shows prompt i mod P (P prompts) from seed `seed + i`; its PNG text chunk
                               holds the prompt and every setting
    OUT/teacher/000000.png     with --teacher: the same prompt, seed, initial noise, scheduler, steps, guidance

Resumable: an image whose PNGs exist (written whole: a temporary name, then a rename) is not sampled again,
so an interrupted run goes on where it stopped, and a larger --num-images adds images to a finished one. The metrics
read the PNGs back, so they are the same whether an image was sampled now or in an earlier run, and put them through
the FID protocol's steps (sdit.fid_protocols); CLIP sees what the protocol shows it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from sdit import fid
from sdit.clip import clip_score
from sdit.errors import SDiTError, read_json_object
from sdit.fid_protocols import Protocol, fit, get_protocol
from sdit.files import replace_text
from sdit.progress import Progress, no_progress

if TYPE_CHECKING:
    from pipeline.config import EvalConfig
    from sdit.clip import Clip

SETTINGS = "settings.json"
OnStage = Callable[[str, int], None] | None


@dataclass(frozen=True)
class Prompts:
    texts: list[str]  # image i shows texts[i % len(texts)]
    source: str  # where they came from
    sha256: str  # of the whole list, so a resumed run knows it has the same prompts


def read_prompts(config: EvalConfig) -> Prompts:
    """--prompts (a text file, one a line, or a parquet column), else the captions of --references."""
    from sdit.prompts import open_prompts

    if config.prompts:
        texts = [item.caption for item in open_prompts(config.prompts, config.prompt_column) if item.caption]
        source = f"--prompts {config.prompts}"
    else:
        texts = reference_captions(config.references, config.num)
        source = f"captions of --references {config.references}"
    if not texts:
        raise SDiTError(f"{source} holds no prompts")
    return Prompts(texts, source, hashlib.sha256("\n".join(texts).encode()).hexdigest())


def reference_captions(location: str, n: int) -> list[str]:
    from sdit.sources import open_source

    captions = []
    for item in open_source(location):
        if len(captions) == n:
            break
        if item.caption:
            captions.append(item.caption)
    return captions


def sample_settings(config: EvalConfig, prompts: Prompts, size: tuple[int, int]) -> dict:
    """What makes image i: change any of it and the images are other images."""
    weights = sorted((Path(config.run) / "transformer").glob("*.safetensors"))
    return {"run": str(Path(config.run).resolve()),
            "student_weights": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weights],
            "teacher": str(Path(config.teacher).resolve()) if config.teacher else None,
            "teacher_config": config.teacher_config, "prompts": prompts.source, "prompts_sha256": prompts.sha256,
            "height": size[0], "width": size[1], "scheduler": config.scheduler, "steps": config.steps,
            "guidance": config.guidance, "seed": config.seed, "dtype": config.dtype}


def check_settings(out: Path, settings: dict) -> None:
    """A folder with samples of other settings is refused, naming what differs; a new one is stamped."""
    path = out / SETTINGS
    if path.is_file():
        old = read_json_object(path, "delete the folder to sample again, or give another --out")
        if old != settings:
            changed = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v)
            raise SDiTError(f"{out} holds samples made with other settings ({changed}); give another --out, or "
                            "delete it to sample again")
        return
    out.mkdir(parents=True, exist_ok=True)
    replace_text(path, json.dumps(settings, indent=2) + "\n")


def png(out: Path, model: str, index: int) -> Path:
    return out / model / f"{index:06d}.png"


def sample_missing(config: EvalConfig, prompts: Prompts, out: Path, models: tuple[str, ...], pipe,
                   size: tuple[int, int], device: torch.device, dtype: torch.dtype, progress: Progress = no_progress,
                   on_stage: OnStage = None) -> int:
    """Sample the images of 0..num-1 that some model lacks, in batches; returns how many were sampled.
    `pipe` is the student's SDiTPipeline, `size` its latent (h, w)."""
    from sdit.images import save_png
    from sdit.samples import Job, Recipe, draw_batch, png_text

    jobs = [Job(i, prompts.texts[i % len(prompts.texts)], config.seed + i) for i in range(config.num)]
    missing = [job for job in jobs if not all(png(out, m, job.index).is_file() for m in models)]
    if on_stage:
        on_stage("sample", len(missing) * len(models))
    if not missing:
        return 0
    teacher = _teacher(config, device, dtype)
    recipe = Recipe(config.steps, config.guidance, config.scheduler)
    for model in models:
        (out / model).mkdir(parents=True, exist_ok=True)
    for start in range(0, len(missing), config.sample_batch_size):
        batch = missing[start:start + config.sample_batch_size]
        for model, images in draw_batch(recipe, pipe, teacher, batch, size, device, progress).items():
            for job, image in zip(batch, images):
                text = png_text(recipe, job, model, image, config.run, config.teacher)
                save_png(image, png(out, model, job.index), text)  # whole or absent
    return len(missing)


def _teacher(config: EvalConfig, device: torch.device, dtype: torch.dtype):
    if not config.teacher:
        return None
    from sdit.teacher import load_teacher

    return load_teacher(config.teacher, components=("vae", "text_encoder", "unet"), config_dir=config.teacher_config,
                        device=device, dtype=dtype)


def read_images(out: Path, model: str, n: int) -> Iterator[Image.Image]:
    """Images 0..n-1 of a model, as written."""
    for i in range(n):
        with Image.open(png(out, model, i)) as image:
            image.load()
            yield image


@dataclass(frozen=True)
class Measures:
    stats: fid.Stats | None
    cosines: np.ndarray | None  # each image's CLIP cosine with its caption


@dataclass(frozen=True)
class Measuring:
    """What the measures of a run share: the protocol (every step from image to network), the side images are
    fitted to, the extractor and the CLIP model (either may be absent)."""

    protocol: Protocol
    size: int
    extractor: fid.Extractor | None
    clip: Clip | None

    def clip_view(self, images: list[Image.Image], generated: bool) -> list[Image.Image]:
        """What CLIP sees of images as written: the protocol's fitted images, or the images themselves."""
        if self.protocol.clip_fitted:
            return [fit(im, self.protocol, self.size, generated) for im in images]
        return [im.convert("RGB") for im in images]


def measure(config: EvalConfig, prompts: Prompts, out: Path, model: str, m: Measuring,
            progress: Progress = no_progress) -> Measures:
    """FID statistics and the CLIP cosines of a model's images, read back in batches."""
    sums = fid.FeatureSums(m.extractor.dim) if m.extractor else None
    cosines = []
    batch_size = config.sample_batch_size
    images = read_images(out, model, config.num)
    for start in range(0, config.num, batch_size):
        batch = [next(images) for _ in range(min(batch_size, config.num - start))]
        if sums is not None:
            sums.add(fid.image_features(batch, m.extractor, m.protocol, m.size, generated=True))
        if m.clip is not None:
            captions = [prompts.texts[(start + k) % len(prompts.texts)] for k in range(len(batch))]
            cosines.append(m.clip.cosines(m.clip_view(batch, generated=True), captions))
        progress(len(batch))
    return Measures(sums.stats(m.protocol.name, m.size) if sums is not None else None,
                    np.concatenate(cosines) if cosines else None)


def reference(config: EvalConfig, m: Measuring, progress: Progress = no_progress,
              on_stage: OnStage = None) -> fid.Reference:
    """The statistics FID compares with: --fid-stats (of the same protocol), or those of --references (cached)."""
    if config.fid_stats:
        return fid.published_stats(config.fid_stats, m.extractor, m.protocol, m.size, config.fid_stats_protocol)
    cache = Path(config.fid_cache) if config.fid_cache else None
    return fid.reference_stats(config.references, m.extractor, m.protocol, m.size, limit=config.fid_references,
                               cache=cache, batch_size=config.sample_batch_size, progress=progress,
                               on_total=(lambda n: on_stage("references", n)) if on_stage else None)


def run_protocol(config: EvalConfig, clip: Clip | None, extractor: fid.Extractor | None, device: torch.device,
                 dtype: torch.dtype, progress: Progress = no_progress, on_stage: OnStage = None) -> dict:
    """Sample what is missing, then FID and CLIP score per model; the figures and every setting behind them."""
    from sdit.pipeline_sdit import load_pipeline

    prompts = read_prompts(config)
    pipe = load_pipeline(config.run, device, dtype)
    pipe.use_scheduler(config.scheduler)
    latent = pipe.latent_size(config.resolution, config.resolution)  # refuses a bad --resolution first
    size = (latent[0] * pipe.vae_scale_factor, latent[1] * pipe.vae_scale_factor)
    out = Path(config.out) if config.out else Path(config.run) / "eval-samples"
    check_settings(out, sample_settings(config, prompts, size))
    models = ("student", "teacher") if config.teacher else ("student",)
    protocol = get_protocol(config.fid_protocol)
    m = Measuring(protocol, config.fid_size or protocol.size or size[0], extractor, clip)
    ref = reference(config, m, progress, on_stage) if extractor else None  # a mismatched file fails first
    sampled = sample_missing(config, prompts, out, models, pipe, latent, device, dtype, progress, on_stage)
    if on_stage:
        on_stage("measure", config.num * len(models))
    measures = {model: measure(config, prompts, out, model, m, progress) for model in models}
    result = {"samples": {"out": str(out), "num": config.num, "sampled_now": sampled, "prompts": prompts.source,
                          "distinct_prompts": len(prompts.texts), "height": size[0], "width": size[1],
                          "scheduler": config.scheduler, "steps": config.steps, "guidance": config.guidance,
                          "seeds": [config.seed, config.seed + config.num - 1], "batch_size": config.sample_batch_size,
                          "dtype": config.dtype, "models": list(models),
                          "teacher": str(Path(config.teacher).resolve()) if config.teacher else None}}
    if extractor:
        result["fid"] = fid_figures(measures, ref, m)
    if clip:
        result["clip_score"] = clip_figures(config, measures, m)
    return result


def clip_figures(config: EvalConfig, measures: dict[str, Measures], m: Measuring) -> dict:
    """The CLIP score per model under the chosen convention; with the references' captions as prompts, the
    reference images' own, seen as the protocol shows them."""
    convention = config.clip_score or m.protocol.clip_score
    figures = {model: clip_score(v.cosines, convention) for model, v in measures.items()}
    if not config.prompts:
        figures["references"] = clip_score(reference_cosines(config.references, config.num, m), convention)
    return figures | {"convention": convention, "model": str(Path(config.clip_model).resolve()),
                      "protocol": m.protocol.name, "images": "fitted" if m.protocol.clip_fitted else "as written",
                      "size": m.size if m.protocol.clip_fitted else None}


def reference_cosines(location: str, n: int, m: Measuring, batch_size: int = 16) -> np.ndarray:
    """CLIP cosines of the first n reference images with a caption against that caption, read as the FID
    references are (never rotated by their EXIF tag)."""
    import io

    from sdit.errors import RejectedInput
    from sdit.sources import open_source

    cosines, images, captions, taken = [], [], [], 0
    for item in open_source(location):
        if taken == n:
            break
        if not item.caption:
            continue
        try:
            image = Image.open(io.BytesIO(item.read()))
            image.load()
        except (RejectedInput, OSError, Image.DecompressionBombError, ValueError):
            continue
        images.append(image)
        captions.append(item.caption)
        taken += 1
        if len(images) == batch_size:
            cosines.append(m.clip.cosines(m.clip_view(images, generated=False), captions))
            images, captions = [], []
    if images:
        cosines.append(m.clip.cosines(m.clip_view(images, generated=False), captions))
    if not cosines:
        raise SDiTError(f"{location} has no readable images with captions to score as a reference")
    return np.concatenate(cosines)


def fid_figures(measures: dict[str, Measures], ref: fid.Reference, m: Measuring) -> dict:
    figures = {model: fid.frechet_distance(v.stats, ref.stats) for model, v in measures.items()}
    if "teacher" in measures:  # how far the student's images are from the teacher's, as a distribution
        figures["student_vs_teacher"] = fid.frechet_distance(measures["student"].stats, measures["teacher"].stats)
    return figures | {"reference": ref.info, "extractor": m.extractor.describe(), "size": m.size,
                      "protocol": m.protocol.name, "steps": m.protocol.describe(),
                      "images": measures["student"].stats.count}
