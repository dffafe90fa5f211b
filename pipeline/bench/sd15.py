"""`sdit bench sd15`: every stage at Stable Diffusion 1.5's real size, and the student's sampling speed against
the teacher's.

SD 1.5's weights cannot be downloaded here, but its architecture can be built: the teacher stage builds it with
seeded random weights once per user, in both layouts (`pipeline.bench.sd15_teacher`), so both loading paths run at
full size. Random weights cost what trained ones do; their outputs mean nothing but must be finite.

Then, on photographs at 512 px (`photographs`), each stage runs in a child process of its own, so its peak RSS is
its own (`pipeline.bench.sd15_stages`):

    encode           the single file: 4x64x64 latents, 77x768 text
    teacher-label    the diffusers folder (the store's teacher hashes must match): K draws, perturbations on,
                     plus `--synthesize` of the prompt bank
    train            `init` + `train` of each student, with and without gradient checkpointing
    sample           the first run, with and without guidance
    eval             the first run against held-out draws
    speed            images/s of each student's pipeline against the teacher's (same scheduler, steps, guidance,
                     batch and noise): text encoder, denoising loop and VAE decode timed apart

    precision        fp16 and bf16 paths against fp32 (`pipeline.bench.sd15_precision`)
    throughput       labels/s and steps/s at real batch sizes (`pipeline.bench.sd15_throughput`)

For each stage: wall time (of the stage function, loading included), peak RSS, FLOPs per unit of work
(`sdit.flops.unit_flops`: a VAE encode, a UNet forward, ...) times the units the stage ran, and so GFLOP/s
against a 2048³ fp32 matmul measured in the same run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline.bench.config import Sd15Config
from sdit.errors import SDiTError
from sdit.files import check_folder

CAPTIONS = ("a black and white portrait photograph of a woman in uniform",
            "an old photograph of a smiling officer", "a close-up portrait of a person with short hair",
            "a vintage studio photograph", "a portrait photo, soft light, dark background")
PROMPT_BANK = ("a photograph of an astronaut riding a horse", "a red sports car parked by the sea",
               "a bowl of fruit on a wooden table", "a lighthouse at sunset")
STAGES = ("teacher", "encode", "teacher-label", "train", "sample", "eval", "speed")


# --- photographs -----------------------------------------------------------------------------------------------


def photographs(folder: Path, n: int, resolution: int) -> Path:
    """n captioned photographs: views of the one photograph installed with matplotlib (Grace Hopper, public
    domain, 512x600), each a different crop, zoom, mirror and exposure, saved as JPEG at least `resolution`
    px on the short side so that encode resizes down as with real data."""
    import matplotlib
    from PIL import Image, ImageEnhance, ImageOps

    source = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not source.exists():
        raise SDiTError(f"{source} is missing: matplotlib's sample photograph ships with it (pip install matplotlib)")
    photo = Image.open(source).convert("RGB")
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    w, h = photo.size
    for i in range(n):
        side = int(min(w, h) * rng.uniform(0.6, 1.0))
        x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        view = photo.crop((x0, y0, x0 + side, y0 + side)).resize((max(resolution, side),) * 2, Image.BICUBIC)
        if i % 2:
            view = ImageOps.mirror(view)
        view = ImageEnhance.Brightness(view).enhance(float(rng.uniform(0.8, 1.2)))
        view.save(folder / f"{i:04d}.jpg", quality=92)
        (folder / f"{i:04d}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])
    return folder


# --- the bench -------------------------------------------------------------------------------------------------


def bench_sd15(config: Sd15Config, on_stage=None) -> dict:
    """Every stage at full size in child processes, then the side-by-side sampling speed. `on_stage(name)` is
    called as each starts. Returns {"stages": [...], "speed": {...}, "matmul_gflops", "flops", "config"}."""
    import torch

    from pipeline.bench import matmul_gflops
    from sdit.flops import unit_flops

    config.check()
    on_stage = on_stage or (lambda name: None)
    out = check_folder(config.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = config.threads or os.cpu_count()
    torch.set_num_threads(threads)
    from sdit.devices import resolve_device

    matmul = matmul_gflops(resolve_device(config.device))
    presets = tuple(dict.fromkeys((*config.students, *config.speed_students)))
    flops = unit_flops(config.config_dir, config.resolution, presets)
    base = {"config": asdict(config), "threads": threads, "cache": config.cache,
            "teacher_config": config.teacher_config}
    stages = []

    def run(stage: str, name: str, **args) -> dict:
        on_stage(name)
        result = _child(stage, base | args)
        result["stage"] = name
        result["gflop"] = stage_flops(stage, result, flops, config) / 1e9
        result["gflops"] = result["gflop"] / result["seconds"] if result["seconds"] else None
        result["of_matmul"] = result["gflops"] / matmul if result["gflops"] else None
        stages.append(result)
        return result

    teacher = run("teacher", "teacher (build or load the cache)")["outputs"]
    base |= {"folder": teacher["folder"], "single_file": teacher["single_file"],
             "photos": str(photographs(out / "photos", config.records, config.resolution)),
             "prompts_file": str(_prompt_bank(out / "prompts.txt", config.prompts)), "store": str(out / "store")}
    run("encode", f"encode {config.records} photographs (single file)")
    run("label", f"teacher-label {config.draws} draws + synthesize {config.synthesize} (diffusers folder)")
    runs = {}
    for preset in config.students:
        for checkpointing in config.checkpointing:
            tag = f"{preset.replace('/', '-')}{'-ckpt' if checkpointing else ''}"
            name = f"init + train {preset}{' +ckpt' if checkpointing else ''}"
            run("train", name, preset=preset, run_dir=str(out / "runs" / tag), checkpointing=checkpointing,
                grid=False)
            runs.setdefault(preset, str(out / "runs" / tag))
    first = runs[config.students[0]]
    for guidance in config.sample_guidance:
        run("sample", f"sample {config.students[0]} {'guided' if guidance != 1 else 'unguided'}", run_dir=first,
            guidance=guidance, preset=config.students[0], samples=str(out / f"samples-w{guidance:g}"))
    if config.eval:
        run("eval", f"eval {config.students[0]}", run_dir=first, preset=config.students[0])
    speed_runs = {p: runs.get(p) or str(out / "runs" / f"speed-{p.replace('/', '-')}") for p in config.speed_students}
    speed = run("speed", "speed: students against the teacher", speed_runs=speed_runs) if speed_runs else None
    precision = run("precision", "precision: fp16/bf16 paths against fp32")["outputs"] if config.precision else None
    rates = run("throughput", "throughput at real batch sizes")["outputs"] if config.throughput_presets else None
    return {"stages": stages, "speed": speed and speed["outputs"], "precision": precision, "throughput": rates,
            "matmul_gflops": matmul, "flops": flops,
            "device": config.device, "config": asdict(config)}


def stage_flops(stage: str, result: dict, flops: dict, config: Sd15Config) -> float:
    """The counted FLOPs of the work a stage reported doing."""
    o = result["outputs"]
    if stage == "encode":
        return o["records"] * flops["vae_encode"] + o["texts"] * flops["text_encoder"]
    if stage == "label":
        return o["teacher_forwards"] * flops["unet"]
    if stage == "train":
        forwards = 4 if o["checkpointing"] else 3  # backward = 2 forwards; checkpointing recomputes one
        grid = o["grid_images"] * (o["grid_steps"] * 2 * flops[o["preset"]] + flops["vae_decode"])
        return o["steps"] * o["batch_size"] * forwards * flops[o["preset"]] + grid
    if stage == "sample":
        per_step = (2 if o["guidance"] != 1 else 1) * flops[o["preset"]]
        return o["images"] * (o["steps"] * per_step + flops["vae_decode"])
    if stage == "eval":
        return o["draws"] * flops[o["preset"]]
    if stage in ("precision", "throughput"):
        return 0.0  # not a throughput figure
    if stage == "speed":
        n, steps = o["images"], o["steps"]
        guided = 2 if o["guidance"] != 1 else 1
        models = [flops["unet"]] + [flops[p] for p in o["students"]]
        return sum(n * steps * guided * f for f in models) + n * flops["vae_decode"]
    return 0.0


def format_sd15_table(result: dict) -> str:
    c = result["config"]
    lines = [f"SD 1.5-shaped teacher (random weights) at {c['resolution']} px on {result['device']}; fp32 matmul "
             f"ceiling {result['matmul_gflops']:.1f} GFLOP/s",
             f"{'stage':<58}{'seconds':>9}{'peak RSS':>11}{'GFLOP':>10}{'GFLOP/s':>9}{'of matmul':>10}  outputs"]
    for s in result["stages"]:
        rate = f"{s['gflops']:>9.1f}{s['of_matmul']:>10.2f}" if s["gflops"] else f"{'-':>9}{'-':>10}"
        lines.append(f"{s['stage']:<58}{s['seconds']:>9.1f}{s['peak_rss_mb']:>8.0f} MB{s['gflop']:>10.0f}{rate}  "
                     f"{describe_outputs(s['outputs'])}")
    sp = result["speed"] or {"models": {}}
    lines += [] if not result["speed"] else [
        "", f"sampling side by side: {sp['images']} image(s) at {sp['resolution']} px, {sp['steps']} "
              f"{sp['scheduler']} steps, guidance {sp['guidance']:g}; text encoder {sp['text_seconds']:.2f} s and "
              f"VAE decode {sp['decode_seconds']:.1f} s, the same for every model",
              f"{'model':<12}{'s/step':>9}{'attention':>11}{'images/s':>11}{'vs SD 1.5':>11}{'loop vs SD 1.5':>16}"
              f"{'images/s at ' + str(sp['project_steps']) + ' steps':>24}{'vs SD 1.5':>11}"]
    for name, m in sp["models"].items():
        share = f"{m['attention_share']:>10.0%}" if m["attention_share"] is not None else f"{'-':>10}"
        lines.append(f"{name:<12}{m['step_seconds']:>9.2f}{share} {m['images_per_s']:>11.4f}"
                     f"{m['speedup']:>10.2f}x{m['loop_speedup']:>15.2f}x{m['projected_images_per_s']:>24.4f}"
                     f"{m['projected_speedup']:>10.2f}x")
    if result.get("precision"):
        lines += ["", f"{'precision path':<44}{'rel. error':>11}{'tolerance':>10}{'fp32 s':>9}{'low s':>9}  finite"]
        for name, p in result["precision"]["paths"].items():
            lines.append(f"{name:<44}{p['relative_error']:>11.2e}{p['tolerance']:>10.0e}{p['fp32_seconds']:>9.2f}"
                         f"{p['low_seconds']:>9.2f}  {'yes' if p['finite'] else 'NO'}"
                         f"{'' if p['ok'] else '  OUT OF TOLERANCE'}")
    if result.get("throughput"):
        from pipeline.bench.sd15_throughput import format_throughput_table

        lines += ["", format_throughput_table(result["throughput"])]
    return "\n".join(lines)


def describe_outputs(o: dict) -> str:
    """What a stage wrote, in a few words: shapes, and whether every value is finite."""
    def arr(name: str, a: dict) -> str:
        return f"{name} {'x'.join(map(str, a['shape']))} {a['dtype']}{'' if a['finite'] else ' NOT FINITE'}"

    if "single_file" in o:
        return f"diffusers folder {o['folder_gb']:.2f} GB, single file {o['single_file_gb']:.2f} GB"
    if "latents" in o and "text_emb" in o:
        return f"{arr('latents', o['latents'])}, {arr('text', o['text_emb'])}"
    if "eps_teacher" in o:
        parts = [arr("eps_T", o["eps_teacher"]), f"{o['teacher_forwards']} UNet forwards", f"{o['dropped']} dropped"]
        if "synthetic" in o:
            parts.append(arr("synthetic latents", o["synthetic"]["latents"]))
        return ", ".join(parts)
    if "losses" in o:
        return (f"{o['steps']} steps at batch {o['batch_size']}: {o['steps_per_s']:.3f} steps/s, losses "
                f"{', '.join(f'{v:.3f}' for v in o['losses'])}{'' if o['finite'] else ' NOT FINITE'}")
    if "image_shape" in o and "models" not in o:
        return f"image {'x'.join(map(str, o['image_shape']))}, pixel std {o['image_std']:.1f}"
    if "mse" in o:
        return f"MSE to the teacher {o['mse']:.4f} on {o['draws']} held-out draws"
    if "models" in o:
        return f"images {'x'.join(map(str, o['image_shape']))}"
    return ""


def _prompt_bank(path: Path, n: int) -> Path:
    path.write_text("".join(PROMPT_BANK[i % len(PROMPT_BANK)] + "\n" for i in range(n)))
    return path


def _child(stage: str, args: dict) -> dict:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.bench.sd15_stages", stage, json.dumps(args)],
                          capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[2])
    if proc.returncode:
        lines = proc.stderr.strip().splitlines()
        raise SDiTError(f"bench sd15: the {stage} stage failed: {lines[-1] if lines else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
