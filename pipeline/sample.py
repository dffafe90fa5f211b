"""`sdit sample`: images from a run folder, and optionally the teacher's beside them.

    OUT/student/0000.png ...   image i shows prompt i // num_images, drawn from seed `seed + i`; the PNG's
                               text chunk holds the prompt and every setting needed to make it again
    OUT/teacher/0000.png ...   with --compare-teacher: the teacher from the same prompt, seed, initial noise,
                               scheduler, steps and guidance
    OUT/grid.png               the images with their captions; with a teacher, a student row above a teacher row

Image i depends on its seed alone, not on the batch it was sampled in (one generator per image: sdit.samples).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import SampleConfig
from sdit.devices import resolve_device, resolve_dtype
from sdit.errors import SDiTError
from sdit.files import check_folder, replacing
from sdit.images import captioned_grid, save_png
from sdit.pipeline_sdit import load_pipeline
from sdit.progress import Progress, no_progress
from sdit.samples import MODELS, Job, Recipe, draw_batch, png_text
from sdit.teacher import load_teacher


@dataclass(frozen=True)
class SampleSummary:
    out: Path
    images: int
    grid: Path
    teacher: bool

    def line(self) -> str:
        beside = " beside the teacher's" if self.teacher else ""
        return f"wrote {self.images} images{beside} to {self.out} (grid: {self.grid})"


def read_prompts(config: SampleConfig) -> list[str]:
    prompts = list(config.prompts)
    if config.prompts_file:
        path = Path(config.prompts_file)
        if not path.is_file():
            raise SDiTError(f"prompts file not found: {path}")
        from_file = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not from_file:
            raise SDiTError(f"prompts file {path} has no prompts (one a line)")
        prompts += from_file
    if not prompts:
        raise SDiTError("no prompts: give --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def plan(prompts: list[str], num_images: int, seed: int) -> list[Job]:
    return [Job(i, prompts[i // num_images], seed + i) for i in range(len(prompts) * num_images)]


def sample(config: SampleConfig, progress: Progress = no_progress,
           on_total: Callable[[int], None] | None = None) -> SampleSummary:
    """Sample the run (and the teacher); `progress(n)` after every n images of either model."""
    config.check()
    check_folder(config.out)
    jobs = plan(read_prompts(config), config.num_images, config.seed)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    pipe = load_pipeline(config.run, device, dtype)
    pipe.use_scheduler(config.scheduler)
    size = pipe.latent_size(config.height, config.width)  # refuse a resolution before any work
    teacher = load_teacher(config.compare_teacher, components=("vae", "text_encoder", "unet"),
                           config_dir=config.teacher_config, device=device, dtype=dtype) \
        if config.compare_teacher else None
    out, models = Path(config.out), MODELS[:2 if teacher else 1]
    for model in models:
        (out / model).mkdir(parents=True, exist_ok=True)
    if on_total:
        on_total(len(jobs) * len(models))
    images: dict[str, list[np.ndarray]] = {model: [] for model in models}
    recipe = Recipe(config.steps, config.guidance, config.scheduler, config.negative_prompt)
    for start in range(0, len(jobs), config.batch_size):
        batch = jobs[start:start + config.batch_size]
        for model, pixels in draw_batch(recipe, pipe, teacher, batch, size, device, progress).items():
            for job, image in zip(batch, pixels):
                text = png_text(recipe, job, model, image, config.run, config.compare_teacher)
                save_png(image, out / model / f"{job.index:04d}.png", text)
            images[model].extend(pixels)
    grid = out / "grid.png"
    with replacing(grid) as tmp:
        captioned_grid(images, [f"{job.prompt} (seed {job.seed})" for job in jobs], config.columns).save(tmp)
    return SampleSummary(out, len(jobs), grid, teacher is not None)
