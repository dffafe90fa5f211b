"""The student's images beside the teacher's: one batch of numbered, seeded prompts drawn by both from the same
initial noise, and what goes into each PNG's text chunk to make it again. `sdit sample` and `sdit eval` draw
their images with these.

Image i depends on its seed alone, not on the batch it was drawn in (one generator per image).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

import sdit
from sdit import sampling
from sdit.progress import Progress, no_progress

if TYPE_CHECKING:
    from sdit.pipeline_sdit import SDiTPipeline
    from sdit.teacher import Teacher

MODELS = ("student", "teacher")


@dataclass(frozen=True)
class Job:
    """One image: its number, prompt and seed."""

    index: int
    prompt: str
    seed: int


@dataclass(frozen=True)
class Recipe:
    """How images are drawn, the same for student and teacher."""

    steps: int
    guidance: float
    scheduler: str
    negative_prompt: str | None = None


def draw_batch(recipe: Recipe, pipe: SDiTPipeline, teacher: Teacher | None, batch: list[Job],
               size: tuple[int, int], device: torch.device,
               progress: Progress = no_progress) -> dict[str, list[np.ndarray]]:
    """(H, W, 3) uint8 images of one batch from the student (`pipe`, latents of `size`) and, when given, the
    teacher, from the same initial noise; `progress(n)` after each model's n images."""
    prompts = [job.prompt for job in batch]
    negatives = [recipe.negative_prompt] * len(batch) if recipe.negative_prompt is not None else None
    noise = pipe.initial_noise(len(batch), size, [torch.Generator().manual_seed(job.seed) for job in batch])
    student = pipe(prompts, negative_prompt=negatives, latents=noise, num_inference_steps=recipe.steps,
                   guidance_scale=recipe.guidance).images
    made = {"student": [np.asarray(image) for image in student]}
    progress(len(batch))
    if teacher:
        scheduler = sampling.make_scheduler(recipe.scheduler, dict(pipe.scheduler.config))  # fresh: no state
        made["teacher"] = list(sampling.teacher_images(teacher, prompts, negatives, noise, scheduler, recipe.steps,
                                                       recipe.guidance, device))
        progress(len(batch))
    return made


def png_text(recipe: Recipe, job: Job, model: str, image: np.ndarray, run: str,
             teacher: str | None = None) -> dict[str, str]:
    """What goes into a PNG's text chunk: enough to make the image again."""
    values = {
        "prompt": job.prompt, "negative_prompt": recipe.negative_prompt or "", "seed": job.seed,
        "steps": recipe.steps, "guidance": recipe.guidance, "scheduler": recipe.scheduler,
        "height": image.shape[0], "width": image.shape[1], "model": model,
        "run": str(Path(run).resolve()), "software": f"sdit {sdit.__version__}",
    }
    if model == "teacher" and teacher:
        values["teacher"] = str(Path(teacher).resolve())
    return {key: str(value) for key, value in values.items()}
