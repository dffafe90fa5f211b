import pytest
import torch

from sdit.diffusion import NoiseSchedule
from sdit.losses import distillation_loss, high_noise_weight, min_snr_weight, timestep_weight, true_noise_mask
from sdit.perturb import Kind
from sdit.teacher import SD15_CONFIG_DIR, load_scheduler_config


def test_true_noise_is_a_target_for_real_pairs_only():
    kinds = torch.tensor([int(k) for k in Kind])  # none, input, swap, mix, null, trajectory
    real = [True, True, False, False, True, False]
    assert true_noise_mask(kinds, torch.zeros(6), guided=False).tolist() == real
    assert not true_noise_mask(kinds, torch.full((6,), 3.0), guided=True).any()  # guided targets are not the true noise
    # ... but a guided target at w = 1 is the teacher's conditional ε: the true noise is its target too.
    assert true_noise_mask(kinds, torch.ones(6), guided=True).tolist() == real
    # At w = 0 it is ε_u, and the student sees the caption: the true noise would teach it the conditional ε instead.
    assert not true_noise_mask(kinds, torch.zeros(6), guided=True).any()


def test_losses_are_the_weighted_mses_and_split_across_workers_exactly():
    g = torch.Generator().manual_seed(0)
    eps, noise, teacher = (torch.randn(6, 4, 2, 2, generator=g) for _ in range(3))
    mask = torch.tensor([True, False, True, True, False, True])
    out = distillation_loss(eps, noise, teacher, mask, task_weight=2.0, kd_weight=0.5)
    task = ((eps - noise) ** 2).mean((1, 2, 3))
    kd = ((eps - teacher) ** 2).mean((1, 2, 3))
    assert torch.allclose(out.loss, (2.0 * task[mask].sum() + 0.5 * kd.sum()) / 6)
    assert torch.allclose(out.task_sum / out.task_count, task[mask].mean())
    # Two workers, each the mean over its half: their average is the whole batch's loss.
    halves = [distillation_loss(eps[s], noise[s], teacher[s], mask[s], 2.0, 0.5).loss for s in (slice(0, 3),
                                                                                                slice(3, 6))]
    assert torch.allclose((halves[0] + halves[1]) / 2, out.loss)


def test_a_non_finite_prediction_on_a_masked_draw_does_not_leak_into_the_task_loss():
    eps = torch.zeros(2, 1, 1, 1)
    noise = torch.tensor([0.0, float("nan")]).view(2, 1, 1, 1)
    out = distillation_loss(eps, noise, torch.zeros_like(eps), torch.tensor([True, False]), 1.0, 0.0)
    assert torch.isfinite(out.loss)


def test_min_snr_weights_only_the_low_noise_steps():
    schedule = NoiseSchedule.from_config(load_scheduler_config(SD15_CONFIG_DIR))
    w = min_snr_weight(schedule, torch.tensor([0, 100, 500, 999]), gamma=5.0)
    assert w[0] < w[1] < 1 and w[2] == 1 and w[3] == 1


def test_high_noise_weight_counts_only_the_high_noise_steps_more_up_to_its_cap():
    schedule = NoiseSchedule.from_config(load_scheduler_config(SD15_CONFIG_DIR))
    t = torch.tensor([0, 100, 500, 800, 999])
    w = high_noise_weight(schedule, t, gamma=5.0)
    a = schedule.alphas_cumprod[t]
    assert torch.allclose(w[:3], 1 / a[:3]) and w[0] == pytest.approx(1, abs=1e-3)  # ~1 where little noise
    assert w[2] < w[3] == w[4] == 5.0  # SD 1.5: 1/ᾱ passes 5 before t = 800
    both = timestep_weight(schedule, t, min_snr=5.0, high_noise=5.0)
    assert torch.allclose(both, min_snr_weight(schedule, t, 5.0) * w)
    assert timestep_weight(schedule, t, 0.0, 0.0) is None
    assert torch.equal(timestep_weight(schedule, t, 0.0, 5.0), w)
