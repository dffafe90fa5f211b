"""Sampling from an ε-model with a diffusers scheduler and classifier-free guidance.

The network is only ε(x_t, t, text, [w]); the sampler is a diffusers scheduler picked by name and built from
the run's (the teacher's) scheduler config, so the student and the teacher can be sampled the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext

import diffusers
import numpy as np
import torch

# Relative imports: run folders carry a copy of this module (sdit.pipeline_sdit imports it), which loads where
# sdit is not installed.
from .config import SCHEDULERS, check_scheduler
from .latents import from_latent_space
from .text import encode_text

EpsModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t, text) -> ε


def teacher_eps(unet, count: Callable[[int], None] | None = None) -> EpsModel:
    """A diffusers UNet's ε in float32, its inputs cast to the UNet's dtype. `count(n)`, where given, is told the
    n rows of each call: the teacher forwards taken."""

    def eps(x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if count is not None:
            count(len(x))
        return unet(x.to(unet.dtype), t, encoder_hidden_states=text.to(unet.dtype)).sample.float()

    return eps


def student_eps(model: torch.nn.Module, guidance: float | None = None,
                autocast: AbstractContextManager | None = None) -> EpsModel:
    """An SDiT student's ε in float32, its inputs cast to the student's dtype and run under `autocast` where given.
    A guidance-distilled student takes `guidance` as w; another takes None."""
    dtype = model.dtype

    def eps(x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        w = None if guidance is None else torch.full((len(x),), guidance, device=x.device)
        with autocast or nullcontext():
            return model(x.to(dtype), t, text.to(dtype), guidance=w).float()

    return eps


def make_scheduler(name: str, config: dict):
    check_scheduler(name)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    return getattr(diffusers, SCHEDULERS[name]).from_config(config)


def initial_noise(shape: tuple[int, ...], generators: list[torch.Generator], device: torch.device) -> torch.Tensor:
    """(N, C, h, w) standard normal, image i from generators[i] alone, so it does not depend on the batch."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def guided_eps(eps_model: EpsModel, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, null: torch.Tensor | None,
               guidance: float) -> torch.Tensor:
    """ε with classifier-free guidance: with `null` and guidance != 1, ε_u + w·(ε_c − ε_u) from one forward on the
    doubled batch (text and null), as Stable Diffusion's pipeline runs it; else the model's ε on `text`."""
    if null is None or guidance == 1.0:
        return eps_model(x, t, text)
    eps_c, eps_u = eps_model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, null])).chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


@torch.no_grad()
def denoise(eps_model: EpsModel, scheduler, noise: torch.Tensor, text: torch.Tensor, null: torch.Tensor | None,
            steps: int, guidance: float, progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Latents (N, C, h, w) from initial `noise` (unit variance), conditioned on `text` (N, L, D).

    With `null` (N, L, D) and guidance != 1, each step runs the model once on the doubled batch (text and
    null) and returns ε_u + w·(ε_c − ε_u), as Stable Diffusion's pipeline does.
    """
    for i, out in enumerate(denoising_steps(eps_model, scheduler, noise, text, null, steps, guidance)):
        x = out.prev_sample
        if progress:
            progress(i + 1)
    return x


def denoising_steps(eps_model: EpsModel, scheduler, noise: torch.Tensor, text: torch.Tensor, null: torch.Tensor | None,
                    steps: int, guidance: float) -> Iterator:
    """`denoise` one step at a time: yields the scheduler's output of each step (its `prev_sample`, and for DDIM
    its `pred_original_sample`), so that a caller can stop early."""
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = guided_eps(eps_model, scheduler.scale_model_input(x, t), t.expand(len(x)), text, null, guidance)
        out = scheduler.step(eps, t, x)
        x = out.prev_sample
        yield out


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> np.ndarray:
    """(N, H, W, 3) uint8 images from scaled latents."""
    param = next(vae.parameters())
    pixels = vae.decode(from_latent_space(vae, latents.to(param.device, param.dtype))).sample
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def teacher_images(teacher, prompts: list[str], negatives: list[str] | None, noise: torch.Tensor, scheduler,
                   steps: int, guidance: float, device: torch.device) -> np.ndarray:
    """(N, H, W, 3) uint8 from a teacher's UNet (an sdit.teacher.Teacher with unet, vae, text encoder) with
    classifier-free guidance, from the given initial noise (N, C, h, w) and scheduler: the sampling loop the
    student runs, with the teacher's ε."""
    text = encode_text(teacher.tokenizer, teacher.text_encoder, prompts, device)
    null = encode_text(teacher.tokenizer, teacher.text_encoder, negatives or [""] * len(prompts), device) \
        if guidance != 1.0 else None
    latents = denoise(teacher_eps(teacher.unet), scheduler, noise.to(device, torch.float32), text, null, steps,
                      guidance)
    return decode(teacher.vae, latents)
