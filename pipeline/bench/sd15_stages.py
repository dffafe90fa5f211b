"""One stage of `sdit bench sd15`, run in a child process of its own so that its peak RSS is its own:
`python -m pipeline.bench.sd15_stages STAGE ARGS` prints one JSON line (wall seconds, peak RSS, what it made)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.bench.config import Sd15Config
from pipeline.bench.sd15 import PROMPT_BANK
from pipeline.bench.sd15_precision import precision_paths
from pipeline.bench.sd15_speed import sampling_speed
from pipeline.bench.sd15_teacher import random_teacher
from pipeline.bench.sd15_throughput import throughput
from pipeline.bench.timing import compute_clock
from sdit.config import vae_factor


def _run_stage(stage: str, a: dict) -> dict:
    import torch

    torch.set_num_threads(a["threads"])
    started = time.perf_counter()
    outputs = STAGE_FUNCTIONS[stage](a, Sd15Config(**{k: tuple(v) if isinstance(v, list) else v
                                                      for k, v in a["config"].items()}))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "outputs": outputs}


def _stage_teacher(a: dict, c: Sd15Config) -> dict:
    made = random_teacher(c.config_dir, a["cache"], c.seed)
    size = sum(f.stat().st_size for f in made.folder.rglob("*") if f.is_file())
    return {"folder": str(made.folder), "single_file": str(made.single_file),
            "folder_gb": size / 1e9, "single_file_gb": made.single_file.stat().st_size / 1e9}


def _stage_encode(a: dict, c: Sd15Config) -> dict:
    from pipeline.encode import EncodeConfig, encode

    with compute_clock(_device(c)) as clock:
        summary = encode(EncodeConfig(source=a["photos"], teacher=a["single_file"], teacher_config=a["teacher_config"],
                                      out=a["store"], prompts=a["prompts_file"], resolution=c.resolution,
                                      batch_size=min(c.records, 32), device=c.device, dtype=c.dtype, overwrite=True,
                                      threads=a["threads"]))
    outputs = _store_outputs(a["store"], "records", ("latents", "text_emb"))
    return outputs | {"records": summary.records, "texts": summary.records + c.prompts + 1,
                      "compute_seconds": clock.seconds}


def _stage_label(a: dict, c: Sd15Config) -> dict:
    from pipeline.label import LabelConfig, label
    from sdit.config import SynthesisConfig

    synthesis = SynthesisConfig(samples=c.synthesize, steps=c.synth_steps, scheduler=c.synth_scheduler,
                                guidance=c.guidance) if c.synthesize else None
    with compute_clock(_device(c)) as clock:
        counts = label(LabelConfig(store=a["store"], teacher=a["folder"], draws=c.draws,
                                   batch_size=min(c.records, c.label_batch), device=c.device, dtype=c.dtype,
                                   synthesis=synthesis, overwrite=True, threads=a["threads"]))
    outputs = _store_outputs(a["store"], "labels/default", ("eps_teacher", "noise"))
    if c.synthesize:
        outputs["synthetic"] = _store_outputs(a["store"], "synthetic", ("latents",))
    kinds = counts["kinds"]
    return outputs | {"draws": counts["draws"], "kinds": kinds, "dropped": counts["dropped"],
                      "teacher_forwards": counts["teacher_forwards"]["total"],
                      "bytes_per_draw": counts["bytes_per_draw"], "compute_seconds": clock.seconds}


def _stage_train(a: dict, c: Sd15Config) -> dict:
    from pipeline.init import init_for_store
    from pipeline.train import TrainConfig, train

    shutil.rmtree(a["run_dir"], ignore_errors=True)
    timings = {}

    def make_run():
        t0 = time.perf_counter()
        made = init_for_store(a["store"], "default", a["run_dir"], a["preset"], teacher=a["folder"])
        timings["init_seconds"] = time.perf_counter() - t0
        return made

    grid = 1 if a["grid"] else 0
    summary = train(TrainConfig(store=a["store"], out=a["run_dir"], steps=c.train_steps, batch_size=c.batch_size,
                                holdout=0.25, gradient_checkpointing=a["checkpointing"], checkpoint_every=c.train_steps,
                                sample_prompts=grid, sample_steps=1, device=c.device, threads=a["threads"]),
                    make_run=make_run)
    metrics = [json.loads(line) for line in (Path(a["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    # each step's own seconds, as the trainer logs them: checkpoints, sample grids and evaluations left out
    step_seconds = sum(c.batch_size / m["samples_per_s"] for m in metrics)
    return timings | {"preset": a["preset"], "checkpointing": a["checkpointing"], "steps": summary["steps"],
                      "batch_size": c.batch_size, "train_seconds": summary["seconds"],
                      "steps_per_s": summary["steps"] / step_seconds, "losses": [m["loss"] for m in metrics],
                      "finite": all(np.isfinite(m["loss"]) for m in metrics), "grid_images": grid, "grid_steps": 1,
                      "compute_seconds": step_seconds}


def _stage_sample(a: dict, c: Sd15Config) -> dict:
    from PIL import Image

    from pipeline.sample import SampleConfig, sample

    with compute_clock(_device(c)) as clock:
        summary = sample(SampleConfig(run=a["run_dir"], out=a["samples"], prompts=(PROMPT_BANK[0],), num_images=1,
                                      height=c.resolution, width=c.resolution, steps=c.sample_steps,
                                      guidance=a["guidance"], scheduler=c.scheduler, batch_size=1, device=c.device,
                                      dtype=c.dtype))
    image = np.asarray(Image.open(next(Path(a["samples"], "student").glob("*.png"))))
    return {"preset": a["preset"], "images": summary.images, "steps": c.sample_steps, "guidance": a["guidance"],
            "image_shape": list(image.shape), "image_std": float(image.std()), "compute_seconds": clock.seconds}


def _stage_eval(a: dict, c: Sd15Config) -> dict:
    from pipeline.evaluate import EvalConfig, evaluate

    with compute_clock(_device(c)) as clock:
        result = evaluate(EvalConfig(run=a["run_dir"], store=a["store"], device=c.device))
    agreement = result["teacher_agreement"]
    return {"preset": a["preset"], "draws": agreement["draws"], "mse": agreement["mse"],
            "finite": agreement["mse"] is not None and bool(np.isfinite(agreement["mse"])),
            "compute_seconds": clock.seconds}


def _stage_speed(a: dict, c: Sd15Config) -> dict:
    return sampling_speed(a["folder"], a["speed_runs"], c)


def _stage_throughput(a: dict, c: Sd15Config) -> dict:
    return throughput(a["folder"], Path(c.config_dir), c.throughput_presets, c.throughput_resolutions,
                      c.label_batch, {r: b for r, b in zip(c.throughput_resolutions, c.train_batches)},
                      c.throughput_steps, c.device)


def _stage_precision(a: dict, c: Sd15Config) -> dict:
    factor, _ = vae_factor(Path(c.config_dir))
    latent = c.resolution // factor
    return {"paths": precision_paths(a["folder"], Path(c.config_dir), c.students, latent, c.fp16_latent)}


def _device(c: Sd15Config):
    from sdit.devices import resolve_device

    return resolve_device(c.device)


def _store_outputs(store: str, group: str, arrays: tuple[str, ...]) -> dict:
    import zarr

    root = zarr.open_group(store, mode="r")
    shard = root[group]["00000"]
    out = {}
    for name in arrays:
        values = shard[name][:]
        if name in ("eps_teacher", "noise"):
            values = values[shard["valid"][:]]
        out[name] = {"shape": list(shard[name].shape), "dtype": str(shard[name].dtype),
                     "finite": bool(np.isfinite(values.astype(np.float32)).all())}
    return out


STAGE_FUNCTIONS = {"teacher": _stage_teacher, "encode": _stage_encode, "label": _stage_label,
                   "train": _stage_train, "sample": _stage_sample, "eval": _stage_eval, "speed": _stage_speed,
                   "precision": _stage_precision, "throughput": _stage_throughput}


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(_run_stage(sys.argv[1], json.loads(sys.argv[2]))))
