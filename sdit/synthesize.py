"""Synthetic records: the teacher's own samples for the text-only prompt bank, drawn reproducibly.

A text-only prompt has no image, and pairing it with another image's noisy latent teaches the student to
ignore captions (sdit.perturb draws caption swaps at high noise only). A synthetic record gives the prompt a latent
of its own: a sample of the teacher with its own scheduler and classifier-free guidance. It is then labelled like a
real record, and its true noise is a valid target (the latent is a sample of the teacher's distribution for that
caption).

A trajectory set (`--synth-trajectory`) stops each sample after K steps of DDIM (K: the labels' draws per record)
and keeps the states it visited: record r's draw d is the teacher asked at state d, at timestep
`trajectory_timesteps[d]`, with its own caption (`Kind.TRAJECTORY`). No finished image is made, and a draw costs
about three teacher forwards (two for the guided step, one for the label) instead of a whole sample. A state x_d
is stored so that both stages rebuild it with the one formula every draw uses, x_t = √ᾱ_t·latent + √(1 − ᾱ_t)·ε:
the record's latent is the sampler's last x̂_0 and state d's ε is (x_d − √ᾱ_d·x̂_0)/√(1 − ᾱ_d), both fp16
(the `states` column). That ε is no true noise: trajectory draws train on the teacher's ε alone.

Randomness comes from explicit generators, as everywhere in stage one (invariant 2):

    initial noise of sample s of prompt p:      (seed, p, s, NOISE_STREAM)             whatever the shard or batch
    label draw d of record r of synthetic shard k: (seed, k, r, d, SYNTHETIC_STREAM)   never a records shard's draw

The stage runs in three parts (`sdit teacher-label --synthesize N`, pipeline.label, on the labelling workers):

    plan_synthesis (driver)    the set's manifest: resume a set made with the same options, refuse another in one line
    ShardSynthesizer (worker)  shard k: prompts [k·P, (k+1)·P) × N samples, each from its own initial noise, through
                               the teacher's scheduler with classifier-free guidance; non-finite samples are dropped
                               and counted; the shard is written whole (arrays, then its completion record)
    finish_synthesis (driver)  counts and teacher forwards in synthetic/manifest.json, status "complete"

Synthetic shard k holds prompts [k·P, (k+1)·P) of the bank, `samples` each, in (prompt, sample) order, less the
samples whose latents were not finite; P = `prompts_per_shard(shard_size, samples)` keeps a synthetic shard
about as large as a records shard.
"""

from __future__ import annotations

import dataclasses
import itertools
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import diffusers
import numpy as np
import torch

import sdit
from sdit import sampling
from sdit.config import SynthesisConfig
from sdit.diffusion import NoiseSchedule
from sdit.errors import SDiTError
from sdit.store import Store, from_versioned, resume_value, write_shard

if TYPE_CHECKING:
    from sdit.teacher import Teacher  # a type only: stage two reads synthetic records without the teacher

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
    trajectory_timesteps: list[int] = field(default_factory=list)  # a trajectory set's: the timestep of each state
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


def forwards_per_sample(scheduler, steps: int, guided: bool, stop_after: int = 0) -> int:
    """Teacher UNet forwards one sample costs: one per scheduler timestep (PNDM takes steps + 1), or per step up
    to `stop_after` (a trajectory), twice with guidance (the conditional and the unconditional branch)."""
    scheduler.set_timesteps(steps)
    return (stop_after or len(scheduler.timesteps)) * (2 if guided else 1)


def trajectory_timesteps(scheduler, steps: int, stop_after: int) -> list[int]:
    """The timestep of the state DDIM reaches after each of its first `stop_after` steps (DDIM steps from t to
    t − T // steps)."""
    scheduler.set_timesteps(steps)
    stride = scheduler.config.num_train_timesteps // steps
    return [int(t) - stride for t in scheduler.timesteps[:stop_after]]


def sampler_name(config: SynthesisConfig) -> str | None:
    """The sampler a set is made with: DDIM for trajectories (its states rebuild from x̂_0 and ε)."""
    return "ddim" if config.trajectory else config.scheduler


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


# --- the worker ---------------------------------------------------------------------------------------------

class ShardSynthesizer:
    """Holds the teacher's UNet; turns prompts [k·P, (k+1)·P) of the bank into synthetic shard k."""

    def __init__(self, store: Store, config: SynthesisConfig, teacher: Teacher, device: torch.device,
                 dtype: torch.dtype, batch_size: int):
        self.store, self.config, self.batch_size = store, config, batch_size
        self.unet, self.scheduler_config = teacher.unet, teacher.scheduler_config
        self.device, self.dtype = device, dtype
        manifest = store.manifest()
        self.shape = tuple(manifest.latent_shape)
        self.per_shard = prompts_per_shard(manifest.shard_size, config.samples)
        self.num_prompts = sum(r["count"] for r in store.finished("prompts").values())
        self.null = store.null_embedding()
        # A trajectory set's: the timestep of each state (as its manifest says), and its (1, K, 1, 1, 1) coefficients
        self.state_timesteps = trajectory_timesteps(make_sampler(self.scheduler_config, "ddim"), config.steps,
                                                    config.trajectory) if config.trajectory else []
        self.state_coefficients = tuple(v.view(1, -1, 1, 1, 1) for v in NoiseSchedule.from_config(
            self.scheduler_config).coefficients(self.state_timesteps))

    @torch.inference_mode()
    def sample(self, noise: torch.Tensor, text: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None, int]:
        """From initial noise (B, C, h, w) and text (B, L, D) fp16: latents (B, C, h, w) fp16, a trajectory set's
        states (B, K, C, h, w) fp16 (else None), and the teacher forwards they took (one per row of each UNet call)."""
        forwards: list[int] = []
        c = self.config
        text = text.to(self.device)
        null = torch.as_tensor(self.null).to(self.device).expand_as(text) if c.guided else None
        scheduler = make_sampler(self.scheduler_config, sampler_name(c))  # fresh per batch: schedulers keep state
        steps = sampling.denoising_steps(sampling.teacher_eps(self.unet, forwards.append), scheduler,
                                         noise.to(self.device), text, null, c.steps, c.guidance)
        if not c.trajectory:
            *_, last = steps
            return last.prev_sample.float().cpu().to(torch.float16).numpy(), None, sum(forwards)
        outs = list(itertools.islice(steps, c.trajectory))
        x0 = outs[-1].pred_original_sample.float().cpu().to(torch.float16)  # the latent the states rebuild from
        signal, sigma = self.state_coefficients
        x = torch.stack([o.prev_sample.float().cpu() for o in outs], dim=1)  # (B, K, C, h, w)
        eps = (x - signal * x0.float().unsqueeze(1)) / sigma
        return x0.numpy(), eps.to(torch.float16).numpy(), sum(forwards)

    def __call__(self, shard: int) -> dict:
        c, start = self.config, shard * self.per_shard
        stop = min(start + self.per_shard, self.num_prompts)
        prompts = read_prompts(self.store, start, stop)
        prompt = np.repeat(np.arange(start, stop), c.samples)  # (n,) in (prompt, sample) order
        sample = np.tile(np.arange(c.samples), stop - start)
        n = len(prompt)
        latents, keep, forwards = np.zeros((n, *self.shape), np.float16), np.zeros(n, bool), 0
        states = np.zeros((n, c.trajectory, *self.shape), np.float16) if c.trajectory else None
        for b in range(0, n, self.batch_size):
            rows = slice(b, b + self.batch_size)
            noise = initial_noise(c.seed, prompt[rows], sample[rows], self.shape)
            out, visited, used = self.sample(noise, torch.as_tensor(prompts["text_emb"][prompt[rows] - start]))
            finite = _finite(out) & (_finite(visited) if visited is not None else True)  # fp16 overflow too
            latents[rows], keep[rows] = np.where(finite[:, None, None, None], out, 0), finite
            if visited is not None:
                states[rows] = np.where(finite[:, None, None, None, None], visited, 0)
            forwards += used
        local = prompt[keep] - start
        columns = {
            "latents": latents[keep], "text_emb": prompts["text_emb"][local],
            "token_count": prompts["token_count"][local], "captions": prompts["captions"][local],
            "ids": np.array([f"synth-{p}-{s}" for p, s in zip(prompt[keep], sample[keep])], dtype=str),
            "positions": (prompt * c.samples + sample)[keep].astype(np.int64),
            "prompt_index": prompt[keep].astype(np.int64), "sample": sample[keep].astype(np.int32),
        } | ({"states": states[keep]} if states is not None else {})
        record = {"samples": n, "dropped": int(n - keep.sum()), "teacher_forwards": forwards, "prompts": [start, stop]}
        write_shard(self.store, SYNTHETIC, shard, columns, record)
        return {"index": shard, "count": int(keep.sum()), **record}


def _finite(values: np.ndarray) -> np.ndarray:
    """(B,) whether every value of each row is finite."""
    return np.isfinite(values).reshape(len(values), -1).all(axis=1)


# --- the set's manifest ------------------------------------------------------------------------------------------

# What must match (as `resume_value` compares it) for a rerun to resume a synthetic set rather than refuse it.
_RESUME_KEYS = ("teacher", "config", "scheduler", "prompts", "prompts_per_shard")


def plan_synthesis(store: Store, config: SynthesisConfig, teacher: Teacher) -> SyntheticManifest:
    """The synthetic set's manifest for `config`: the store's own when it was made with the same options (a
    resume), else a new one. Refuses, in one line and before any work, a store without a prompt bank, a
    stochastic scheduler, or a set made with other options. Writes nothing."""
    config.check()
    manifest = store.manifest()
    prompts = sum(r["count"] for r in store.finished("prompts").values())
    if not prompts:
        raise SDiTError(f"--synthesize needs a text-only prompt bank, and {store.url} has none; encode the store "
                        "with `sdit encode ... --prompt-bank FILE`")
    sampler = make_sampler(teacher.scheduler_config, sampler_name(config))
    per_shard = prompts_per_shard(manifest.shard_size, config.samples)
    meta = SyntheticManifest(
        set_id=secrets.token_hex(8), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        store_created=manifest.created, teacher=teacher.identity.to_json(), config=dataclasses.asdict(config),
        scheduler={"class": type(sampler).__name__, "config": teacher.scheduler_config}, prompts=prompts,
        prompts_per_shard=per_shard, shards=-(-prompts // per_shard),
        forwards_per_sample=forwards_per_sample(sampler, config.steps, config.guided, config.trajectory),
        latent_scale=manifest.latent_scale, sdit_version=sdit.__version__,
        trajectory_timesteps=trajectory_timesteps(sampler, config.steps, config.trajectory))
    old = read_synthetic(store)
    if old is None or old.store_created != manifest.created:
        return meta  # none yet, or made for an earlier encoding of this store (re-encoded with --overwrite)
    for key in _RESUME_KEYS:
        if resume_value(old, key) != resume_value(meta, key):
            differs = _difference(key, getattr(old, key), getattr(meta, key))
            raise SDiTError(f"the store's synthetic records were made with {differs}; pass the same --synthesize/"
                            f"--synth-* options, or delete {store.url}/{SYNTHETIC} and {store.url}/_done/{SYNTHETIC} "
                            "to make new ones (then relabel what used them)")
    return old


def prepare_synthesis(store: Store, meta: SyntheticManifest) -> list[int]:
    """Replace another set, delete unfinished shards, write the manifest; the shards still to make."""
    old = read_synthetic(store)
    if old is not None and old.set_id != meta.set_id:
        store.remove(SYNTHETIC)
        store.remove("_done", SYNTHETIC)
    store.root_group(mode="a").require_group(SYNTHETIC)
    store.remove_unfinished(SYNTHETIC)
    write_synthetic(store, meta)
    done = store.finished(SYNTHETIC)
    return [k for k in range(meta.shards) if k not in done]


def finish_synthesis(store: Store, meta: SyntheticManifest) -> SyntheticManifest:
    """Counts over the finished shards, every one of them: status "complete". Returns the manifest."""
    done = store.all_finished(SYNTHETIC, range(meta.shards))
    counts = {"samples": sum(r["count"] for r in done.values()), "dropped": sum(r["dropped"] for r in done.values()),
              "planned": meta.prompts * meta.config["samples"], "shards": len(done),
              "teacher_forwards": sum(r["teacher_forwards"] for r in done.values())}
    meta = dataclasses.replace(meta, counts=counts, status="complete")
    write_synthetic(store, meta)
    return meta


def _difference(key: str, old, new) -> str:
    if isinstance(new, dict):
        old = old or {}
    if key == "teacher":
        parts = [part for part, digest in new["hashes"].items() if old.get("hashes", {}).get(part) != digest]
        return f"another teacher ({old.get('path')}: other {' and '.join(parts) or 'weights'} weights)"
    if key == "config":
        return ", ".join(f"{k} {old.get(k)} (now {new[k]})" for k in new if old.get(k) != new[k])
    if key == "scheduler":
        same = old.get("class") == new["class"]
        return "another scheduler config" if same else f"the scheduler {old.get('class')} (now {new['class']})"
    return f"{key.replace('_', ' ')} {old} (now {new})"
