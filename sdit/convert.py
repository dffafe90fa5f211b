"""Diffusers layout -> the original (CompVis/LDM) single-file layout of Stable Diffusion 1.x.

diffusers reads original-layout files (`from_single_file`) but ships no writer. We need one to save the
toy teacher as a single file and to test single-file loading on tiny models. The mapping is renaming
(and a reshape of the VAE's attention projections, which the original stores as 1x1 convolutions); it
is checked by a round trip through diffusers' own reader in the tests.
"""

from collections.abc import Iterator

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
_VAE_RESNET = [("conv_shortcut", "nin_shortcut")]
_VAE_ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def unet_block_prefixes(config) -> Iterator[tuple[str, str]]:
    """(diffusers prefix, original prefix) for every block of an SD 1.x-style UNet, read off its config."""
    yield "time_embedding.linear_1.", "time_embed.0."
    yield "time_embedding.linear_2.", "time_embed.2."
    yield "conv_in.", "input_blocks.0.0."
    yield "conv_norm_out.", "out.0."
    yield "conv_out.", "out.2."
    per = config.layers_per_block + 1  # input/output blocks per level, counting the resampler
    n = len(config.block_out_channels)
    for i in range(n):
        for j in range(config.layers_per_block):
            yield f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{1 + i * per + j}.0."
            yield f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{1 + i * per + j}.1."
        if i < n - 1:
            yield f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * per}.0.op."
    yield "mid_block.resnets.0.", "middle_block.0."
    yield "mid_block.attentions.0.", "middle_block.1."
    yield "mid_block.resnets.1.", "middle_block.2."
    for i, kind in enumerate(config.up_block_types):
        for j in range(per):
            yield f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{i * per + j}.0."
            yield f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{i * per + j}.1."
        if i < n - 1:
            slot = 2 if kind.startswith("CrossAttn") else 1
            yield f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * per + per - 1}.{slot}."


def vae_block_prefixes(config) -> Iterator[tuple[str, str]]:
    """(diffusers prefix, original prefix) for every block of an AutoencoderKL."""
    n = len(config.block_out_channels)
    for side in ("encoder", "decoder"):
        yield f"{side}.conv_norm_out.", f"{side}.norm_out."
        yield f"{side}.mid_block.resnets.0.", f"{side}.mid.block_1."
        yield f"{side}.mid_block.resnets.1.", f"{side}.mid.block_2."
        yield f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1."
    for i in range(n):
        for j in range(config.layers_per_block):
            yield f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}."
        yield f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."
        # The original decoder counts its levels from the lowest resolution up.
        for j in range(config.layers_per_block + 1):
            yield f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}."
        yield f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample."


def _rename(key: str, prefixes: list[tuple[str, str]], inner: list[tuple[str, str]]) -> str:
    for new, old in prefixes:
        if key.startswith(new):
            rest = key[len(new):]
            for inner_new, inner_old in inner:
                if rest.startswith(inner_new + "."):
                    rest = inner_old + rest[len(inner_new):]
                    break
            return old + rest
    return key  # conv_in, quant_conv and the like keep their names


def unet_to_original(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    prefixes = sorted(unet_block_prefixes(unet.config), key=lambda p: -len(p[0]))
    return {UNET_PREFIX + _rename(k, prefixes, _RESNET): v for k, v in unet.state_dict().items()}


def vae_to_original(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    prefixes = sorted(vae_block_prefixes(vae.config), key=lambda p: -len(p[0]))
    out = {}
    for key, value in vae.state_dict().items():
        inner = _VAE_ATTENTION if ".mid_block.attentions." in key else _VAE_RESNET
        if ".mid_block.attentions." in key and value.ndim == 2:
            value = value[:, :, None, None]  # the original attention projections are 1x1 convolutions
        out[VAE_PREFIX + _rename(key, prefixes, inner)] = value
    return out


def text_encoder_to_original(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    # transformers 5 dropped the `text_model.` level from CLIPTextModel's state dict; originals have it.
    state = text_encoder.state_dict()
    return {TEXT_PREFIX + k.removeprefix("text_model."): v for k, v in state.items()}


def to_original_layout(unet: UNet2DConditionModel, vae: AutoencoderKL,
                       text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """One state dict in the layout of SD 1.5's `v1-5-pruned-emaonly` files (contiguous tensors)."""
    state = unet_to_original(unet) | vae_to_original(vae) | text_encoder_to_original(text_encoder)
    return {k: v.detach().contiguous() for k, v in state.items()}
