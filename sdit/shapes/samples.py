"""A teacher's samples of the shapes world's evaluation prompts, and their scores.

`sdit toy eval` and the teacher's row of `sdit bench distill` both sample through `sample_teacher`: DDIM with
classifier-free guidance, image i of a prompt list from the noise of seed + i (`seeded_noise`), so that both
score the same images at the same settings, and a student sampled from `seeded_noise` meets the same noise.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from sdit import sampling
from sdit.progress import Progress, no_progress
from sdit.shapes import reader, scores, world
from sdit.shapes.config import EVAL_GUIDANCE, EVAL_STEPS


def seeded_noise(shape: tuple[int, ...], seed: int, first: int, count: int) -> torch.Tensor:
    """(count, C, h, w) initial noise on the CPU for images first .. first + count - 1 of a prompt list: image i
    from a generator seeded with seed + i alone, so it does not depend on the batch or the model."""
    generators = [torch.Generator().manual_seed(seed + first + i) for i in range(count)]
    return sampling.initial_noise(shape, generators, torch.device("cpu"))


def latent_shape(teacher) -> tuple[int, int, int]:
    """(C, h, w) of the teacher's latents."""
    c = teacher.unet.config
    return c.in_channels, c.sample_size, c.sample_size


@torch.no_grad()
def sample_teacher(teacher, prompts: list[str], steps: int = EVAL_STEPS, guidance: float = EVAL_GUIDANCE, seed: int = 0,
                   batch: int = 64, progress: Progress = no_progress) -> list[np.ndarray]:
    """(H, W, 3) uint8 samples of a loaded teacher (sdit.teacher.Teacher) on the CPU, one per prompt: DDIM with
    classifier-free guidance from `seeded_noise`, `batch` prompts at a time (`progress(n)` counts them)."""
    made: list[np.ndarray] = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        noise = seeded_noise(latent_shape(teacher), seed, start, len(chunk))
        scheduler = sampling.make_scheduler("ddim", teacher.scheduler_config)
        made += list(sampling.teacher_images(teacher, chunk, None, noise, scheduler, steps, guidance,
                                             torch.device("cpu")))
        progress(len(chunk))
    return made


def evaluation_prompts() -> dict[str, list[world.Prompt]]:
    """The world's evaluation prompts: held-out concepts and seen ones."""
    return {"heldout": world.heldout_prompts(), "seen": world.seen_prompts()}


def repeat(prompts: dict[str, list[world.Prompt]], per_prompt: int) -> dict[str, list[world.Prompt]]:
    """Each prompt `per_prompt` times in a row, per prompt set."""
    return {split: [p for p in plist for _ in range(per_prompt)] for split, plist in prompts.items()}


def score_teacher(teacher_dir: str | Path, per_prompt: int = 4, guidance: float = EVAL_GUIDANCE,
                  steps: int = EVAL_STEPS, seed: int = 0,
                  prompts: dict[str, list[world.Prompt]] | None = None) -> dict[str, scores.Score]:
    """Per-attribute accuracy of the teacher's samples for each prompt set (the evaluation prompts by default),
    `per_prompt` samples per prompt."""
    from sdit.teacher import load_teacher

    teacher = load_teacher(teacher_dir)
    asked = repeat(prompts or evaluation_prompts(), per_prompt)
    return {split: scores.score(reader.read_batch(sample_teacher(teacher, [p.text for p in plist], steps, guidance,
                                                                 seed)), plist)
            for split, plist in asked.items()}


def format_scores(teacher_scores: dict[str, scores.Score]) -> str:
    """A markdown table: accuracy per attribute (with its standard error) for each prompt set."""
    lines = ["| prompts | images | " + " | ".join(world.ATTRIBUTE_NAMES) + " |",
             "|---|---|" + "---|" * len(world.ATTRIBUTE_NAMES)]
    for name, s in teacher_scores.items():
        cells = [f"{a:.3f} ± {math.sqrt(a * (1 - a) / s.count):.3f}" for a in s.accuracy.values()]
        lines.append(f"| {name} | {s.count} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
