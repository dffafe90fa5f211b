"""Choices, defaults and the configs the CLI reads before any command runs.

Nothing here imports torch, diffusers or transformers, so `sdit --help` starts at once; the modules that do the
work import their configs from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import numpy as np

# A relative import: run folders carry a copy of this module (sdit.sampling imports it), which loads where sdit
# is not installed.
from .errors import SDiTError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
SD15_CONFIG_DIR = DATA_DIR / "sd15"  # SD 1.5's component configs and tokenizer, for offline loading
TOY_TEACHER = DATA_DIR / "toy-sd"  # the shapes world's toy SD teacher

DEFAULT_GUIDANCE = 7.5  # Stable Diffusion's default CFG scale
DEFAULT_SCHEDULER = "ddim"  # what `sdit sample` and `sdit eval` use, and what a run folder saves
DEVICES = "auto, cpu, cuda or cuda:N"
DTYPES = ("auto", "fp32", "fp16", "bf16")
# How a CLIP score averages its cosines: torchmetrics' CLIPScore (100 × the mean cosine, clamped at 0) or BK-SDM's
# evaluation script (the mean raw cosine).
CLIP_SCORES = ("torchmetrics", "bk-sdm")


SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "ddpm": "DDPMScheduler",
}


def check_scheduler(name: str, option: str | None = None) -> None:
    """A sampler's name, refused in one line (naming the CLI `option` it came from) when not one of SCHEDULERS."""
    if name not in SCHEDULERS:
        said = f"{option} {name!r}" if option else f"unknown scheduler {name!r}"
        raise SDiTError(f"{said}: choose one of {', '.join(SCHEDULERS)}")


class Kind(IntEnum):
    NONE = 0
    INPUT = 1
    SWAP = 2
    MIX = 3
    NULL = 4
    TRAJECTORY = 5  # a state the teacher's own sampler visited on its way from pure noise, with its own caption


# The kinds a perturbation mix draws from (`--perturb`); trajectory draws come from `--synth-trajectory` instead.
DRAWN_KINDS = (Kind.NONE, Kind.INPUT, Kind.SWAP, Kind.MIX, Kind.NULL)


class CaptionFrom(IntEnum):
    OWN = 0
    RECORD = 1  # index: a record's global number in the store
    PROMPT = 2  # index: a prompt's number in the prompt bank


CAPTION_KINDS = (Kind.SWAP, Kind.MIX)


# Draws whose true noise ε is still a target for the student's input: the real image with its own caption,
# the empty caption (the unconditional model), or an input perturbation (the target stays ε). With another
# caption the true noise belongs to an image that caption does not describe, so only ε_T teaches there.
TRUE_NOISE_KINDS = (Kind.NONE, Kind.INPUT, Kind.NULL)


# Tuned with `sdit bench distill` (docs/shapes-world.md): a caption perturbation in about a quarter of the draws,
# from the prompt bank, where the teacher knows what the limited data lacks.
DEFAULT_MIX = {"none": 0.4, "input": 0.1, "swap": 0.3, "mix": 0.1, "null": 0.1}
MIX_TOLERANCE = 1e-6  # how far a mix's sum may be from 1 (decimal fractions do not add up exactly in binary)


@dataclass(frozen=True)
class PerturbConfig:
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))  # kind name -> probability
    input_gamma: float = 0.1
    caption_min_t: int = 400  # swap and mix only where t >= this
    prompt_share: float = 1.0  # of swap/mix captions, the share taken from the prompt bank (when it has any)

    def __post_init__(self) -> None:
        names = [k.name.lower() for k in DRAWN_KINDS]
        if unknown := set(self.mix) - set(names):
            raise SDiTError(f"unknown perturbations {sorted(unknown)}; choose from {names}")
        if any(p < 0 for p in self.mix.values()):
            raise SDiTError(f"--perturb {_mix_text(self.mix)}: probabilities cannot be negative")
        total = sum(self.mix.values())
        if abs(total - 1) > MIX_TOLERANCE:
            raise SDiTError(f"--perturb {_mix_text(self.mix)} sums to {total:g}: probabilities must sum to 1"
                            f"{_mix_fix(self.mix)}")
        if not 0 <= self.prompt_share <= 1 or self.input_gamma < 0:
            raise SDiTError("prompt share must lie in [0, 1] and input gamma must not be negative")

    @classmethod
    def from_file(cls, path: str) -> "PerturbConfig":
        """A JSON file: {"mix": {"none": 0.4, ...}, "input_gamma": 0.1, "caption_min_t": 400, "prompt_share": 1.0}."""
        try:
            data = json.loads(Path(path).read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as err:
            raise SDiTError(f"--perturb {path}: not a perturbation config ({err}); keys: "
                            f"{', '.join(cls.__dataclass_fields__)}") from None
        except SDiTError as err:
            raise SDiTError(f"{err} (in {path})") from None

    @classmethod
    def parse(cls, text: str, **options) -> "PerturbConfig":
        """`none=0.4,input=0.1,swap=0.3,mix=0.1,null=0.1`; kinds left out get probability 0."""
        mix = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, sep, value = part.partition("=")
            try:
                mix[name.strip()] = float(value)
            except ValueError:
                raise SDiTError(f"--perturb {text!r}: write name=probability pairs, e.g. none=0.8,null=0.2") from None
            if not sep:
                raise SDiTError(f"--perturb {text!r}: write name=probability pairs, e.g. none=0.8,null=0.2")
        return cls(mix=mix, **options)

    @classmethod
    def from_option(cls, perturb: str | None, **options) -> "PerturbConfig":
        """What `--perturb` says: a `.json` config file, a `name=p,...` mix (with `options` for the rest), or
        nothing (the default mix with `options`)."""
        if perturb and perturb.endswith(".json"):
            return cls.from_file(perturb)
        if perturb:
            return cls.parse(perturb, **options)
        return cls(**options)

    def probabilities(self, caption_kinds_allowed: bool) -> np.ndarray:
        """(len(DRAWN_KINDS),) probabilities, renormalised over the kinds allowed at this timestep."""
        p = np.array([self.mix.get(k.name.lower(), 0.0) for k in DRAWN_KINDS], dtype=np.float64)
        if not caption_kinds_allowed:
            p[[int(k) for k in CAPTION_KINDS]] = 0.0
        if p.sum() == 0:  # only caption perturbations were asked for, and none is allowed here
            p[Kind.NONE] = 1.0
        return p / p.sum()


def _mix_text(mix: dict[str, float]) -> str:
    return ",".join(f"{name}={p:g}" for name, p in mix.items())


def _mix_fix(mix: dict[str, float]) -> str:
    """A mix that sums to 1 by changing `none` alone, as an example; "" when there is none."""
    rest = sum(p for name, p in mix.items() if name != "none")
    if rest > 1 + MIX_TOLERANCE:
        return ""
    return f" (e.g. {_mix_text({'none': round(1 - rest, 6)} | {k: p for k, p in mix.items() if k != 'none'})})"


@dataclass(frozen=True)
class SynthesisConfig:
    """How the teacher samples the prompt bank (`sdit teacher-label --synthesize N --synth-*`)."""

    samples: int  # per prompt
    steps: int = 25
    guidance: float = DEFAULT_GUIDANCE  # classifier-free guidance w, against the store's empty-caption embedding
    seed: int = 0
    scheduler: str | None = None  # a name of sdit.SCHEDULERS; None: the teacher's own class
    # Trajectory draws: each sample stops after this many steps of a DDIM sampler and every state it visited is a
    # draw of its record (so it equals the labels' --draws); 0: finished samples.
    trajectory: int = 0

    def check(self) -> None:
        if self.samples < 1 or self.steps < 1:
            raise SDiTError("--synthesize and --synth-steps must be at least 1")
        if self.trajectory and not self.trajectory < self.steps:
            raise SDiTError(f"--synth-trajectory stops each sample after --draws {self.trajectory} steps: give "
                            f"--synth-steps above {self.trajectory} (now {self.steps})")
        if self.trajectory and self.scheduler not in (None, "ddim"):
            raise SDiTError(f"--synth-trajectory runs DDIM, whose states rebuild from (x̂_0, ε, t): drop "
                            f"--synth-scheduler {self.scheduler}")
        if self.guidance < 0:
            raise SDiTError(f"--synth-guidance {self.guidance}: the CFG scale cannot be negative")
        if self.scheduler is not None:
            check_scheduler(self.scheduler, "--synth-scheduler")

    @property
    def guided(self) -> bool:
        return self.guidance != 1.0


def labels_group(name: str) -> str:
    return f"labels/{name}"


def check_high_noise_weight(gamma: float) -> None:
    """γ of `high_noise_weight` is a cap of at least 1, or 0 (off): below 1 it would weigh every draw alike."""
    if gamma and gamma < 1:
        raise SDiTError(f"--high-noise-weight {gamma}: a cap of at least 1 (e.g. 5), or 0 (off)")


def vae_scale_factor(block_out_channels: list[int] | tuple[int, ...]) -> int:
    """Image side / latent side of a diffusers AutoencoderKL: its encoder halves the side after every block but the
    last."""
    return 2 ** (len(block_out_channels) - 1)


def vae_factor(config_dir: Path) -> tuple[int, int]:
    """(image side / latent side, latent channels) from the VAE config of a teacher's config folder."""
    vae = json.loads((config_dir / "vae" / "config.json").read_text())
    return vae_scale_factor(vae["block_out_channels"]), int(vae["latent_channels"])
