"""The toy teacher's sizes and training configs, and the evaluation sampler's settings, without torch (the CLI
reads their defaults)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from sdit.config import vae_scale_factor
from sdit.shapes import world

TOKENS = 77  # CLIP's context; SD pads every caption to it, and so do we
# Every evaluation sample (`sdit toy eval`, the experiment's teacher and students): DDIM steps and the guidance
# scale, 3 rather than 5 for students and teacher alike (docs/shapes-world.md).
EVAL_STEPS = 25
EVAL_GUIDANCE = 3.0


@dataclass(frozen=True)
class ToySize:
    """Component configs (keyword arguments of the diffusers / transformers classes)."""

    vae: dict
    text: dict
    unet: dict

    @property
    def latent_factor(self) -> int:
        return vae_scale_factor(self.vae["block_out_channels"])


def _vae(channels: list[int], latent_channels: int = 4) -> dict:
    n = len(channels)
    return dict(block_out_channels=channels, layers_per_block=1, norm_num_groups=8, latent_channels=latent_channels,
                down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                sample_size=world.DEFAULT_RESOLUTION, scaling_factor=1.0)


def _text(width: int, layers: int, heads: int) -> dict:
    # SD 1.5's CLIP ends captions with token 49407; eos_token_id=2 keeps transformers' legacy pooling
    # (argmax of the ids), which finds that token, exactly as SD 1.5's own config does.
    return dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads,
                max_position_embeddings=TOKENS, vocab_size=49408, projection_dim=width, hidden_act="quick_gelu",
                bos_token_id=0, eos_token_id=2, pad_token_id=1)


def _unet(channels: list[int], cross: int, sample: int, head_dim: int = 16) -> dict:
    n = len(channels)
    return dict(block_out_channels=channels, layers_per_block=1, cross_attention_dim=cross, attention_head_dim=head_dim,
                norm_num_groups=16, sample_size=sample, in_channels=4, out_channels=4,
                down_block_types=["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1))


# Factor 8 is the default because a UNet step on 8x8 latents costs a fraction of one on 16x16, so a CPU affords
# several times the steps, not because it reconstructs better: data/toy-sd/README.md gives the costs.
SIZES: dict[str, ToySize] = {
    # SD's factor 8: 64 px -> 8x8x4 latents.
    "f8": ToySize(_vae([8, 16, 32, 64]), _text(64, 2, 4), _unet([64, 128, 128], 64, 8)),
    # Factor 4: 64 px -> 16x16x4 latents (four times the UNet's work per step).
    "f4": ToySize(_vae([16, 32, 64]), _text(64, 2, 4), _unet([64, 128, 128], 64, 16)),
    # For tests: seconds, not minutes.
    "test": ToySize(_vae([8, 16]), _text(16, 1, 2), _unet([16, 32], 16, 16, head_dim=8)),
}


@dataclass(frozen=True)
class DataConfig:
    images: int = 20_000  # drawn from the whole world by `world.sample`
    seed: int = 0
    resolution: int = world.DEFAULT_RESOLUTION
    check_images: int = 512  # a separate draw (seed + 1) for the VAE's reconstruction check


@dataclass(frozen=True)
class VAEConfig:
    steps: int = 1600
    batch_size: int = 16
    lr: float = 1e-3
    kl_weight: float = 1e-6
    # Squared errors on the shape's pixels count this many times more than on the background: a small
    # shape covers 5% of the image, and plain MSE learns backgrounds first and colours last.
    object_weight: float = 0.0
    checkpoint_every: int = 250
    seed: int = 1


@dataclass(frozen=True)
class UNetConfig:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.995  # a window of about 200 steps: short runs keep moving fast
    empty_caption_rate: float = 0.1  # captions dropped to "" so classifier-free guidance works
    train_text: bool = True  # the UNet's loss trains the text encoder too; False keeps it random and frozen
    # Random token embeddings already tell the world's words apart; a dense Adam update of all 49,408
    # rows every step is a large share of a step, so by default only the transformer layers learn.
    train_token_embedding: bool = False
    offset_noise: float = 0.0  # per-channel noise offset (0 = plain SD); recorded in the teacher's README
    # γ: each draw's ε loss weighted by min(1/ᾱ_t, γ) (sdit.losses.high_noise_weight), a weighted mean; 0: plain
    # SD. Tried for position words, which the layout settled at high noise ignores: γ = 20 did not teach them.
    high_noise_weight: float = 0.0
    checkpoint_every: int = 500
    seed: int = 2


@dataclass(frozen=True)
class ToyConfig:
    size: str = "f8"
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    threads: int = 2  # torch's CPU thread count; convolutions round differently with another one

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> ToyConfig:
        return cls(d["size"], DataConfig(**d["data"]), VAEConfig(**d["vae"]), UNetConfig(**d["unet"]), d["threads"])
