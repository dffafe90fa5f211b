"""`sdit bench sd15`: every stage at Stable Diffusion 1.5's real size, and the student's sampling speed against
the teacher's.

SD 1.5's weights cannot be downloaded here, but its architecture can be built: `random_teacher` builds the UNet,
VAE and text encoder from the configs in data/sd15 with seeded random weights and saves them once to a cache
folder, both as a diffusers folder and as one original-layout `.safetensors` file (fp16, as SD's `-fp16` files),
so both loading paths run at full size. Random weights cost what trained ones do; their outputs mean nothing but
must be finite.

Then, on photographs at 512 px (`photographs`), each stage runs in a child process of its own, so its peak RSS is
its own (`python -m pipeline.bench.sd15 STAGE ARGS` prints one JSON line):

    encode           the single file: 4x64x64 latents, 77x768 text
    teacher-label    the diffusers folder (the store's teacher hashes must match): K draws, perturbations on,
                     plus `--synthesize` of the prompt bank
    train            `init` + `train` of each student, with and without gradient checkpointing
    sample           the first run, with and without guidance
    eval             the first run against held-out draws
    speed            images/s of each student's pipeline against the teacher's (same scheduler, steps, guidance,
                     batch and noise): text encoder, denoising loop and VAE decode timed apart

For each stage: wall time (of the stage function, loading included), peak RSS, FLOPs counted with
`torch.utils.flop_counter` on the meta device per unit of work (a VAE encode, a UNet forward, ...) times the units
the stage ran, and so GFLOP/s against a 2048³ fp32 matmul measured in the same run.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from sdit.errors import SDiTError
from sdit.files import check_folder
from sdit.teacher import SD15_CONFIG_DIR
from pipeline.bench.config import Sd15Config
from sdit.config import vae_factor

CACHE_DTYPE = "fp16"  # the cache's weights on disk: half the bytes of fp32; loaded in the stage's dtype
SINGLE_FILE = "sd15-random.safetensors"
CAPTIONS = ("a black and white portrait photograph of a woman in uniform",
            "an old photograph of a smiling officer", "a close-up portrait of a person with short hair",
            "a vintage studio photograph", "a portrait photo, soft light, dark background")
PROMPT_BANK = ("a photograph of an astronaut riding a horse", "a red sports car parked by the sea",
               "a bowl of fruit on a wooden table", "a lighthouse at sunset")
STAGES = ("teacher", "encode", "teacher-label", "train", "sample", "eval", "speed")


# --- the random teacher, built once ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherCache:
    folder: Path  # diffusers layout
    single_file: Path  # original layout; its configs are the config folder's


def random_teacher(config_dir: str | Path, cache: str | Path, seed: int = 0) -> TeacherCache:
    """An SD-shaped teacher with the architecture of `config_dir`'s configs and seeded random weights, saved once
    to `cache` in both layouts. A cache made from other configs, seed or dtype, or left unfinished, is rebuilt."""
    config_dir, cache = Path(config_dir), Path(cache)
    made = TeacherCache(cache / "diffusers", cache / SINGLE_FILE)
    identity = {"configs": _configs_hash(config_dir), "seed": seed, "dtype": CACHE_DTYPE}
    done = cache / "done.json"
    if done.exists() and json.loads(done.read_text()) == identity:
        return made
    shutil.rmtree(cache, ignore_errors=True)
    build_and_save(config_dir, made, seed)
    done.write_text(json.dumps(identity))  # last: a killed build is rebuilt
    return made


def build_and_save(config_dir: Path, made: TeacherCache, seed: int) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdit.convert import to_original_layout
    from sdit.tiny import save_configs

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        models = {
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder",
                                                                         local_files_only=True)),
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet")),
        }
    for model in models.values():
        model.half()
    save_configs(models, made.folder, source=config_dir)
    for name, model in models.items():
        model.save_pretrained(made.folder / name)
    save_file(to_original_layout(models["unet"], models["vae"], models["text_encoder"]), made.single_file)


def _configs_hash(config_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in ("unet", "vae", "text_encoder"):
        digest.update((config_dir / name / "config.json").read_bytes())
    return digest.hexdigest()[:16]


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


# --- FLOPs per unit of work ------------------------------------------------------------------------------------


def unit_flops(config_dir: Path, resolution: int, presets: tuple[str, ...]) -> dict[str, float]:
    """FLOPs of one unit of each stage's work at `resolution`, batch 1, counted on the meta device: a VAE encode
    and decode, a text encoder forward (77 tokens), a UNet forward, and each student's forward."""
    import torch
    from diffusers import AutoencoderKL
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdit.flops import student_flops, unet_flops

    factor, channels = vae_factor(config_dir)
    latent = resolution // factor
    text_config = CLIPTextConfig.from_pretrained(config_dir / "text_encoder", local_files_only=True)

    def count(fn) -> float:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            fn()
        return float(counter.get_total_flops())

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
        text = CLIPTextModel(text_config)
        image = torch.empty(1, 3, resolution, resolution)
        z = torch.empty(1, channels, latent, latent)
        ids = torch.zeros(1, 77, dtype=torch.long)
        flops = {"vae_encode": count(lambda: vae.encode(image)), "vae_decode": count(lambda: vae.decode(z)),
                 "text_encoder": count(lambda: text(ids))}
    flops["unet"] = float(unet_flops(config_dir, sample_size=latent))
    for preset in presets:
        flops[preset] = float(student_flops(preset, sample_size=latent, in_channels=channels,
                                            text_dim=text_config.hidden_size))
    return flops


# --- the bench -------------------------------------------------------------------------------------------------


def bench_sd15(config: Sd15Config, on_stage=None) -> dict:
    """Every stage at full size in child processes, then the side-by-side sampling speed. `on_stage(name)` is
    called as each starts. Returns {"stages": [...], "speed": {...}, "matmul_gflops", "flops", "config"}."""
    from pipeline.bench import matmul_gflops
    import torch

    config.check()
    on_stage = on_stage or (lambda name: None)
    out = check_folder(config.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = config.threads or os.cpu_count()
    torch.set_num_threads(threads)
    from sdit.devices import resolve_device

    matmul = matmul_gflops(resolve_device(config.device))
    presets = tuple(dict.fromkeys((*config.students, *config.speed_students)))
    flops = unit_flops(Path(config.config_dir), config.resolution, presets)
    base = {"config": asdict(config), "threads": threads, "cache": config.cache or str(out / "teacher"),
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
    lines += [] if not result["speed"] else ["", f"sampling side by side: {sp['images']} image(s) at {sp['resolution']} px, {sp['steps']} "
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
                         f"{p['low_seconds']:>9.2f}  {'yes' if p['finite'] else 'NO'}{'' if p['ok'] else '  OUT OF TOLERANCE'}")
    if result.get("throughput"):
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
    proc = subprocess.run([sys.executable, "-m", "pipeline.bench.sd15", stage, json.dumps(args)],
                          capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[2])
    if proc.returncode:
        lines = proc.stderr.strip().splitlines()
        raise SDiTError(f"bench sd15: the {stage} stage failed: {lines[-1] if lines else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- in the child: one stage -----------------------------------------------------------------------------------


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

    summary = encode(EncodeConfig(source=a["photos"], teacher=a["single_file"], teacher_config=a["teacher_config"],
                                  out=a["store"], prompts=a["prompts_file"], resolution=c.resolution,
                                  batch_size=min(c.records, 32), device=c.device, dtype=c.dtype, overwrite=True,
                                  threads=a["threads"]))
    outputs = _store_outputs(a["store"], "records", ("latents", "text_emb"))
    return outputs | {"records": summary.records, "texts": summary.records + c.prompts + 1}


def _stage_label(a: dict, c: Sd15Config) -> dict:
    from pipeline.label import LabelConfig, label
    from sdit.synthesize import SynthesisConfig

    synthesis = SynthesisConfig(samples=c.synthesize, steps=c.synth_steps, scheduler=c.synth_scheduler,
                                guidance=c.guidance) if c.synthesize else None
    counts = label(LabelConfig(store=a["store"], teacher=a["folder"], draws=c.draws, batch_size=min(c.records, c.label_batch),
                               device=c.device, dtype=c.dtype, synthesis=synthesis, overwrite=True,
                               threads=a["threads"]))
    outputs = _store_outputs(a["store"], "labels/default", ("eps_teacher", "noise"))
    if c.synthesize:
        outputs["synthetic"] = _store_outputs(a["store"], "synthetic", ("latents",))
    kinds = counts["kinds"]
    return outputs | {"draws": counts["draws"], "kinds": kinds, "dropped": counts["dropped"],
                      "teacher_forwards": counts["teacher_forwards"]["total"],
                      "bytes_per_draw": counts["bytes_per_draw"]}


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
    return timings | {"preset": a["preset"], "checkpointing": a["checkpointing"], "steps": summary["steps"],
                      "batch_size": c.batch_size, "train_seconds": summary["seconds"],
                      "steps_per_s": summary["steps_per_s"], "losses": [m["loss"] for m in metrics],
                      "finite": all(np.isfinite(m["loss"]) for m in metrics), "grid_images": grid, "grid_steps": 1}


def _stage_sample(a: dict, c: Sd15Config) -> dict:
    from PIL import Image

    from pipeline.sample import SampleConfig, sample

    summary = sample(SampleConfig(run=a["run_dir"], out=a["samples"], prompts=(PROMPT_BANK[0],), num_images=1,
                                  height=c.resolution, width=c.resolution, steps=c.sample_steps,
                                  guidance=a["guidance"], scheduler=c.scheduler, batch_size=1, device=c.device,
                                  dtype=c.dtype))
    image = np.asarray(Image.open(next(Path(a["samples"], "student").glob("*.png"))))
    return {"preset": a["preset"], "images": summary.images, "steps": c.sample_steps, "guidance": a["guidance"],
            "image_shape": list(image.shape), "image_std": float(image.std())}


def _stage_eval(a: dict, c: Sd15Config) -> dict:
    from pipeline.evaluate import EvalConfig, evaluate

    result = evaluate(EvalConfig(run=a["run_dir"], store=a["store"], device=c.device))
    agreement = result["teacher_agreement"]
    return {"preset": a["preset"], "draws": agreement["draws"], "mse": agreement["mse"],
            "finite": agreement["mse"] is not None and bool(np.isfinite(agreement["mse"]))}


def _stage_speed(a: dict, c: Sd15Config) -> dict:
    """Each model's denoising loop on the same noise, text, scheduler, steps and guidance (profiled, for the share
    of attention), then the text encoder and the VAE decode once: both pipelines run the same CLIP and VAE."""
    import torch

    from pipeline.init import InitConfig, init
    from sdit.devices import resolve_device, resolve_dtype
    from sdit.pipeline_sdit import load_pipeline
    from sdit.sampling import decode, denoise, initial_noise, make_scheduler
    from sdit.teacher import load_teacher
    from sdit.text import encode_text

    device = resolve_device(c.device)
    dtype = resolve_dtype(c.dtype, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    teacher = load_teacher(a["folder"], device=device, dtype=dtype)
    factor, channels = vae_factor(Path(c.config_dir))
    n, latent = c.speed_images, c.resolution // factor
    prompts = [PROMPT_BANK[i % len(PROMPT_BANK)] for i in range(n)]
    noise = initial_noise((channels, latent, latent), [torch.Generator().manual_seed(i) for i in range(n)], device)

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        value = fn()
        sync()
        return value, time.perf_counter() - t0

    with torch.no_grad():
        (text, null), text_seconds = timed(lambda: (encode_text(teacher.tokenizer, teacher.text_encoder, prompts,
                                                                device),
                                                    encode_text(teacher.tokenizer, teacher.text_encoder, [""] * n,
                                                                device)))

    def loop(eps_model) -> dict:
        scheduler = make_scheduler(c.scheduler, teacher.scheduler_config)
        run = lambda: denoise(eps_model, scheduler, noise, text, null, c.speed_steps, c.guidance)  # noqa: E731
        if device.type == "cuda":  # the CPU profiler's view of a GPU run says nothing about its kernels
            latents, seconds = timed(run)
            return {"latents": latents, "loop_seconds": seconds, "step_seconds": seconds / c.speed_steps,
                    "attention_share": None}
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            latents, seconds = timed(run)
        return {"latents": latents, "loop_seconds": seconds, "step_seconds": seconds / c.speed_steps,
                "attention_share": _attention_share(prof)}

    def unet_eps(x, t, context):
        return teacher.unet(x.to(dtype), t, encoder_hidden_states=context.to(dtype)).sample.float()

    models = {"sd15_unet": loop(unet_eps)}
    for preset, run in a["speed_runs"].items():
        if not (Path(run) / "sdit_run.json").exists():
            init(InitConfig(teacher=a["folder"], student=preset, out=run))
        pipe = load_pipeline(run, device, dtype)
        models[preset] = loop(pipe.eps_model(c.guidance))
        del pipe
    images, decode_seconds = timed(lambda: decode(teacher.vae, models["sd15_unet"].pop("latents")))
    for m in models.values():
        m.pop("latents", None)
        m["images_per_s"] = n / (text_seconds + m["loop_seconds"] + decode_seconds)
        m["projected_images_per_s"] = n / (text_seconds + c.project_steps * m["step_seconds"] + decode_seconds)
    unet = models["sd15_unet"]
    for m in models.values():
        m["speedup"] = m["images_per_s"] / unet["images_per_s"]
        m["loop_speedup"] = unet["loop_seconds"] / m["loop_seconds"]
        m["projected_speedup"] = m["projected_images_per_s"] / unet["projected_images_per_s"]
    return {"images": n, "steps": c.speed_steps, "guidance": c.guidance, "scheduler": c.scheduler,
            "resolution": c.resolution, "students": list(a["speed_runs"]), "text_seconds": text_seconds,
            "decode_seconds": decode_seconds, "project_steps": c.project_steps, "models": models,
            "image_shape": list(images.shape)}


# --- throughput at real batch sizes (the GPU check) ------------------------------------------------------------

# Dense bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s (a multiply-add = 2), by device name.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 756.0,
                   "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0,
                   "RTX 3090": 71.0, "V100": 125.0}


def peak_tflops(device) -> tuple[float | None, float]:
    """(the data sheet's dense bf16 peak, or None when the device is not in the table; a bf16 matmul measured
    here), TFLOP/s."""
    import torch

    from pipeline.bench import matmul_gflops

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    sheet = next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)
    n = 8192 if device.type == "cuda" else 1024
    return sheet, matmul_gflops(device, n, dtype=torch.bfloat16) / 1000


def throughput(folder: str, config_dir: Path, presets: tuple[str, ...], resolutions: tuple[int, ...],
               label_batch: int, train_batch: dict[int, int], steps: int, device_name: str) -> dict:
    """Labels/s (the teacher's UNet forward in the labelling dtype, fp16 on GPU) and training steps/s (bf16
    autocast, AdamW, EMA, as `sdit train` on GPU) of each preset at each resolution, with peak memory and
    TFLOP/s. A batch that runs out of GPU memory is halved until it fits (and said so)."""
    import torch

    from pipeline.train import Trainer, TrainConfig, Workers, make_state
    from sdit.devices import resolve_device, resolve_dtype
    from sdit.diffusion import NoiseSchedule
    from sdit.dit import build_student
    from sdit.flops import TRAIN_STEP_FORWARDS, student_flops, unet_flops
    from sdit.teacher import load_teacher

    device = resolve_device(device_name)
    dtype = resolve_dtype("auto", device) if device.type == "cuda" else torch.bfloat16
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    factor, channels = vae_factor(config_dir)
    text_dim = json.loads((config_dir / "text_encoder" / "config.json").read_text())["hidden_size"]
    sheet, matmul = peak_tflops(device)
    # What the trainer reads of a labelled store: the teacher's noise schedule, and that its targets are unguided
    schedule = NoiseSchedule.from_config(json.loads((config_dir / "scheduler" / "scheduler_config.json").read_text()))
    plain_labels = SimpleNamespace(schedule=schedule, labels=SimpleNamespace(guided=False))

    def measure(step, batch: int) -> tuple[float, float]:
        """(seconds per call after 2 warm-up calls, peak GB)"""
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(2):
            step(batch)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step(batch)
        sync()
        seconds = (time.perf_counter() - t0) / steps
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
        return seconds, peak

    def fitting(step, batch: int) -> dict:
        while True:
            try:
                seconds, peak = measure(step, batch)
                return {"batch": batch, "seconds": seconds, "peak_gb": peak}
            except torch.cuda.OutOfMemoryError:
                if batch == 1:
                    return {"batch": 0, "seconds": None, "peak_gb": None, "oom": True}
                batch //= 2

    rows = []
    unet = load_teacher(folder, components=("unet",), device=device, dtype=dtype).unet
    for res in resolutions:
        latent = res // factor

        @torch.no_grad()
        def label_step(b: int) -> None:
            x = torch.randn(b, channels, latent, latent, device=device, dtype=dtype)
            unet(x, torch.randint(0, 1000, (b,), device=device),
                 encoder_hidden_states=torch.randn(b, 77, text_dim, device=device, dtype=dtype))

        r = fitting(label_step, label_batch)
        flops = unet_flops(config_dir, sample_size=latent)
        rows.append(r | {"model": "sd15_unet labels", "resolution": res, "per_s": r["batch"] / r["seconds"]
                         if r["seconds"] else None, "tflops": flops * r["batch"] / r["seconds"] / 1e12
                         if r["seconds"] else None})
    del unet
    for preset in presets:
        for res in resolutions:
            latent = res // factor
            torch.manual_seed(0)
            student = build_student(preset, sample_size=latent, in_channels=channels, text_dim=text_dim)
            # `sdit train`'s own step (bf16 autocast, the loss with its high-noise weight, AdamW, clipping, EMA) on
            # random draws of this size, copied to the device each step as the loader's batches are
            config = TrainConfig(store="-", out="-", precision="bf16", high_noise_weight=5.0)
            trainer = Trainer(config, make_state(student, config, device, Workers()), plain_labels, device)

            def train_step(b: int) -> None:
                trainer.step(random_batch(b, channels, latent, text_dim))

            r = fitting(train_step, train_batch[res])
            flops = TRAIN_STEP_FORWARDS * student_flops(preset, sample_size=latent, in_channels=channels,
                                                        text_dim=text_dim)
            rows.append(r | {"model": preset, "resolution": res, "per_s": 1 / r["seconds"] if r["seconds"] else None,
                             "tflops": flops * r["batch"] / r["seconds"] / 1e12 if r["seconds"] else None})
            del trainer, student
    return {"rows": rows, "peak_tflops_sheet": sheet, "peak_tflops_matmul": matmul,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "teacher_dtype": str(dtype).removeprefix("torch.")}


def random_batch(b: int, channels: int, latent: int, text_dim: int):
    """A batch of `b` draws as the loader makes them (float32 inputs, float16 text and targets), random values."""
    import torch

    from sdit.loader import Batch

    return Batch(x_t=torch.randn(b, channels, latent, latent), text=torch.randn(b, 77, text_dim).half(),
                 timesteps=torch.randint(0, 1000, (b,)), guidance=torch.zeros(b), kind=torch.zeros(b, dtype=torch.long),
                 noise=torch.randn(b, channels, latent, latent).half(),
                 eps_teacher=torch.randn(b, channels, latent, latent).half(), synthetic=torch.zeros(b, dtype=torch.bool))


def _stage_throughput(a: dict, c: Sd15Config) -> dict:
    return throughput(a["folder"], Path(c.config_dir), c.throughput_presets, c.throughput_resolutions,
                      c.label_batch, {r: b for r, b in zip(c.throughput_resolutions, c.train_batches)},
                      c.throughput_steps, c.device)


def format_throughput_table(t: dict) -> str:
    peak = t["peak_tflops_sheet"] or t["peak_tflops_matmul"]
    lines = [f"throughput on {t['device']}: bf16 matmul {t['peak_tflops_matmul']:.1f} TFLOP/s measured, data sheet "
             f"{t['peak_tflops_sheet'] or '-'} TFLOP/s; labels in {t['teacher_dtype']}, training in bf16 autocast",
             f"{'model':<20}{'px':>5}{'batch':>6}{'per s':>10}{'peak GB':>9}{'TFLOP/s':>9}{'of peak':>9}"]
    for r in t["rows"]:
        what = "labels/s" if "labels" in r["model"] else "steps/s"
        if r["seconds"] is None:
            lines.append(f"{r['model']:<20}{r['resolution']:>5}  out of memory at batch 1")
            continue
        lines.append(f"{r['model']:<20}{r['resolution']:>5}{r['batch']:>6}{r['per_s']:>10.2f}{r['peak_gb']:>9.1f}"
                     f"{r['tflops']:>9.2f}{r['tflops'] / peak:>9.1%}  {what}")
    return "\n".join(lines)


# --- precision paths --------------------------------------------------------------------------------------------

# Relative RMS error, |ε_low − ε_fp32| / |ε_fp32|, allowed for each reduced-precision path. fp16 keeps 11 bits of
# mantissa, bf16 8: a deep network's outputs move by about their unit roundoff times a small factor.
TOLERANCES = {"teacher_fp16": 1e-2, "teacher_bf16": 5e-2, "student_bf16_autocast": 5e-2}


def relative_error(low, high) -> float:
    high = high.float()
    return float((low.float() - high).norm() / high.norm().clamp_min(1e-12))


def precision_paths(folder: str, config_dir: Path, presets: tuple[str, ...], latent: int, fp16_latent: int,
                    threads: int | None = None) -> dict:
    """Each reduced-precision path against fp32 on the same inputs, on the CPU: the teacher's UNet loaded in fp16
    (at `fp16_latent`: this CPU has no fp16 kernels and runs them about 100x slower than fp32) and in bf16, and each
    student's forward under bf16 autocast (`trained_like`). Returns per path: the relative RMS error, whether the low-precision output is finite, both times, and
    whether it is within `TOLERANCES`."""
    import torch

    from sdit.dit import build_student
    from sdit.teacher import load_teacher

    if threads:
        torch.set_num_threads(threads)
    factor, channels = vae_factor(config_dir)
    g = torch.Generator().manual_seed(0)
    text_dim = json.loads((config_dir / "text_encoder" / "config.json").read_text())["hidden_size"]
    results = {}

    def compare(name: str, run_low, run_high, inputs) -> None:
        t0 = time.perf_counter()
        high = run_high(*inputs)
        t1 = time.perf_counter()
        low = run_low(*inputs)
        t2 = time.perf_counter()
        err = relative_error(low, high)
        results[name] = {"relative_error": err, "finite": bool(torch.isfinite(low).all()), "fp32_seconds": t1 - t0,
                         "low_seconds": t2 - t1, "tolerance": TOLERANCES[name.split(" ")[0]],
                         "ok": bool(torch.isfinite(low).all()) and err <= TOLERANCES[name.split(" ")[0]]}

    def unet_inputs(side: int):
        return (torch.randn(1, channels, side, side, generator=g), torch.tensor([500]),
                torch.randn(1, 77, text_dim, generator=g))

    with torch.no_grad():
        unet32 = load_teacher(folder, components=("unet",)).unet
        for dtype, side in ((torch.float16, fp16_latent), (torch.bfloat16, latent)):
            low = load_teacher(folder, components=("unet",), dtype=dtype).unet
            compare(f"teacher_{'fp16' if dtype == torch.float16 else 'bf16'} ({side}x{side} latents)",
                    lambda x, t, c, m=low, d=dtype: m(x.to(d), t, encoder_hidden_states=c.to(d)).sample,
                    lambda x, t, c: unet32(x, t, encoder_hidden_states=c).sample, unet_inputs(side))
            del low
        del unet32
        for preset in presets:
            torch.manual_seed(0)
            student = build_student(preset, sample_size=latent, in_channels=channels, text_dim=text_dim).eval()
            trained_like(student)

            def autocast(x, t, c, m=student):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return m(x, t, c)

            compare(f"student_bf16_autocast {preset}", autocast, lambda x, t, c, m=student: m(x, t, c),
                    unet_inputs(latent))
            del student
    return results


def trained_like(student) -> None:
    """Random weights where a fresh student has zeros (each block's adaLN-Zero modulation, the final layer), so
    that every block acts and ε is not 0: what a precision check needs."""
    import torch

    for layer in [b.adaLN_modulation[-1] for b in student.blocks] + [student.final_layer.adaLN_modulation[-1],
                                                                      student.final_layer.linear]:
        torch.nn.init.normal_(layer.weight, std=0.02)


def _stage_precision(a: dict, c: Sd15Config) -> dict:
    factor, _ = vae_factor(Path(c.config_dir))
    latent = c.resolution // factor
    return {"paths": precision_paths(a["folder"], Path(c.config_dir), c.students, latent, c.fp16_latent)}


def _attention_share(prof) -> float:
    """The share of self CPU time spent in attention kernels (SDPA and its math path's pieces)."""
    total = attention = 0.0
    for event in prof.key_averages():
        total += event.self_cpu_time_total
        if "attention" in event.key or "_softmax" in event.key or event.key == "aten::softmax":
            attention += event.self_cpu_time_total
    return attention / total if total else 0.0


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
