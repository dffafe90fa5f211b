"""Stage one, part 3: the teacher's samples for the text-only prompt bank, as synthetic records.

    plan (driver)        the set's manifest: resume a set made with the same options, refuse another in one line
    synthesize (worker)  shard k: prompts [k·P, (k+1)·P) × N samples, each from its own initial noise, through the
                         teacher's scheduler with classifier-free guidance; non-finite samples are dropped and
                         counted; the shard is written whole (arrays, then its completion record)
    finish (driver)      counts and teacher forwards in synthetic/manifest.json, status "complete"

`sdit teacher-label --synthesize N` runs it before labelling, on the same workers (pipeline.label); the
synthetic records are then labelled like real ones, into labels/<name>/synthetic/. `inspect_store` decodes
records or synthetic records to PNGs and a captioned grid (`sdit inspect`), to look at what the student
will learn from.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import sdit
from pipeline.config import InspectConfig
from sdit import sampling
from sdit.config import SynthesisConfig
from sdit.errors import SDiTError
from sdit.files import check_folder, replacing
from sdit.store import Manifest, Store, write_shard
from sdit.synthesize import (
    SYNTHETIC,
    SyntheticManifest,
    forwards_per_sample,
    initial_noise,
    make_sampler,
    prompts_per_shard,
    read_prompts,
    read_synthetic,
    write_synthetic,
)
from sdit.teacher import Teacher


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

    @torch.inference_mode()
    def sample(self, noise: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Latents (B, C, h, w) float32 on the CPU from initial noise (B, C, h, w) and text (B, L, D) fp16, and
        the teacher forwards they took (one per row of each UNet call)."""
        forwards: list[int] = []
        c = self.config
        text = text.to(self.device)
        null = torch.as_tensor(self.null).to(self.device).expand_as(text) if c.guided else None
        scheduler = make_sampler(self.scheduler_config, c.scheduler)  # fresh per batch: schedulers keep state
        latents = sampling.denoise(sampling.teacher_eps(self.unet, forwards.append), scheduler, noise.to(self.device),
                                   text, null, c.steps, c.guidance)
        return latents.float().cpu(), sum(forwards)

    def __call__(self, shard: int) -> dict:
        c, start = self.config, shard * self.per_shard
        stop = min(start + self.per_shard, self.num_prompts)
        prompts = read_prompts(self.store, start, stop)
        prompt = np.repeat(np.arange(start, stop), c.samples)  # (n,) in (prompt, sample) order
        sample = np.tile(np.arange(c.samples), stop - start)
        n = len(prompt)
        latents, keep, forwards = np.zeros((n, *self.shape), np.float16), np.zeros(n, bool), 0
        for b in range(0, n, self.batch_size):
            rows = slice(b, b + self.batch_size)
            noise = initial_noise(c.seed, prompt[rows], sample[rows], self.shape)
            out, used = self.sample(noise, torch.as_tensor(prompts["text_emb"][prompt[rows] - start]))
            out16 = out.to(torch.float16).numpy()  # fp16 overflow is as unusable as a NaN
            finite = np.isfinite(out16).reshape(len(out16), -1).all(axis=1)
            latents[rows], keep[rows] = np.where(finite[:, None, None, None], out16, 0), finite
            forwards += used
        local = prompt[keep] - start
        columns = {
            "latents": latents[keep], "text_emb": prompts["text_emb"][local],
            "token_count": prompts["token_count"][local], "captions": prompts["captions"][local],
            "ids": np.array([f"synth-{p}-{s}" for p, s in zip(prompt[keep], sample[keep])], dtype=str),
            "positions": (prompt * c.samples + sample)[keep].astype(np.int64),
            "prompt_index": prompt[keep].astype(np.int64), "sample": sample[keep].astype(np.int32),
        }
        record = {"samples": n, "dropped": int(n - keep.sum()), "teacher_forwards": forwards, "prompts": [start, stop]}
        write_shard(self.store, SYNTHETIC, shard, columns, record)
        return {"index": shard, "count": int(keep.sum()), **record}


# --- the set's manifest ------------------------------------------------------------------------------------------

# What must match for a rerun to resume a synthetic set rather than refuse it.
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
    sampler = make_sampler(teacher.scheduler_config, config.scheduler)
    per_shard = prompts_per_shard(manifest.shard_size, config.samples)
    meta = SyntheticManifest(
        set_id=secrets.token_hex(8), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        store_created=manifest.created, teacher=teacher.identity.to_json(), config=dataclasses.asdict(config),
        scheduler={"class": type(sampler).__name__, "config": teacher.scheduler_config}, prompts=prompts,
        prompts_per_shard=per_shard, shards=-(-prompts // per_shard),
        forwards_per_sample=forwards_per_sample(sampler, config.steps, config.guided),
        latent_scale=manifest.latent_scale, sdit_version=sdit.__version__)
    old = read_synthetic(store)
    if old is None or old.store_created != manifest.created:
        return meta  # none yet, or made for an earlier encoding of this store (re-encoded with --overwrite)
    for key in _RESUME_KEYS:
        if getattr(old, key) != getattr(meta, key):
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
    """Counts over the finished shards; status "complete" once every shard is. Returns the manifest."""
    done = store.finished(SYNTHETIC)
    counts = {"samples": sum(r["count"] for r in done.values()), "dropped": sum(r["dropped"] for r in done.values()),
              "planned": meta.prompts * meta.config["samples"], "shards": len(done),
              "teacher_forwards": sum(r["teacher_forwards"] for r in done.values())}
    meta = dataclasses.replace(meta, counts=counts, status="complete" if len(done) == meta.shards else "in_progress")
    write_synthetic(store, meta)
    return meta


def _difference(key: str, old, new) -> str:
    if isinstance(new, dict):
        old = old or {}
    if key == "teacher":
        return f"another teacher ({old.get('path')}; its UNet hash differs)"
    if key == "config":
        return ", ".join(f"{k} {old.get(k)} (now {new[k]})" for k in new if old.get(k) != new[k])
    if key == "scheduler":
        same = old.get("class") == new["class"]
        return "another scheduler config" if same else f"the scheduler {old.get('class')} (now {new['class']})"
    return f"{key.replace('_', ' ')} {old} (now {new})"


# --- looking at what the student learns from ---------------------------------------------------------------------


def inspect_store(config: InspectConfig, progress: Callable[[int], None] | None = None) -> dict:
    """Decode the first `limit` records (or synthetic records) of a store: OUT/NNNN.png, each with its caption and
    provenance in the PNG text chunk, and OUT/grid.png with captions. Returns {"images", "out", "grid"}."""
    from sdit.devices import resolve_device
    from sdit.images import captioned_grid, save_png

    config.check()
    check_folder(config.out)
    store = Store(config.store)
    manifest = store.manifest()
    group = SYNTHETIC if config.synthetic else "records"
    rows = _first_rows(store, group, config.limit)
    if not rows:
        make = "`sdit teacher-label STORE --teacher T --synthesize N`" if config.synthetic else "`sdit encode`"
        raise SDiTError(f"{store.url} has no finished {group} shards; make them with {make}")
    device = resolve_device(config.device)
    vae = load_vae(config, manifest).to(device)
    provenance = read_synthetic(store) if config.synthetic else None
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    images, captions = [], []
    for start in range(0, len(rows["latents"]), config.batch_size):
        pixels = sampling.decode(vae, torch.as_tensor(rows["latents"][start:start + config.batch_size]).float())
        for i, image in enumerate(pixels, start):
            save_png(image, out / f"{i:04d}.png", _png_text(config, rows, i, provenance))
            images.append(image)
            captions.append(str(rows["captions"][i]) + (f" (sample {rows['sample'][i]})" if config.synthetic else ""))
        if progress:
            progress(len(pixels))
    grid = out / "grid.png"
    with replacing(grid) as tmp:
        captioned_grid({group: images}, captions, config.columns).save(tmp)
    return {"images": len(images), "out": str(out), "grid": str(grid)}


def _first_rows(store: Store, group: str, limit: int) -> dict[str, np.ndarray]:
    names = ["latents", "captions", "ids"] + (["prompt_index", "sample"] if group == SYNTHETIC else [])
    parts, want = [], limit
    for _, shard in store.iter_shards(group):
        if want <= 0:
            break
        take = min(want, shard["latents"].shape[0])
        if take:
            parts.append({name: shard[name][:take] for name in names})
        want -= take
    return {name: np.concatenate([p[name] for p in parts]) for name in names} if parts else {}


def load_vae(config: InspectConfig, manifest: Manifest):
    """The VAE of `config.vae` (a run folder or a teacher; default the store's teacher), refused in one line if it
    is not the one the store's latents were encoded with."""
    from diffusers import AutoencoderKL

    from sdit.run import RUN_FILE, read_run
    from sdit.teacher import load_teacher

    path = Path(config.vae or manifest.teacher["path"])
    if not path.exists():
        raise SDiTError(f"the store's teacher {path} is not on this machine; pass --vae with a teacher or run folder")
    if (path / RUN_FILE).exists():
        vae, vae_hash = AutoencoderKL.from_pretrained(path / "vae"), read_run(path)["teacher"]["hashes"].get("vae")
    else:
        teacher = load_teacher(path, components=("vae",), config_dir=config.teacher_config)
        vae, vae_hash = teacher.vae, teacher.identity.hashes["vae"]
    if vae_hash != manifest.teacher["hashes"].get("vae"):
        raise SDiTError(f"the VAE of {path} is not the one the store was encoded with ({manifest.teacher['path']}); "
                        "pass --vae with that teacher or a run folder made from it")
    return vae.eval().requires_grad_(False)


def _png_text(config: InspectConfig, rows: dict, i: int, provenance: SyntheticManifest | None) -> dict[str, str]:
    text = {"caption": str(rows["captions"][i]), "id": str(rows["ids"][i]), "store": str(config.store),
            "group": SYNTHETIC if config.synthetic else "records", "software": f"sdit {sdit.__version__}"}
    if provenance is not None:
        c = provenance.config
        text |= {"prompt_index": str(rows["prompt_index"][i]), "sample": str(rows["sample"][i]),
                 "seed": str(c["seed"]), "steps": str(c["steps"]), "guidance": str(c["guidance"]),
                 "scheduler": provenance.scheduler["class"], "teacher": provenance.teacher["path"]}
    return text
