"""Compute cost: FLOPs of one forward of a student or of SD 1.5's UNet, counted, not estimated.

Counts come from `torch.utils.flop_counter.FlopCounterMode` on the meta device: tensors there
have shapes but no storage, so SD 1.5's UNet is counted in a second on a laptop without
allocating its 3.4 GB of weights or any activation.

Conventions (those of torch's counter):
- a multiply-add is 2 FLOPs. Papers that quote "FLOPs" from fvcore (DiT's 118.6 G for
  DiT-XL/2) count multiply-adds, so halve these numbers to compare with them;
- only matrix products (linear, conv, bmm, attention) are counted; normalisation,
  activations, residual adds and other elementwise work are left out. They are a few
  percent of the total and memory-bound, so they say little about compute anyway.

Attention: on CPU tensors `F.scaled_dot_product_attention` dispatches to a fused kernel
(`_scaled_dot_product_flash_attention_for_cpu`) that the counter has no formula for, so it
would count 0. `forward_flops` therefore forces SDPA's math backend, which decomposes
attention into two bmm's that are counted on every device (the meta device happens to take
the math path already; forcing it keeps the count right if that changes).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel

from sdit.config import SD15_CONFIG_DIR, vae_factor
from sdit.dit import build_student
from sdit.presets import DEFAULT_PRESETS

# One training step costs about 3 forwards: the backward computes, for each matrix product,
# the gradient with respect to its input and with respect to its weight, each as costly as
# the forward product (Kaplan et al. 2020's 6·N FLOPs per token = 2·N forward + 4·N backward).
# Gradient checkpointing adds one more forward (4); the teacher's forward, if run online, is extra.
TRAIN_STEP_FORWARDS = 3


def forward_flops(model: Callable, *args, **kwargs) -> int:
    """FLOPs of `model(*args, **kwargs)`, a multiply-add counted as 2.

    Build the model and its inputs on the meta device (`with torch.device("meta"):`) to count
    without memory; real tensors work too, but then the forward really runs. Runs without
    gradients, with SDPA forced onto its math path so that attention is counted (see above).
    """
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(*args, **kwargs)
    return counter.get_total_flops()


def student_flops(
    preset: str,
    sample_size: int = 64,
    in_channels: int = 4,
    text_dim: int = 768,
    tokens: int = 77,
    guidance_embed: bool = False,
) -> int:
    """FLOPs of one student forward at batch 1: latents (1, C, S, S), text (1, tokens, text_dim).

    Every FLOP scales linearly with the batch, so multiply by it for larger batches.
    """
    with torch.device("meta"):
        model = build_student(
            preset, sample_size=sample_size, in_channels=in_channels, text_dim=text_dim, guidance_embed=guidance_embed
        )
        sample = torch.empty(1, in_channels, sample_size, sample_size)  # (1, C, S, S)
        timestep = torch.empty(1)  # (1,)
        text = torch.empty(1, tokens, text_dim)  # (1, L, text_dim)
        guidance = torch.empty(1) if guidance_embed else None  # (1,)
    return forward_flops(model, sample, timestep, text, guidance=guidance)


def train_step_flops(preset: str, batch_size: int = 1, **kwargs) -> int:
    """Approximate FLOPs of one student training step (forward + backward) on `batch_size` samples.

    `kwargs` go to `student_flops`. The teacher's cost, if it runs during training, is not included.
    """
    return TRAIN_STEP_FORWARDS * batch_size * student_flops(preset, **kwargs)


def unet_flops(config_dir: str | Path = SD15_CONFIG_DIR, sample_size: int = 64, tokens: int = 77) -> int:
    """FLOPs of one UNet forward at batch 1: latents (1, C, S, S), text (1, tokens, cross_attention_dim).

    `config_dir` is a diffusers pipeline folder holding `unet/config.json` (SD 1.5's by default),
    or a UNet folder itself. Only the config is read; no weights are needed.
    """
    config_dir = Path(config_dir)
    unet_dir = config_dir / "unet" if (config_dir / "unet" / "config.json").exists() else config_dir
    config = UNet2DConditionModel.load_config(unet_dir)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        c = unet.config
        sample = torch.empty(1, c.in_channels, sample_size, sample_size)  # (1, C, S, S)
        timestep = torch.empty(1)  # (1,)
        text = torch.empty(1, tokens, c.cross_attention_dim)  # (1, L, 768) for SD 1.5
    return forward_flops(unet, sample, timestep, text)


def flops_table(presets: tuple[str, ...] = DEFAULT_PRESETS, sample_size: int = 64) -> dict[str, int]:
    """FLOPs per forward at batch 1 for each preset and for SD 1.5's UNet ("sd15_unet"), at
    `sample_size` latents and 77 CLIP tokens of width 768."""
    table = {preset: student_flops(preset, sample_size=sample_size) for preset in presets}
    table["sd15_unet"] = unet_flops(sample_size=sample_size)
    return table


def unit_flops(config_dir: str | Path, resolution: int, presets: tuple[str, ...]) -> dict[str, float]:
    """FLOPs of one unit of each stage's work at `resolution` px, batch 1, for the components of a diffusers config
    folder: a VAE encode and decode ("vae_encode", "vae_decode"), a text encoder forward of 77 tokens
    ("text_encoder"), a UNet forward ("unet"), and each preset's student forward (by preset name)."""
    config_dir = Path(config_dir)
    factor, channels = vae_factor(config_dir)
    latent = resolution // factor
    text_config = CLIPTextConfig.from_pretrained(config_dir / "text_encoder", local_files_only=True)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
        image = torch.empty(1, 3, resolution, resolution)  # (1, 3, H, W)
        z = torch.empty(1, channels, latent, latent)  # (1, C, h, w)
        flops = {"vae_encode": float(forward_flops(vae.encode, image)),
                 "vae_decode": float(forward_flops(vae.decode, z)),
                 "text_encoder": float(forward_flops(CLIPTextModel(text_config), torch.zeros(1, 77, dtype=torch.long)))}
    flops["unet"] = float(unet_flops(config_dir, sample_size=latent))
    for preset in presets:
        flops[preset] = float(student_flops(preset, sample_size=latent, in_channels=channels,
                                            text_dim=text_config.hidden_size))
    return flops
