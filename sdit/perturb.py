"""Perturbations: what the teacher is asked beyond the real (image, caption) pairs, drawn reproducibly.

Every draw comes from its own generator seeded from (seed, shard, record, draw), so the same seed gives the
same draws whatever the executor, worker count, batch size or interruption (invariant 2). A draw is
described by plain numbers and arrays (timestep, kind, caption indices, weight, noise), which the store
keeps; `perturbed_text` and `input_noise` rebuild the teacher's inputs from them in both stages.

Kinds:
- none:  the record's own caption;
- input: input perturbation (diffusers' --input_perturbation): the input is built from ε + γ·ξ while the
         true-noise target stays ε;
- swap:  another caption (another record's, or a text-only prompt's);
- mix:   (1 - w)·caption_a + w·caption_b, two other captions' embeddings;
- null:  the empty caption (the unconditional prediction classifier-free guidance needs).
Caption perturbations (swap, mix) are only drawn at high noise (t >= caption_min_t): at low noise the
teacher's prediction for a mismatched caption follows the image, which teaches the student to ignore
captions (in an early shapes-world experiment, swaps at every timestep lowered held-out colour accuracy from
89% to 71%).
"""

import json
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import numpy as np
import torch

from sdit.errors import SDiTError


class Kind(IntEnum):
    NONE = 0
    INPUT = 1
    SWAP = 2
    MIX = 3
    NULL = 4


class CaptionFrom(IntEnum):
    OWN = 0
    RECORD = 1  # index: a record's global number in the store
    PROMPT = 2  # index: a prompt's number in the prompt bank


CAPTION_KINDS = (Kind.SWAP, Kind.MIX)
# Draws whose true noise ε is still a target for the student's input: the real image with its own caption,
# the empty caption (the unconditional model), or an input perturbation (the target stays ε). With another
# caption the true noise belongs to an image that caption does not describe, so only ε_T teaches there.
TRUE_NOISE_KINDS = (Kind.NONE, Kind.INPUT, Kind.NULL)
# Tuned with `sdit bench distill` (README): a caption perturbation in about a quarter of the draws, from the
# prompt bank, where the teacher knows what the limited data lacks.
DEFAULT_MIX = {"none": 0.4, "input": 0.1, "swap": 0.3, "mix": 0.1, "null": 0.1}


@dataclass(frozen=True)
class PerturbConfig:
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))  # kind name -> probability
    input_gamma: float = 0.1
    caption_min_t: int = 400  # swap and mix only where t >= this
    prompt_share: float = 1.0  # of swap/mix captions, the share taken from the prompt bank (when it has any)

    def __post_init__(self) -> None:
        unknown = set(self.mix) - {k.name.lower() for k in Kind}
        if unknown:
            raise SDiTError(f"unknown perturbations {sorted(unknown)}; choose from {[k.name.lower() for k in Kind]}")
        if any(p < 0 for p in self.mix.values()) or sum(self.mix.values()) <= 0:
            raise SDiTError("perturbation probabilities must be non-negative and not all zero")
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
        """(len(Kind),) probabilities, renormalised over the kinds allowed at this timestep."""
        p = np.array([self.mix.get(k.name.lower(), 0.0) for k in Kind], dtype=np.float64)
        if not caption_kinds_allowed:
            p[[int(k) for k in CAPTION_KINDS]] = 0.0
        if p.sum() == 0:  # only caption perturbations were asked for, and none is allowed here
            p[Kind.NONE] = 1.0
        return p / p.sum()


@dataclass(frozen=True)
class Draw:
    timestep: int
    kind: Kind
    caption_from: tuple[CaptionFrom, CaptionFrom]  # (a, b); b is used by mix only
    caption_index: tuple[int, int]
    weight: float  # mix weight of caption b
    noise: np.ndarray  # ε, (C, h, w) fp16: the true-noise target
    xi: np.ndarray | None  # ξ, (C, h, w) fp16, for input draws only


def draw_generator(seed: int, shard: int, record: int, draw: int) -> np.random.Generator:
    return np.random.default_rng([seed, shard, record, draw])


def sample_draw(config: PerturbConfig, gen: np.random.Generator, *, latent_shape: tuple[int, ...],
                num_timesteps: int, num_records: int, num_prompts: int,
                stratum: tuple[int, int] | None = None) -> Draw:
    """One draw. `stratum` (k, K) restricts t to the k-th of K equal slices of [0, T) (stratified sampling)."""
    lo, hi = (0, num_timesteps) if stratum is None else (
        stratum[0] * num_timesteps // stratum[1], (stratum[0] + 1) * num_timesteps // stratum[1])
    t = int(gen.integers(lo, hi))
    can_swap = t >= config.caption_min_t and num_records + num_prompts > 1
    kind = Kind(int(gen.choice(len(Kind), p=config.probabilities(can_swap))))
    noise = gen.standard_normal(latent_shape, dtype=np.float32).astype(np.float16)
    xi = gen.standard_normal(latent_shape, dtype=np.float32).astype(np.float16) if kind == Kind.INPUT else None
    sources, indices, weight = [CaptionFrom.OWN, CaptionFrom.OWN], [-1, -1], 0.0
    if kind in CAPTION_KINDS:
        for slot in range(2 if kind == Kind.MIX else 1):
            from_prompts = num_prompts > 0 and (num_records == 0 or gen.random() < config.prompt_share)
            sources[slot] = CaptionFrom.PROMPT if from_prompts else CaptionFrom.RECORD
            indices[slot] = int(gen.integers(num_prompts if from_prompts else num_records))
        weight = float(gen.random()) if kind == Kind.MIX else 0.0
    return Draw(t, kind, (sources[0], sources[1]), (indices[0], indices[1]), weight, noise, xi)


def input_noise(noise: np.ndarray, xi: np.ndarray, gamma: float) -> torch.Tensor:
    """ε + γ·ξ from the stored fp16 arrays, computed in float32 and rounded to fp16, as both stages use it."""
    eps, x = torch.as_tensor(np.asarray(noise, np.float16)).float(), torch.as_tensor(np.asarray(xi, np.float16)).float()
    return (eps + np.float32(gamma) * x).to(torch.float16)


def perturbed_text(kind: int, own: np.ndarray, a: np.ndarray | None, b: np.ndarray | None, weight: float,
                   null: np.ndarray) -> torch.Tensor:
    """The teacher's text input for one draw, (L, D) fp16, from stored embeddings; a mix is computed in
    float32 on the CPU and rounded to fp16, so stage two rebuilds it bit for bit."""
    if kind in (Kind.NONE, Kind.INPUT):
        return torch.as_tensor(np.asarray(own, np.float16))
    if kind == Kind.NULL:
        return torch.as_tensor(np.asarray(null, np.float16))
    if kind == Kind.SWAP:
        return torch.as_tensor(np.asarray(a, np.float16))
    if kind == Kind.MIX:
        ea = torch.as_tensor(np.asarray(a, np.float16)).float()
        eb = torch.as_tensor(np.asarray(b, np.float16)).float()
        w = torch.tensor(weight, dtype=torch.float32)
        return ((1 - w) * ea + w * eb).to(torch.float16)
    raise ValueError(f"unknown perturbation kind {kind}")
