"""The sampling speed of `sdit bench sd15`: whole sampling runs of the SD 1.5-shaped teacher and of each student,
side by side, timed by the benchmarks' one harness (`pipeline.bench.timing.alternate`).

A run is what a user waits for: the text encoder on the prompts (and on empty captions, for classifier-free
guidance), `speed_steps` denoising steps (two forwards each with guidance: text and empty caption; one for a
guidance-distilled student) and the VAE decode to pixels. The teacher runs its own text encoder, UNet and VAE; each
student runs its own pipeline's (a run folder holds copies of the teacher's text encoder and VAE). Every model gets
the same prompts, initial noise, scheduler, steps, guidance and batch. Each model first makes one untimed run of
`warmup_steps` steps; then `repeats` rounds in which the models take turns; a model's figures come from its fastest
round. The share of attention comes from a separate, untimed, profiled pass of one step per model (on CPU only: the
CPU profiler's view of a GPU run says nothing about its kernels).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from pipeline.bench.config import Sd15Config
from pipeline.bench.sd15 import PROMPT_BANK
from pipeline.bench.timing import alternate, timed
from sdit.config import vae_factor


@dataclass(frozen=True)
class Sampler:
    """One model's sampling parts: its text encoder (prompts -> (N, 77, D)), ε model, VAE, and whether a step runs
    the guided pair of forwards."""

    encode: Callable
    eps: Callable
    vae: object
    guided: bool


def sampling_speed(folder: str, runs: dict[str, str], c: Sd15Config) -> dict:
    """The teacher (diffusers `folder`) against the student of each run folder in `runs` (preset -> folder, made
    with `sdit init` where missing). Returns the settings, per model its rounds' seconds, the fastest round's parts,
    images/s, speed-ups against the teacher and the share of attention, and `compute_seconds` (every timed round)."""
    import torch

    from sdit.devices import resolve_device, resolve_dtype
    from sdit.sampling import initial_noise
    from sdit.teacher import load_teacher

    device = resolve_device(c.device)
    dtype = resolve_dtype(c.dtype, device)
    teacher = load_teacher(folder, device=device, dtype=dtype)
    factor, channels = vae_factor(Path(c.config_dir))
    n, latent = c.speed_images, c.resolution // factor
    prompts = [PROMPT_BANK[i % len(PROMPT_BANK)] for i in range(n)]
    noise = initial_noise((channels, latent, latent), [torch.Generator().manual_seed(i) for i in range(n)], device)
    samplers = {"sd15_unet": teacher_sampler(teacher, device)} | {
        preset: student_sampler(run, folder, preset, c.guidance, device, dtype) for preset, run in runs.items()}

    def sample(s: Sampler, steps: int) -> dict[str, float]:
        return sample_parts(s, prompts, noise, steps, c, teacher.scheduler_config, device)

    rounds = alternate({name: partial(sample, s, c.speed_steps) for name, s in samplers.items()}, c.repeats, device,
                       warm_ups={name: partial(sample, s, c.warmup_steps) for name, s in samplers.items()})
    shares = {name: attention_share(s, prompts, noise, c, teacher.scheduler_config, device)
              if c.profile and device.type == "cpu" else None for name, s in samplers.items()}
    models = {}
    for name, r in rounds.items():
        parts = r.best_value
        models[name] = {"forwards_per_step": 2 if samplers[name].guided else 1, "rounds_seconds": list(r.seconds),
                        "seconds": r.best, "median_seconds": r.median, "text_seconds": parts["text"],
                        "loop_seconds": parts["loop"], "decode_seconds": parts["decode"],
                        "step_seconds": parts["loop"] / c.speed_steps, "images_per_s": n / r.best,
                        "attention_share": shares[name]}
    unet = models["sd15_unet"]
    for m in models.values():
        m["speedup"] = unet["seconds"] / m["seconds"]
        m["loop_speedup"] = unet["loop_seconds"] / m["loop_seconds"]
    return {"images": n, "steps": c.speed_steps, "guidance": c.guidance, "scheduler": c.scheduler,
            "resolution": c.resolution, "repeats": c.repeats, "warmup_steps": c.warmup_steps,
            "students": list(runs), "device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "models": models, "compute_seconds": sum(sum(r.seconds) for r in rounds.values())}


def teacher_sampler(teacher, device) -> Sampler:
    from sdit.sampling import teacher_eps
    from sdit.text import encode_text

    return Sampler(partial(encode_text, teacher.tokenizer, teacher.text_encoder, device=device),
                   teacher_eps(teacher.unet), teacher.vae, guided=True)


def student_sampler(run: str, teacher: str, preset: str, guidance: float, device, dtype) -> Sampler:
    """The run folder's pipeline (an untrained `preset` student beside `teacher` made there first if missing:
    an untrained student costs what a trained one does)."""
    from pipeline.init import InitConfig, init
    from sdit.pipeline_sdit import load_pipeline

    if not (Path(run) / "sdit_run.json").exists():
        init(InitConfig(teacher=teacher, student=preset, out=run))
    pipe = load_pipeline(run, device, dtype)
    return Sampler(pipe.encode_prompt, pipe.eps_model(guidance), pipe.vae, guided=not pipe.guidance_distilled)


def sample_parts(s: Sampler, prompts: list[str], noise, steps: int, c: Sd15Config, scheduler_config: dict,
                 device) -> dict[str, float]:
    """One whole sampling run of `s` to (N, H, W, 3) uint8 pixels on the host; the seconds of its three parts."""
    import torch

    from sdit.sampling import decode, denoise, make_scheduler

    with torch.no_grad():
        (text, null), text_s = timed(lambda: (s.encode(prompts), s.encode([""] * len(prompts)) if s.guided else None),
                                     device)
        scheduler = make_scheduler(c.scheduler, scheduler_config)
        latents, loop_s = timed(lambda: denoise(s.eps, scheduler, noise, text, null, steps,
                                                c.guidance if s.guided else 1.0), device)
        _, decode_s = timed(lambda: decode(s.vae, latents), device)
    return {"text": text_s, "loop": loop_s, "decode": decode_s}


def attention_share(s: Sampler, prompts: list[str], noise, c: Sd15Config, scheduler_config: dict, device) -> float:
    """The share of the CPU time of one profiled denoising step spent in attention kernels (SDPA and the pieces of
    its math path): an untimed pass of its own."""
    import torch

    from sdit.sampling import denoise, make_scheduler

    with torch.no_grad():
        text = s.encode(prompts)
        null = s.encode([""] * len(prompts)) if s.guided else None
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            denoise(s.eps, make_scheduler(c.scheduler, scheduler_config), noise, text, null, 1,
                    c.guidance if s.guided else 1.0)
    total = attention = 0.0
    for event in prof.key_averages():
        total += event.self_cpu_time_total
        if "attention" in event.key or "_softmax" in event.key or event.key == "aten::softmax":
            attention += event.self_cpu_time_total
    return attention / total if total else 0.0
