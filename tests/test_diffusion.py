import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from sdit.diffusion import NoiseSchedule, epsilon_from_prediction, noisy_latents
from sdit.errors import SDiTError
from sdit.teacher import SD15_CONFIG_DIR

SD15_SCHEDULER = json.loads((SD15_CONFIG_DIR / "scheduler" / "scheduler_config.json").read_text())


def _arrays(n=6, seed=0):
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((n, 4, 8, 8)).astype(np.float16)
    noise = rng.standard_normal((n, 4, 8, 8)).astype(np.float16)
    return latents, noise, torch.tensor(rng.integers(0, 1000, n))


def test_schedule_is_sd15s():
    schedule = NoiseSchedule.from_config(SD15_SCHEDULER)
    assert schedule.num_timesteps == 1000 and schedule.prediction_type == "epsilon"
    assert schedule.alphas_cumprod[0].item() == pytest.approx(0.99915, abs=1e-5)
    assert schedule.alphas_cumprod[-1].item() == pytest.approx(0.0046, abs=1e-4)  # SD's non-zero terminal SNR


def test_noisy_latents_match_diffusers_and_are_reproducible():
    schedule = NoiseSchedule.from_config(SD15_SCHEDULER)
    latents, noise, t = _arrays()
    x_t = noisy_latents(schedule, latents, noise, t)
    expected = DDPMScheduler.from_config(SD15_SCHEDULER).add_noise(
        torch.from_numpy(latents).float(), torch.from_numpy(noise).float(), t)
    assert torch.allclose(x_t, expected, atol=1e-6)
    assert torch.equal(x_t, noisy_latents(schedule, latents, noise, t))
    # One batch or one record at a time: the same bits (what lets stage two rebuild stage one's input).
    single = torch.cat([noisy_latents(schedule, latents[i:i + 1], noise[i:i + 1], t[i:i + 1]) for i in range(6)])
    assert torch.equal(x_t, single)


def test_inputs_are_rounded_to_the_storage_dtype_first():
    schedule = NoiseSchedule.from_config(SD15_SCHEDULER)
    latents, noise, t = _arrays()
    fine = latents.astype(np.float32) + 1e-4  # below fp16's resolution near 1: rounds back to the stored value
    assert torch.equal(noisy_latents(schedule, fine, noise, t),
                       noisy_latents(schedule, fine.astype(np.float16), noise, t))


def test_v_prediction_converts_to_epsilon():
    schedule = NoiseSchedule.from_config(SD15_SCHEDULER | {"prediction_type": "v_prediction"})
    latents, noise, t = _arrays()
    x0, eps = torch.from_numpy(latents).float(), torch.from_numpy(noise).float()
    x_t = noisy_latents(schedule, latents, noise, t)
    signal, sigma = schedule.coefficients(t)
    v = signal * eps - sigma * x0  # what a perfect v-prediction teacher outputs
    assert torch.allclose(epsilon_from_prediction(schedule, v, x_t, t), eps, atol=1e-5)


def test_bad_inputs():
    with pytest.raises(SDiTError, match="prediction type"):
        NoiseSchedule.from_config(SD15_SCHEDULER | {"prediction_type": "sample"})
    schedule = NoiseSchedule.from_config(SD15_SCHEDULER)
    latents, noise, _ = _arrays()
    with pytest.raises(ValueError, match="timesteps"):
        noisy_latents(schedule, latents, noise, torch.full((6,), 1000))
    with pytest.raises(ValueError, match="shape"):
        noisy_latents(schedule, latents, noise[:, :2], torch.zeros(6))
