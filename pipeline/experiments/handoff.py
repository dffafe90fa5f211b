"""Where a student loses to the teacher: samples of the experiment's evaluation prompts drawn by the student at the
noisy steps and the teacher at the rest (t at or below `at`), and the other way round, from the same noise as the
report's. A student that scores near the teacher when the teacher finishes its samples chose the right things at
high noise and loses them while it draws the details, and the other way round."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pipeline.experiments.config import DistillConfig
from pipeline.experiments.scoring import add_intervals, student_pipeline, teacher_samples
from sdit import sampling
from sdit.errors import SDiTError
from sdit.progress import Progress, no_progress
from sdit.shapes import reader, samples
from sdit.shapes.scores import figures, headline_draws, resample
from sdit.teacher import load_teacher
from sdit.text import encode_text

# ε(x, t, text, null) of a model with its guidance applied: the teacher's and a student's CFG, a guided student's w.
Guided = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ORDERS = ("alone", "student_first", "teacher_first")  # the student throughout; above `at`; at and below `at`
# What the handoff takes of the experiment's settings: its teacher and how it sampled the evaluation prompts.
SAMPLING = ("teacher", "teacher_samples", "seed", "per_prompt", "sample_steps", "guidance")


@dataclass(frozen=True)
class HandoffConfig:
    out: str  # a finished `sdit bench distill` folder
    runs: tuple[str, ...]  # of its runs
    at: int = 500  # the last timestep of the first model: the second takes the steps at t <= at

    def check(self) -> DistillConfig:
        """The experiment's sampling settings (its last report.json), refused in one line when a run is not
        there."""
        out = Path(self.out)
        if not (out / "report.json").exists():
            raise SDiTError(f"{out / 'report.json'} not found: give the --out of a finished `sdit bench distill`")
        if not self.runs:
            raise SDiTError("no runs: name some with --runs")
        if missing := [r for r in self.runs if not (out / r / "transformer" / "config.json").exists()]:
            trained = sorted(p.parent.parent.name for p in out.glob("*/transformer/config.json"))
            raise SDiTError(f"runs {missing} are not in {out}; it has {', '.join(trained) or 'none'}")
        settings = json.loads((out / "report.json").read_text())["config"]
        return replace(DistillConfig(), **{key: settings[key] for key in SAMPLING if key in settings})


def with_guidance(eps: sampling.EpsModel, guidance: float, distilled: bool = False) -> Guided:
    """A model's guided ε as `sampling.denoise` runs it (`sampling.guided_eps`), or a guidance-distilled student's
    one forward (it takes w itself)."""

    def guided(x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
        return sampling.guided_eps(eps, x, t, text, None if distilled else null, guidance)

    return guided


@torch.no_grad()
def handed_over(first: Guided, second: Guided, at: int, config: DistillConfig, teacher, prompts: list[str],
                batch: int = 64) -> list:
    """(H, W, 3) uint8 images: `first` denoises the steps at t > at, `second` the rest; image i from the noise of
    seed config.seed + i, as the report's samples."""
    made = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        text = encode_text(teacher.tokenizer, teacher.text_encoder, chunk, torch.device("cpu"))
        null = encode_text(teacher.tokenizer, teacher.text_encoder, [""] * len(chunk), torch.device("cpu"))

        def eps(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, null=null) -> torch.Tensor:
            return (first if int(t[0]) > at else second)(x, t, context, null)

        noise = samples.seeded_noise(samples.latent_shape(teacher), config.seed, start, len(chunk))
        scheduler = sampling.make_scheduler("ddim", teacher.scheduler_config)
        latents = sampling.denoise(eps, scheduler, noise, text, None, config.sample_steps, 1.0)
        made += list(sampling.decode(teacher.vae, latents))
    return made


def handoff(config: HandoffConfig, progress: Progress = no_progress,
            on_total: Callable[[int], None] | None = None) -> dict:
    """Each run's figures alone, with the teacher finishing its samples (student_first) and starting them
    (teacher_first), each with its 95% interval; the teacher's alone (its samples from the experiment's cache,
    drawn again only where that is missing). `on_total(n)` hears how many images the students' samplings draw,
    `progress(n)` counts them."""
    experiment = config.check()
    out = Path(config.out)
    teacher = load_teacher(experiment.teacher)
    teacher_guided = with_guidance(sampling.teacher_eps(teacher.unet), experiment.guidance)
    prompts = samples.repeat(samples.evaluation_prompts(), experiment.per_prompt)
    texts = {split: [p.text for p in plist] for split, plist in prompts.items()}
    weights = resample(prompts, seed=experiment.seed)
    if on_total:
        on_total(len(config.runs) * len(ORDERS) * sum(map(len, texts.values())))

    def score(images: dict[str, list]) -> tuple[dict, dict]:
        readings = {split: reader.read_batch(images[split]) for split in prompts}
        return figures(readings, prompts), headline_draws(readings, prompts, weights)

    def drawn(first: Guided, second: Guided) -> dict[str, list]:
        images = {}
        for split, chunk in texts.items():
            images[split] = handed_over(first, second, config.at, experiment, teacher, chunk)
            progress(len(chunk))
        return images

    results, draws = {}, {}
    results["teacher"], draws["teacher"] = score(teacher_samples(experiment, out, teacher, texts)[0])
    for name in config.runs:
        pipe = student_pipeline(out / name)
        student = with_guidance(pipe.eps_model(experiment.guidance), experiment.guidance, pipe.guidance_distilled)
        for order, (first, second) in zip(ORDERS, ((student, student), (student, teacher_guided),
                                                   (teacher_guided, student)), strict=True):
            results[f"{name}:{order}"], draws[f"{name}:{order}"] = score(drawn(first, second))
    add_intervals(results, draws)
    return {"at": config.at, "steps": experiment.sample_steps, "guidance": experiment.guidance,
            "teacher": results.pop("teacher"),
            "runs": {name: {order: results[f"{name}:{order}"] for order in ORDERS} for name in config.runs}}


def format_handoff(result: dict) -> str:
    """One row per run: fair held-out score and seen accuracy alone, and with the teacher at either end."""
    at = result["at"]
    head = (f"| run | alone: fair / seen | teacher below t = {at}: fair / seen | "
            f"teacher above t = {at}: fair / seen |\n|---|---|---|---|")

    def cell(r: dict) -> str:
        return f"{r['heldout_acc']:.3f} / {r['seen_acc']:.3f}"

    rows = [f"| {name} | " + " | ".join(cell(run[o]) for o in ORDERS) + " |" for name, run in result["runs"].items()]
    return "\n".join([head, *rows, f"| teacher | {cell(result['teacher'])} | | |"])
