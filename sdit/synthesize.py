"""Synthetic records: the teacher's own samples for the text-only prompt bank, drawn reproducibly.

A text-only prompt has no image, and pairing it with another image's noisy latent teaches the student to
ignore captions (sdit.perturb draws caption swaps at high noise only). A synthetic record gives the prompt a latent
of its own: a sample of the teacher with its own scheduler and classifier-free guidance. It is then labelled like a
real record, and its true noise is a valid target (the latent is a sample of the teacher's distribution for that
caption).

Randomness comes from explicit generators, as everywhere in stage one (invariant 2):

    initial noise of sample s of prompt p:      (seed, p, s, NOISE_STREAM)             whatever the shard or batch
    label draw d of record r of synthetic shard k: (seed, k, r, d, SYNTHETIC_STREAM)   never a records shard's draw

Synthetic shard k holds prompts [k·P, (k+1)·P) of the bank, `samples` each, in (prompt, sample) order, less the
samples whose latents were not finite; P = `prompts_per_shard(shard_size, samples)` keeps a synthetic shard
about as large as a records shard.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import diffusers
import numpy as np
import torch

from sdit import sampling
from sdit.errors import SDiTError
from sdit.store import Store, from_versioned

SYNTHETIC = "synthetic"  # the store group of synthetic records
SYNTHETIC_MANIFEST = "manifest.json"  # synthetic/manifest.json: the set's provenance and counts
SYNTHETIC_VERSION = 1
NOISE_STREAM = 0x53594E54  # "SYNT": initial noise of the teacher's samples
SYNTHETIC_STREAM = 0x53594E44  # "SYND": label draws of synthetic shards, apart from the records' draws
# Schedulers whose step draws fresh noise from global state: a sample would depend on its batch and on
# whatever ran before it, so they are refused.
STOCHASTIC = ("DDPMScheduler", "Ancestral", "SDE", "LCMScheduler", "TCDScheduler")


@dataclass(frozen=True)
class SyntheticManifest:
    """synthetic/manifest.json: one set of synthetic records, its provenance and counts."""

    set_id: str  # labels record the set they label; a new set gets a new id
    created: str
    store_created: str  # the encoding it was made for: a re-encoded store drops the set
    teacher: dict  # TeacherIdentity.to_json(), with the UNet's hash
    config: dict  # SynthesisConfig as a dict
    scheduler: dict  # {"class": the sampler's class name, "config": the teacher's scheduler config}
    prompts: int  # in the bank
    prompts_per_shard: int
    shards: int
    forwards_per_sample: int  # teacher UNet forwards a sample costs
    latent_scale: float
    status: str = "in_progress"  # "complete" once every shard is
    sdit_version: str = ""
    counts: dict = field(default_factory=dict)  # samples, dropped, planned, shards, teacher_forwards
    schema_version: int = SYNTHETIC_VERSION

    def to_json(self) -> dict:
        return asdict(self)


def read_synthetic(store: Store) -> SyntheticManifest | None:
    """The store's synthetic set, or None when it has none."""
    if not store.exists(SYNTHETIC, SYNTHETIC_MANIFEST):
        return None
    return from_versioned(SyntheticManifest, store.read_json(SYNTHETIC, SYNTHETIC_MANIFEST), SYNTHETIC_VERSION,
                          f"{store.url}: synthetic records manifest")


def write_synthetic(store: Store, manifest: SyntheticManifest) -> None:
    store.write_json(manifest.to_json(), SYNTHETIC, SYNTHETIC_MANIFEST)


def prompts_per_shard(shard_size: int, samples: int) -> int:
    return max(1, shard_size // samples)


def noise_generator(seed: int, prompt: int, sample: int) -> np.random.Generator:
    return np.random.default_rng([seed, prompt, sample, NOISE_STREAM])


def synthetic_draw_generator(seed: int, shard: int, record: int, draw: int) -> np.random.Generator:
    return np.random.default_rng([seed, shard, record, draw, SYNTHETIC_STREAM])


def initial_noise(seed: int, prompts: np.ndarray, samples: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """(B, C, h, w) float32 standard normal; row i from (seed, prompts[i], samples[i]) alone."""
    return torch.stack([torch.from_numpy(noise_generator(seed, int(p), int(s)).standard_normal(shape, np.float32))
                        for p, s in zip(prompts, samples)])


def make_sampler(scheduler_config: dict, name: str | None = None):
    """A fresh scheduler (they keep state between steps) of the teacher's own class, or of `name`; only
    deterministic ones, so a sample depends on its seed alone."""
    if name is not None:
        scheduler = sampling.make_scheduler(name, scheduler_config)
    else:
        cls = scheduler_config.get("_class_name", "PNDMScheduler")
        if not hasattr(diffusers, cls):
            raise SDiTError(f"the teacher's scheduler {cls} is unknown to diffusers; pass --synth-scheduler ddim")
        scheduler = getattr(diffusers, cls).from_config({k: v for k, v in scheduler_config.items()
                                                         if not k.startswith("_")})
    kind = type(scheduler).__name__
    if any(s in kind for s in STOCHASTIC) or str(scheduler.config.get("algorithm_type", "")).startswith("sde"):
        raise SDiTError(f"{kind} draws noise at every step, so samples would depend on their batch; pass "
                        "--synth-scheduler ddim (or pndm, dpm++, euler)")
    return scheduler


def forwards_per_sample(scheduler, steps: int, guided: bool) -> int:
    """Teacher UNet forwards one sample costs: one per scheduler timestep (PNDM takes steps + 1), twice with
    guidance (the conditional and the unconditional branch)."""
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps) * (2 if guided else 1)


def read_prompts(store: Store, start: int, stop: int) -> dict[str, np.ndarray]:
    """Prompts [start, stop) of the bank, numbered over its finished shards in order (as sdit.labels.CaptionBank
    numbers them): text_emb (n, L, D) f16, token_count (n,), captions (n,)."""
    parts, offset = [], 0
    for index, record in store.finished("prompts").items():
        lo, hi = max(start - offset, 0), min(stop - offset, record["count"])
        if lo < hi:
            parts.append(store.read("prompts", index, ("text_emb", "token_count", "captions"), lo, hi))
        offset += record["count"]
    if not parts:
        raise IndexError(f"prompts [{start}, {stop}) are not in the bank")
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
