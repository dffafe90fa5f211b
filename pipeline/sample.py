"""`sdit sample`: images from a run folder, and optionally the teacher's beside them.

    OUT/student/0000.png ...   image i shows prompt i // num_images, drawn from seed `seed + i`; the PNG's
                               text chunk holds the prompt and every setting needed to make it again
    OUT/teacher/0000.png ...   with --compare-teacher: the teacher from the same prompt, seed, initial noise,
                               scheduler, steps and guidance
    OUT/grid.png               the images with their captions; with a teacher, a student row above a teacher row

Image i depends on its seed alone, not on the batch it was sampled in (one generator per image).
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

import sdit
from sdit import sampling
from sdit.devices import resolve_device, resolve_dtype
from sdit.errors import SDiTError
from sdit.pipeline_sdit import DEFAULT_GUIDANCE, SDiTPipeline, encode_text
from sdit.teacher import Teacher, load_teacher

MODELS = ("student", "teacher")


@dataclass(frozen=True)
class SampleConfig:
    run: str
    out: str
    prompts: tuple[str, ...] = ()
    prompts_file: str | None = None  # one prompt a line; blank lines are skipped
    negative_prompt: str | None = None
    num_images: int = 1  # per prompt
    height: int | None = None  # pixels; default: the student's training size
    width: int | None = None
    steps: int = 25
    guidance: float = DEFAULT_GUIDANCE
    scheduler: str = "ddim"
    seed: int = 0
    batch_size: int = 8
    columns: int = 8  # of the grid
    compare_teacher: str | None = None
    teacher_config: str | None = None
    device: str = "auto"
    dtype: str = "auto"

    def check(self) -> None:
        if self.scheduler not in sampling.SCHEDULERS:
            raise SDiTError(f"--scheduler {self.scheduler!r}: choose one of {', '.join(sampling.SCHEDULERS)}")
        for name in ("num_images", "steps", "batch_size", "columns"):
            if getattr(self, name) < 1:
                raise SDiTError(f"--{name.replace('_', '-')} must be at least 1")
        if self.guidance < 0:
            raise SDiTError(f"--guidance {self.guidance}: the CFG scale cannot be negative")
        if self.teacher_config and not self.compare_teacher:
            raise SDiTError("--teacher-config describes the --compare-teacher file; give that too")


@dataclass(frozen=True)
class Job:
    """One image: its number, prompt and seed."""

    index: int
    prompt: str
    seed: int


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
        raise SDiTError("no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def plan(prompts: list[str], num_images: int, seed: int) -> list[Job]:
    return [Job(i, prompts[i // num_images], seed + i) for i in range(len(prompts) * num_images)]


def sample(config: SampleConfig, progress: Callable[[int], None] | None = None,
           on_total: Callable[[int], None] | None = None) -> SampleSummary:
    """Sample the run (and the teacher); `progress(n)` after every n images of either model."""
    config.check()
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
    for start in range(0, len(jobs), config.batch_size):
        batch = jobs[start:start + config.batch_size]
        for model, pixels in sample_batch(config, pipe, teacher, batch, size, device, progress).items():
            for job, image in zip(batch, pixels):
                save_png(image, out / model / f"{job.index:04d}.png", settings(config, job, model, image))
            images[model].extend(pixels)
    grid = out / "grid.png"
    captioned_grid(images, [f"{job.prompt} (seed {job.seed})" for job in jobs], config.columns).save(grid)
    return SampleSummary(out, len(jobs), grid, teacher is not None)


def sample_batch(config: SampleConfig, pipe: SDiTPipeline, teacher: Teacher | None, batch: list[Job],
                 size: tuple[int, int], device: torch.device,
                 progress: Callable[[int], None] | None) -> dict[str, list[np.ndarray]]:
    """(H, W, 3) uint8 images of one batch from the student and the teacher, from the same initial noise."""
    prompts = [job.prompt for job in batch]
    negatives = [config.negative_prompt] * len(batch) if config.negative_prompt is not None else None
    noise = pipe.initial_noise(len(batch), size, [torch.Generator().manual_seed(job.seed) for job in batch])
    student = pipe(prompts, negative_prompt=negatives, latents=noise, num_inference_steps=config.steps,
                   guidance_scale=config.guidance).images
    made = {"student": [np.asarray(image) for image in student]}
    if progress:
        progress(len(batch))
    if teacher:
        scheduler = sampling.make_scheduler(config.scheduler, dict(pipe.scheduler.config))  # fresh: no state
        made["teacher"] = list(teacher_images(teacher, prompts, negatives, noise, scheduler, config.steps,
                                              config.guidance, device))
        if progress:
            progress(len(batch))
    return made


def load_pipeline(run: str | Path, device: torch.device, dtype: torch.dtype) -> SDiTPipeline:
    pipe = SDiTPipeline.from_pretrained(run)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


@torch.no_grad()
def teacher_images(teacher: Teacher, prompts: list[str], negatives: list[str] | None, noise: torch.Tensor,
                   scheduler, steps: int, guidance: float, device: torch.device) -> np.ndarray:
    """(N, H, W, 3) uint8 from the teacher's UNet with classifier-free guidance, from the given initial noise
    (N, C, h, w) and scheduler: the sampling loop the student runs, with the teacher's ε."""
    unet = teacher.unet
    text = encode_text(teacher.tokenizer, teacher.text_encoder, prompts, device)
    null = encode_text(teacher.tokenizer, teacher.text_encoder, negatives or [""] * len(prompts), device) \
        if guidance != 1.0 else None

    def eps(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return unet(x.to(unet.dtype), t, encoder_hidden_states=context.to(unet.dtype)).sample.float()

    latents = sampling.denoise(eps, scheduler, noise.to(device, torch.float32), text, null, steps, guidance)
    return sampling.decode(teacher.vae, latents)


# --- files ------------------------------------------------------------------------------------------------
def settings(config: SampleConfig, job: Job, model: str, image: np.ndarray) -> dict[str, str]:
    """What goes into a PNG's text chunk: enough to make the image again."""
    values = {
        "prompt": job.prompt, "negative_prompt": config.negative_prompt or "", "seed": job.seed,
        "steps": config.steps, "guidance": config.guidance, "scheduler": config.scheduler,
        "height": image.shape[0], "width": image.shape[1], "model": model,
        "run": str(Path(config.run).resolve()), "software": f"sdit {sdit.__version__}",
    }
    if model == "teacher":
        values["teacher"] = str(Path(config.compare_teacher).resolve())
    return {key: str(value) for key, value in values.items()}


def save_png(image: np.ndarray, path: Path, text: dict[str, str]) -> None:
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    Image.fromarray(image).save(path, pnginfo=info)


# --- the grid ---------------------------------------------------------------------------------------------
PAD = 4
FONT_SIZE = 10
LINE_HEIGHT = 12
CAPTION_LINES = 3
MIN_CELL = 96  # px: room for a readable caption under small (64 px) images


def captioned_grid(rows: dict[str, list[np.ndarray]], captions: list[str], columns: int) -> Image.Image:
    """Images (H, W, 3) uint8 in bands of `columns`: in each band one row per model (labelled at the left
    when there are several), then each column's caption."""
    font = ImageFont.load_default(size=FONT_SIZE)
    models = list(rows)
    n, (h, w) = len(captions), rows[models[0]][0].shape[:2]
    columns = min(columns, n)
    cell = max(w, MIN_CELL)
    label = max(int(font.getlength(m)) for m in models) + 2 * PAD if len(models) > 1 else 0
    caption_h = CAPTION_LINES * LINE_HEIGHT + PAD
    band_h = len(models) * (h + PAD) + caption_h
    bands = -(-n // columns)
    canvas = Image.new("RGB", (label + columns * (cell + PAD) + PAD, bands * band_h + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    for i, caption in enumerate(captions):
        band, col = divmod(i, columns)
        x = label + PAD + col * (cell + PAD)
        y = PAD + band * band_h
        for r, model in enumerate(models):
            canvas.paste(Image.fromarray(rows[model][i]), (x + (cell - w) // 2, y + r * (h + PAD)))
            if col == 0 and label:
                draw.text((PAD, y + r * (h + PAD) + h // 2 - FONT_SIZE // 2), model, fill="black", font=font)
        for k, line in enumerate(wrap(caption, font, cell)):
            draw.text((x + (cell - font.getlength(line)) // 2, y + len(models) * (h + PAD) + k * LINE_HEIGHT), line,
                      fill="black", font=font)
    return canvas


def wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """At most CAPTION_LINES lines that fit `width` px; an ellipsis where the text is cut."""
    chars = max(4, int(width / max(font.getlength("n"), 1)))
    lines = textwrap.wrap(text, chars, break_long_words=True) or [""]
    while any(font.getlength(line) > width for line in lines) and chars > 4:
        chars -= 1
        lines = textwrap.wrap(text, chars, break_long_words=True)
    if len(lines) > CAPTION_LINES:
        lines = lines[:CAPTION_LINES]
        lines[-1] = lines[-1][:max(0, len(lines[-1]) - 1)] + "…"
    return lines
