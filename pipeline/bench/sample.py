"""`sdit bench sample`: what sampling costs, the student against its teacher.

Measured in one run, at equal steps, scheduler, guidance and resolution: images/s of the student's pipeline
and of the teacher's (text encoder, the denoising loop with classifier-free guidance, VAE decode), best of
`repeats` runs alternating between the two after an untimed run of each (`pipeline.bench.timing`). By default the
models are the tiny ones (`sdit.tiny`'s teacher and an untrained student beside it): an untrained student
costs what a trained one does.

Counted, not measured: FLOPs per sampling step at SD 1.5's 64x64 latents (512 px) for each SDiT preset and
for SD 1.5's UNet (sdit.flops). A guided step runs two forwards (text and empty caption); a guidance-distilled
student runs one.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline.bench.config import BenchSampleConfig
from pipeline.bench.timing import best_of
from sdit.devices import resolve_device, resolve_dtype
from sdit.errors import SDiTError
from sdit.flops import forward_flops, student_flops, unet_flops
from sdit.run import read_run
from sdit.sampling import make_scheduler

PROMPTS = ("a red circle on a white background", "a small blue square", "a green star, top left",
           "a large yellow triangle")
GUIDED_FORWARDS = 2  # classifier-free guidance: text and empty caption each step


def bench_sample(config: BenchSampleConfig) -> dict:
    config.check()
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    with tempfile.TemporaryDirectory(prefix="sdit-bench-") as tmp:
        run, teacher = models(config, Path(tmp))
        speed = measure(config, run, teacher, device, dtype)
    return {**speed, **flops_per_step(config.presets, config.flops_latent), "device": str(device),
            "dtype": str(dtype).removeprefix("torch."), "config": asdict(config)}


def models(config: BenchSampleConfig, tmp: Path) -> tuple[str, str]:
    """The run folder and the teacher to time: as given, or tiny ones written to `tmp`."""
    from pipeline.bench import tiny_teacher
    from pipeline.init import InitConfig, init

    if config.run:
        teacher = config.teacher or read_run(config.run)["teacher"]["path"]
        if not Path(teacher).exists():
            raise SDiTError(f"the run's teacher {teacher} is not on this machine; pass --teacher")
        return config.run, teacher
    teacher = config.teacher or tiny_teacher(tmp)
    made = init(InitConfig(teacher=teacher, student=config.student, out=str(tmp / "run"),
                           teacher_config=config.teacher_config))
    return str(made.run), teacher


@torch.no_grad()
def measure(config: BenchSampleConfig, run: str, teacher_path: str, device: torch.device,
            dtype: torch.dtype) -> dict:
    from sdit.pipeline_sdit import load_pipeline
    from sdit.sampling import teacher_images
    from sdit.teacher import load_teacher

    pipe = load_pipeline(run, device, dtype)
    pipe.use_scheduler(config.scheduler)
    teacher = load_teacher(teacher_path, config_dir=config.teacher_config, device=device, dtype=dtype)
    size = pipe.latent_size(config.resolution, config.resolution)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(config.images)]
    noise = pipe.initial_noise(config.images, size, [torch.Generator().manual_seed(i) for i in range(config.images)])

    def student():
        pipe(prompts, latents=noise, num_inference_steps=config.steps, guidance_scale=config.guidance,
             output_type="np")

    def teacher_run():
        scheduler = make_scheduler(config.scheduler, dict(pipe.scheduler.config))
        teacher_images(teacher, prompts, None, noise, scheduler, config.steps, config.guidance, device)

    best = best_of({"student": student, "teacher": teacher_run}, config.repeats, device)
    forwards = 1 if pipe.guidance_distilled else GUIDED_FORWARDS
    x = torch.zeros(1, pipe.transformer.config.in_channels, *size, device=device, dtype=dtype)
    t = torch.zeros(1, device=device)
    text = pipe.encode_prompt(prompts[:1]).to(dtype)
    w = torch.ones(1, device=device) if pipe.guidance_distilled else None
    return {
        "student_images_per_s": config.images / best["student"],
        "teacher_images_per_s": config.images / best["teacher"],
        "speedup": best["teacher"] / best["student"],
        "images": config.images, "steps": config.steps, "resolution": [size[0] * pipe.vae_scale_factor,
                                                                       size[1] * pipe.vae_scale_factor],
        "run_flops_per_step": {  # of the timed models, per image
            "student": forwards * forward_flops(pipe.transformer, x, t, text, guidance=w),
            "teacher": GUIDED_FORWARDS * forward_flops(teacher.unet, x, t, encoder_hidden_states=text),
        },
    }


def flops_per_step(presets: tuple[str, ...], latent: int) -> dict:
    """FLOPs per sampling step of one image at `latent` x `latent` latents: guided (two forwards) for each
    preset and SD 1.5's UNet, and guidance-distilled (one forward) for each preset."""
    guided = {p: GUIDED_FORWARDS * student_flops(p, sample_size=latent) for p in presets}
    guided["sd15_unet"] = GUIDED_FORWARDS * unet_flops(sample_size=latent)
    distilled = {p: student_flops(p, sample_size=latent, guidance_embed=True) for p in presets}
    return {"flops_per_step": guided, "flops_per_step_distilled": distilled, "flops_latent": latent}


def format_sample_table(result: dict) -> str:
    c, h, w = result["config"], *result["resolution"]
    run_flops = result["run_flops_per_step"]
    lines = [
        f"sampling {result['images']} images at {h}x{w}, {result['steps']} {c['scheduler']} steps, guidance "
        f"{c['guidance']:g} ({result['device']}, {result['dtype']}; best of {c['repeats']})",
        f"{'student (' + (c['run'] or c['student']) + ')':<40}{result['student_images_per_s']:>10.2f} images/s"
        f"{run_flops['student'] / 1e9:>10.3f} GFLOP/step",
        f"{'teacher (' + (c['teacher'] or 'tiny SD') + ')':<40}{result['teacher_images_per_s']:>10.2f} images/s"
        f"{run_flops['teacher'] / 1e9:>10.3f} GFLOP/step",
        f"{'student / teacher':<40}{result['speedup']:>10.2f}x",
        f"FLOPs per sampling step, one image at {result['flops_latent']}x{result['flops_latent']} latents "
        f"({result['flops_latent'] * 8} px), a multiply-add = 2:",
        f"  {'model':<20}{'guided (2 fwd)':>16}{'distilled (1 fwd)':>20}{'vs SD 1.5 guided':>18}",
    ]
    unet = result["flops_per_step"]["sd15_unet"]
    for name, value in result["flops_per_step"].items():
        distilled = result["flops_per_step_distilled"].get(name)
        lines.append(f"  {name:<20}{value / 1e9:>14.1f} G"
                     f"{(f'{distilled / 1e9:.1f} G' if distilled else '-'):>20}{value / unet:>17.2f}x")
    return "\n".join(lines)
