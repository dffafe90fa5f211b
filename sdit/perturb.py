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
Trajectory draws (`Kind.TRAJECTORY`) are not drawn here: they are the states the teacher's sampler visits from pure
noise for a prompt of the bank (sdit.synthesize), each with its own caption.
Caption perturbations (swap, mix) are only drawn at high noise (t >= caption_min_t): at low noise the
teacher's prediction for a mismatched caption follows the image, which teaches the student to ignore
captions.
"""

from dataclasses import dataclass

import numpy as np
import torch

from sdit.config import CAPTION_KINDS, DRAWN_KINDS, CaptionFrom, Kind, PerturbConfig


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
    kind = DRAWN_KINDS[int(gen.choice(len(DRAWN_KINDS), p=config.probabilities(can_swap)))]
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
    if kind in (Kind.NONE, Kind.INPUT, Kind.TRAJECTORY):
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
