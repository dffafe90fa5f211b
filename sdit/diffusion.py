"""The noise schedule and the one function that builds a noisy input from stored arrays.

Invariant 1 of docs/design.md: the student sees exactly what the teacher saw. Stage one (teacher-label) and stage
two (train) both call `noisy_latents` on the latents and noise read from the store, so the two agree bit for
bit whatever device each stage runs on: the arithmetic happens here, on the CPU in float32, in a fixed order,
and only the result moves to the model's device and dtype.
"""

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDPMScheduler

from sdit.errors import SDiTError

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class NoiseSchedule:
    """ᾱ_t of a teacher's scheduler config, t = 0 .. num_train_timesteps - 1."""

    alphas_cumprod: torch.Tensor  # (T,) float32, as diffusers computes it
    prediction_type: str

    @classmethod
    def from_config(cls, scheduler_config: dict) -> "NoiseSchedule":
        prediction = scheduler_config.get("prediction_type", "epsilon")
        if prediction not in PREDICTION_TYPES:
            raise SDiTError(f"teacher prediction type {prediction!r} is not supported (use {PREDICTION_TYPES})")
        # Any diffusers scheduler of SD's family derives the same ᾱ from the same betas; DDPM's is the plainest.
        config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
        ddpm = DDPMScheduler.from_config(config)
        return cls(ddpm.alphas_cumprod.to(torch.float32).clone(), prediction)

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def coefficients(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(ᾱ_t), sqrt(1 - ᾱ_t)), each (N, 1, 1, 1) float32."""
        t = torch.as_tensor(timesteps, dtype=torch.long).cpu()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps})")
        a = self.alphas_cumprod[t]
        return a.sqrt().view(-1, 1, 1, 1), (1 - a).sqrt().view(-1, 1, 1, 1)


def as_storage(values: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Round to the storage dtype (fp16) first, so what stage one used is exactly what it stored."""
    return torch.as_tensor(np.asarray(values, dtype=np.float16) if isinstance(values, np.ndarray)
                           else values.detach().cpu().to(torch.float16))


def noisy_latents(schedule: NoiseSchedule, latents, noise, timesteps) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·ε, float32 on the CPU, from storage-dtype inputs.

    latents, noise: (N, C, h, w), fp16 as stored (anything else is rounded to fp16 first); timesteps: (N,).
    """
    x0, eps = as_storage(latents).float(), as_storage(noise).float()
    if x0.shape != eps.shape:
        raise ValueError(f"latents {tuple(x0.shape)} and noise {tuple(eps.shape)} differ in shape")
    signal, sigma = schedule.coefficients(timesteps)
    return signal * x0 + sigma * eps  # (N, C, h, w); two products and a sum, no fused kernel


def epsilon_from_prediction(schedule: NoiseSchedule, prediction: torch.Tensor, x_t: torch.Tensor,
                            timesteps) -> torch.Tensor:
    """The teacher's ε whatever it predicts: v-prediction (SD 2.x) gives ε = sqrt(ᾱ)·v + sqrt(1-ᾱ)·x_t."""
    if schedule.prediction_type == "epsilon":
        return prediction
    signal, sigma = (c.to(prediction.device, prediction.dtype) for c in schedule.coefficients(timesteps))
    return signal * prediction + sigma * x_t.to(prediction.dtype)
