"""The VAE's latent space as stores and students use it: latents = (z − shift) × scale.

`scaling_factor` (0.18215 for SD 1.5) brings the VAE's latents to about unit variance, as the diffusion noise
is; some VAEs also have a `shift_factor`. Stage one stores scaled latents, samplers decode them back, and the toy
teacher trains on them: all through these two functions.
"""

from __future__ import annotations

import torch


def to_latent_space(vae, z: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) raw VAE latents (a posterior mean or sample) -> the scaled latents diffusion works on."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


def from_latent_space(vae, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of `to_latent_space`: what the VAE's decoder takes."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return latents / vae.config.scaling_factor + shift
