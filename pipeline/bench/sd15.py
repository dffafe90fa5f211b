"""`sdit bench sd15`: every stage at Stable Diffusion 1.5's real size, and the students' sampling speed against
the teacher's.

SD 1.5's weights cannot be downloaded here, but its architecture can be built: the teacher stage builds it with
seeded random weights once per user, in both layouts (`pipeline.bench.sd15_teacher`), so both loading paths run at
full size. Random weights cost what trained ones do; their outputs mean nothing but must be finite.

Then, on photographs at 512 px (`photographs`), each chosen stage (`Sd15Config.stages`) runs in a child process of
its own, so its peak RSS is its own (`pipeline.bench.sd15_stages`):

    encode           the single file: 4x64x64 latents, 77x768 text
    label            `teacher-label` with the diffusers folder (the store's teacher hashes must match): K draws,
                     perturbations on, plus `--synthesize` of the prompt bank
    train            `init` + `train` of each student, with and without gradient checkpointing
    sample           the first run, with and without guidance
    eval             the first run against held-out draws
    speed            whole sampling runs of the teacher (guided) and each student, side by side, best of
                     `repeats` alternating rounds after a warm-up (`pipeline.bench.sd15_speed`)
    precision        fp16 and bf16 paths against fp32 (`pipeline.bench.sd15_precision`)
    throughput       labels/s and steps/s at real batch sizes (`pipeline.bench.sd15_throughput`)

For each stage: wall time (of the stage function, loading included), peak RSS, FLOPs per unit of work
(`sdit.flops.unit_flops`: a VAE encode, a UNet forward, ...) times the units the stage ran, and GFLOP/s: those FLOPs
over the stage's compute seconds (the time inside its models' forwards, or its training steps, or its timed
sampling rounds: loading and I/O left out), against a 2048³ fp32 matmul measured at the start and the end of the same
run (the faster of the two).
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
    """The teacher, then each of `config.stages` in a child process. `on_stage(name)` is called as each starts.
    Returns {"stages": [...], "speed", "precision", "throughput" (each None when not run), "matmul_gflops",
    "flops", "device", "config"}."""
    import torch

    from pipeline.bench import matmul_gflops
    from sdit.devices import resolve_device
    from sdit.flops import unit_flops

    config.check()
    on_stage = on_stage or (lambda name: None)
    out = check_folder(config.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = config.threads or os.cpu_count()
    torch.set_num_threads(threads)
    device = resolve_device(config.device)
    matmul = matmul_gflops(device)
    presets = tuple(dict.fromkeys((*config.students, *config.speed_students)))
    flops = unit_flops(config.config_dir, config.resolution, presets)
    base = {"config": asdict(config), "threads": threads, "cache": config.cache,
            "teacher_config": config.teacher_config}
    stages, outputs = [], {}
    wanted = set(config.stages)

    def run(stage: str, name: str, **args) -> dict:
        on_stage(name)
        result = _child(stage, base | args, out)
        result["stage"] = name
        result["gflop"] = stage_flops(stage, result["outputs"], flops) / 1e9
        compute = result["outputs"].get("compute_seconds")
        result["gflops"] = result["gflop"] / compute if result["gflop"] and compute else None
        stages.append(result)
        outputs[stage] = result["outputs"]
        return result

    teacher = run("teacher", "teacher (build or load the cache)")["outputs"]
    base |= {"folder": teacher["folder"], "single_file": teacher["single_file"], "store": str(out / "store")}
    if "encode" in wanted:
        run("encode", f"encode {config.records} photographs (single file)",
            photos=str(photographs(out / "photos", config.records, config.resolution)),
            prompts_file=str(_prompt_bank(out / "prompts.txt", config.prompts)))
    if "label" in wanted:
        run("label", f"teacher-label {config.draws} draws + synthesize {config.synthesize} (diffusers folder)")
    runs = _train(run, config, out) if "train" in wanted else {}
    first = runs.get(config.students[0])
    for guidance in config.sample_guidance if "sample" in wanted else ():
        run("sample", f"sample {config.students[0]} {'guided' if guidance != 1 else 'unguided'}", run_dir=first,
            guidance=guidance, preset=config.students[0], samples=str(out / f"samples-w{guidance:g}"))
    if "eval" in wanted:
        run("eval", f"eval {config.students[0]}", run_dir=first, preset=config.students[0])
    if "speed" in wanted and config.speed_students:
        run("speed", f"speed: {config.speed_steps}-step sampling, students against the teacher",
            speed_runs={p: runs.get(p) or str(out / "runs" / f"speed-{p.replace('/', '-')}")
                        for p in config.speed_students})
    if "precision" in wanted:
        run("precision", "precision: fp16/bf16 paths against fp32")
    if "throughput" in wanted and config.throughput_presets:
        run("throughput", "throughput at real batch sizes")
    matmul = max(matmul, matmul_gflops(device))  # measured again at the end: the faster is the less disturbed
    for result in stages:
        result["of_matmul"] = result["gflops"] / matmul if result["gflops"] else None
    return {"stages": stages, "speed": outputs.get("speed"), "precision": outputs.get("precision"),
            "throughput": outputs.get("throughput"), "matmul_gflops": matmul, "flops": flops,
            "device": str(device), "config": asdict(config)}


def _train(run, config: Sd15Config, out: Path) -> dict[str, str]:
    """`init` + `train` of each student with and without checkpointing; the run folder of each preset's first."""
    runs = {}
    for preset in config.students:
        for checkpointing in config.checkpointing:
            tag = f"{preset.replace('/', '-')}{'-ckpt' if checkpointing else ''}"
            run("train", f"init + train {preset}{' +ckpt' if checkpointing else ''}", preset=preset,
                run_dir=str(out / "runs" / tag), checkpointing=checkpointing, grid=False)
            runs.setdefault(preset, str(out / "runs" / tag))
    return runs


def stage_flops(stage: str, o: dict, flops: dict) -> float:
    """The counted FLOPs of the work a stage did in its compute seconds (see `sdit.flops.unit_flops`)."""
    if stage == "encode":
        return o["records"] * flops["vae_encode"] + o["texts"] * flops["text_encoder"]
    if stage == "label":
        return o["teacher_forwards"] * flops["unet"]
    if stage == "train":
        forwards = 4 if o["checkpointing"] else 3  # backward = 2 forwards; checkpointing recomputes one
        grid = o["grid_images"] * (o["grid_steps"] * 2 * flops[o["preset"]] + flops["vae_decode"])
        return o["steps"] * o["batch_size"] * forwards * flops[o["preset"]] + grid
    if stage == "sample":
        guided = 2 if o["guidance"] != 1 else 1
        return o["images"] * (o["steps"] * guided * flops[o["preset"]] + flops["vae_decode"]
                              + guided * flops["text_encoder"])
    if stage == "eval":
        return o["draws"] * flops[o["preset"]]
    if stage == "speed":
        return o["repeats"] * sum(sampling_flops(o, name, flops) for name in o["models"])
    return 0.0  # teacher, precision, throughput: no FLOP rate (throughput reports its own)


def sampling_flops(speed: dict, model: str, flops: dict) -> float:
    """FLOPs of one of the speed stage's sampling runs of `model`: text encoder, steps, VAE decode."""
    m, n = speed["models"][model], speed["images"]
    forward = flops["unet" if model == "sd15_unet" else model]
    return n * (m["forwards_per_step"] * (speed["steps"] * forward + flops["text_encoder"]) + flops["vae_decode"])


def format_sd15_table(result: dict) -> str:
    c = result["config"]
    lines = [f"SD 1.5-shaped teacher (random weights) at {c['resolution']} px on {result['device']}; fp32 matmul "
             f"ceiling {result['matmul_gflops']:.1f} GFLOP/s",
             f"{'stage':<58}{'seconds':>9}{'peak RSS':>11}{'GFLOP':>10}{'GFLOP/s':>9}{'of matmul':>10}  outputs"]
    for s in result["stages"]:
        rate = f"{s['gflops']:>9.1f}{s['of_matmul']:>10.2f}" if s["gflops"] else f"{'-':>9}{'-':>10}"
        lines.append(f"{s['stage']:<58}{s['seconds']:>9.1f}{s['peak_rss_mb']:>8.0f} MB{s['gflop']:>10.0f}{rate}  "
                     f"{describe_outputs(s['outputs'])}")
    if result.get("speed"):
        lines += ["", format_speed_table(result["speed"])]
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


def format_speed_table(sp: dict) -> str:
    lines = [f"whole sampling runs side by side: {sp['images']} image(s) at {sp['resolution']} px, {sp['steps']} "
             f"{sp['scheduler']} steps, guidance {sp['guidance']:g} (text encoder, denoising loop, VAE decode); "
             f"fastest of {sp['repeats']} alternating rounds after a {sp['warmup_steps']}-step warm-up",
             f"{'model':<12}{'s/run':>9}{'median':>9}{'loop s':>9}{'s/step':>9}{'attention':>11}{'images/s':>11}"
             f"{'vs SD 1.5':>11}{'loop vs SD 1.5':>16}"]
    for name, m in sp["models"].items():
        share = f"{m['attention_share']:>11.0%}" if m["attention_share"] is not None else f"{'-':>11}"
        lines.append(f"{name:<12}{m['seconds']:>9.2f}{m['median_seconds']:>9.2f}{m['loop_seconds']:>9.2f}"
                     f"{m['step_seconds']:>9.3f}{share}{m['images_per_s']:>11.4f}{m['speedup']:>10.2f}x"
                     f"{m['loop_speedup']:>15.2f}x")
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
    if "image_shape" in o:
        return f"image {'x'.join(map(str, o['image_shape']))}, pixel std {o['image_std']:.1f}"
    if "mse" in o:
        return f"MSE to the teacher {o['mse']:.4f} on {o['draws']} held-out draws"
    if "models" in o:
        return f"{len(o['models'])} models, {o['repeats']} rounds of {o['steps']} steps"
    return ""


def _prompt_bank(path: Path, n: int) -> Path:
    path.write_text("".join(PROMPT_BANK[i % len(PROMPT_BANK)] + "\n" for i in range(n)))
    return path


def _child(stage: str, args: dict, out: Path) -> dict:
    """Run one stage in a child process; a failure's whole stderr is kept in `out`/STAGE.stderr."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.bench.sd15_stages", stage, json.dumps(args)],
                          capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[2])
    if proc.returncode:
        (out / f"{stage}.stderr").write_text(proc.stderr)
        lines = proc.stderr.strip().splitlines()
        raise SDiTError(f"bench sd15: the {stage} stage failed: {lines[-1] if lines else proc.returncode} (its "
                        f"output: {out / f'{stage}.stderr'})")
    return json.loads(proc.stdout.strip().splitlines()[-1])
