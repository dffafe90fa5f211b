"""A tiny, random-weight Stable Diffusion: SD 1.5's component classes, scheduler and real CLIP tokenizer
at a few hundred thousand parameters. Tests, benchmarks and the pre-training demo run the real loading
and encoding code on it.

    python -m sdit.tiny OUT_DIR [--single-file]
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from sdit.convert import to_original_layout
from sdit.teacher import SD15_CONFIG_DIR

# Four VAE levels, like SD 1.5's, so latents are 1/8 of the image side.
TINY_VAE = dict(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=4, latent_channels=4,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                sample_size=64, scaling_factor=0.18215)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, vocab_size=49408, projection_dim=32, hidden_act="quick_gelu",
                 bos_token_id=0, eos_token_id=2, pad_token_id=1)
TINY_UNET = dict(block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
                 norm_num_groups=8, sample_size=8, in_channels=4, out_channels=4,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])


def build_tiny_components(seed: int = 0) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    return {
        "vae": AutoencoderKL(**TINY_VAE),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**TINY_TEXT)),
        "unet": UNet2DConditionModel(**TINY_UNET),
    }


def save_configs(models: dict[str, torch.nn.Module], out: Path, source: Path = SD15_CONFIG_DIR) -> None:
    """The config folder of a pipeline: model_index, component configs, and the tokenizer and scheduler of
    `source` (SD 1.5's by default)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("model_index.json", "scheduler", "tokenizer"):
        src = source / name
        if src.is_dir():
            shutil.copytree(src, out / name, dirs_exist_ok=True)
        else:
            shutil.copy(src, out / name)
    for name, model in models.items():
        (out / name).mkdir(exist_ok=True)
        config = model.config.to_dict() if name == "text_encoder" else dict(model.config)
        (out / name / "config.json").write_text(json.dumps(config, indent=2, default=str))


def save_tiny_teacher(out: str | Path, *, seed: int = 0, single_file: bool = False) -> Path:
    """Write a tiny teacher: a diffusers folder at `out`, or, with `single_file`, a config folder at
    `out` plus `out/tiny-sd.safetensors` in the original layout. Returns what `--teacher` takes."""
    out = Path(out)
    models = build_tiny_components(seed)
    if single_file:
        save_configs(models, out)
        file = out / "tiny-sd.safetensors"
        save_file(to_original_layout(models["unet"], models["vae"], models["text_encoder"]), file)
        return file
    save_configs(models, out)
    for name, model in models.items():
        model.save_pretrained(out / name)
    return out


if __name__ == "__main__":
    print(save_tiny_teacher(sys.argv[1], single_file="--single-file" in sys.argv))
