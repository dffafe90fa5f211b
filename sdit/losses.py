"""The student's loss: the diffusion loss on the true noise plus the distillation loss on the teacher's ε.

    loss = task_weight · Σ_i m_i·s_i·|ε_s − ε|² / B  +  kd_weight · Σ_i s_i·|ε_s − ε_T|² / B

m_i says whether the true noise is a target for draw i (its kind is in TRUE_NOISE_KINDS and its label is
unguided; a synthetic record's latent is a teacher sample for its caption, so its true noise counts too); s_i is
a per-draw weight: optional timestep weights (min-SNR, high-noise; `timestep_weight`) times `--synthetic-weight`
on synthetic records' draws (see `draw_weight`); |·|² is the mean over the latent's elements. Both sums are
divided by the batch size B, not by the number of draws that count, so that data-parallel workers, whose
gradients are averaged, add up to exactly the loss of one worker on the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdit.config import TRUE_NOISE_KINDS
from sdit.diffusion import NoiseSchedule


@dataclass
class Losses:
    loss: torch.Tensor  # () the objective
    # Sums over the batch, for logging: per-draw means are sum / count, also across workers.
    task_sum: torch.Tensor  # () Σ m_i·|ε_s − ε|² (unweighted by SNR)
    task_count: torch.Tensor  # () Σ m_i
    kd_sum: torch.Tensor  # () Σ |ε_s − ε_T|²


def true_noise_mask(kind: torch.Tensor, guidance: torch.Tensor, guided: bool) -> torch.Tensor:
    """(B,) bool: draws whose true noise the student should predict: real pairs of unguided labels, or of `guided`
    labels at w = 1 exactly (ε_u + 1·(ε_c − ε_u) is the teacher's conditional ε, whose target the true noise is).
    At any other w, w = 0 included, the target is not the true noise: the student is given the caption, so the
    true noise would teach it the conditional ε."""
    kinds = torch.tensor([int(k) for k in TRUE_NOISE_KINDS], device=kind.device)
    real = torch.isin(kind, kinds)
    return real & (guidance == 1) if guided else real


def min_snr_weight(schedule: NoiseSchedule, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B,) min(SNR_t, γ) / SNR_t for ε-prediction (Hang et al., 2023): high-SNR steps count less."""
    a = schedule.alphas_cumprod[timesteps.cpu()]
    snr = a / (1 - a)
    return (snr.clamp(max=gamma) / snr).to(timesteps.device)


def high_noise_weight(schedule: NoiseSchedule, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B,) min(1/ᾱ_t, γ) = min(1 + 1/SNR_t, γ): v-prediction's weighting of the ε loss, capped at γ.

    At high noise the caption decides what the image becomes, but its effect on ε is small (the x_0 it
    implies is scaled by √SNR_t), so an unweighted ε loss barely hears what the teacher says about
    captions there; this counts those draws up to γ times more. Low-noise draws keep weight 1.
    """
    a = schedule.alphas_cumprod[timesteps.cpu()]
    return (1 / a).clamp(max=gamma).to(timesteps.device)


def timestep_weight(schedule: NoiseSchedule, timesteps: torch.Tensor, min_snr: float,
                    high_noise: float) -> torch.Tensor | None:
    """(B,) the product of the weightings asked for; a γ of 0 is off (None: both off)."""
    weight = None
    for weighting, gamma in ((min_snr_weight, min_snr), (high_noise_weight, high_noise)):
        if gamma:
            w = weighting(schedule, timesteps, gamma)
            weight = w if weight is None else weight * w
    return weight


def draw_weight(synthetic: torch.Tensor, synthetic_weight: float, weight: torch.Tensor | None = None
                ) -> torch.Tensor | None:
    """(B,) s_i: `weight` (a timestep weight, or 1) times `synthetic_weight` where `synthetic` (B,) bool;
    `weight` itself when `synthetic_weight` is 1 (None: every weight is 1)."""
    if synthetic_weight == 1.0:
        return weight
    scale = torch.where(synthetic, synthetic_weight, 1.0).to(torch.float32)
    return scale if weight is None else weight.float() * scale.to(weight.device)


def distillation_loss(eps: torch.Tensor, noise: torch.Tensor, eps_teacher: torch.Tensor, mask: torch.Tensor,
                      task_weight: float, kd_weight: float, weight: torch.Tensor | None = None) -> Losses:
    """eps, noise, eps_teacher: (B, C, h, w); mask: (B,) bool; weight: (B,) or None."""
    eps = eps.float()
    task = (eps - noise.float()).pow(2).mean(dim=(1, 2, 3))  # (B,)
    kd = (eps - eps_teacher.float()).pow(2).mean(dim=(1, 2, 3))  # (B,)
    task = torch.where(mask, task, torch.zeros_like(task))  # where, not a product: ignores a NaN ε of a masked draw
    w = torch.ones_like(task) if weight is None else weight.float()
    n = len(eps)
    loss = task_weight * (w * task).sum() / n + kd_weight * (w * kd).sum() / n
    return Losses(loss, task.detach().sum(), mask.sum().float(), kd.detach().sum())


@dataclass
class DrawErrors:
    """Per draw of a batch, each the mean over the latent's elements: what `sdit eval` and `train --eval-every`
    average over held-out draws."""
    teacher: torch.Tensor  # (B,) |ε_s − ε_T|²
    true_noise: torch.Tensor  # (B,) bool: the draws whose true noise is a target (true_noise_mask)
    task: torch.Tensor  # (n,) |ε_s − ε|² on those draws
    task_teacher: torch.Tensor  # (n,) |ε_T − ε|² on those draws: the teacher's own error, for comparison


@torch.no_grad()
def draw_errors(student: torch.nn.Module, batch, device: torch.device, dtype: torch.dtype = torch.float32
                ) -> DrawErrors:
    """The student's errors on a batch of draws (sdit.loader.Batch), against the teacher's ε and the true noise.
    Inputs go to `device` in `dtype`; under autocast the forward runs in autocast's precision."""
    guidance = batch.guidance.to(device) if student.config.guidance_embed else None
    eps = student(batch.x_t.to(device, dtype), batch.timesteps.to(device), batch.text.to(device, dtype),
                  guidance=guidance).float().cpu()
    eps_t, noise = batch.eps_teacher.float(), batch.noise.float()
    mask = true_noise_mask(batch.kind, batch.guidance, guided=guidance is not None)
    return DrawErrors((eps - eps_t).pow(2).mean(dim=(1, 2, 3)), mask,
                      (eps[mask] - noise[mask]).pow(2).mean(dim=(1, 2, 3)),
                      (eps_t[mask] - noise[mask]).pow(2).mean(dim=(1, 2, 3)))
