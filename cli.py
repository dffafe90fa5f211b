"""`sdit`: one thin command per stage. Options -> a frozen config -> one pipeline function.

Errors a user can cause (SDiTError) print as one line on stderr with exit code 2; set SDIT_DEBUG=1 for
the traceback.
"""

import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(name="sdit", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Distil a Stable Diffusion teacher into a Diffusion Transformer.")
bench_app = typer.Typer(no_args_is_help=True, help="Measure a stage's speed and memory on this machine.")
app.add_typer(bench_app, name="bench")

# --- shared options -------------------------------------------------------------------------------------
Teacher = Annotated[str, typer.Option("--teacher", "-t", help="SD model: a diffusers folder or a .safetensors/.ckpt file.")]
TeacherConfig = Annotated[Optional[str], typer.Option(
    help="Diffusers folder whose configs describe a single-file teacher (default: SD 1.5's, shipped in data/).")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
DType = Annotated[str, typer.Option(help="auto (fp32 on CPU, fp16 on GPU), fp32, fp16 or bf16.")]
BatchSize = Annotated[int, typer.Option(min=1, help="Records per model forward.")]
RayAddress = Annotated[Optional[str], typer.Option(
    help="Run shards on Ray: 'local' starts one for this run; 'auto' or 'ray://host:port' joins a cluster.")]
JsonOut = Annotated[Optional[Path], typer.Option("--json", help="Also write the figures to this JSON file.")]
BenchTeacher = Annotated[Optional[str], typer.Option(help="Teacher [default: a tiny random SD-shaped one].")]


def _quiet_libraries() -> None:
    """diffusers and transformers print load-time warnings and progress bars that say nothing to our users."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # teachers load from local disk, never from a hub
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def command(fn):
    """Register a command that reports SDiTError in one line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from sdit.errors import SDiTError

        _quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except SDiTError as err:
            if os.environ.get("SDIT_DEBUG"):
                raise
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: finished shards and checkpoints are kept; rerun the same command "
                       "(`sdit train`: with --resume) to go on", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _report(table: str, result: dict, json_out: Optional[Path]) -> None:
    """A benchmark's table on the terminal, and its figures as JSON when asked."""
    typer.echo(table)
    if json_out:
        from pipeline.bench import write_json

        write_json(result, json_out)


def progress_bar(desc: str, unit: str):
    from tqdm import tqdm

    return tqdm(desc=desc, unit=unit, dynamic_ncols=True, smoothing=0.1, disable=None, file=sys.stderr)


# --- stage one ------------------------------------------------------------------------------------------
@app.command()
@command
def encode(
    source: Annotated[str, typer.Argument(help="Image folder (+ .txt or metadata.jsonl/csv/parquet), parquet file(s), or webdataset .tar shard(s).")],
    teacher: Teacher,
    out: Annotated[str, typer.Option("--out", "-o", help="Store to write: a folder or an fsspec URL.")],
    teacher_config: TeacherConfig = None,
    prompts: Annotated[Optional[str], typer.Option(help="Text-only prompt bank: a text file (one a line) or parquet.")] = None,
    prompt_column: Annotated[str, typer.Option(help="Column of a parquet prompt bank.")] = "text",
    resolution: Annotated[int, typer.Option(help="Square image side after resize and centre crop (multiple of 8).")] = 512,
    min_size: Annotated[Optional[int], typer.Option(help="Reject images whose short side is smaller [default: resolution/4].")] = None,
    batch_size: BatchSize = 16,
    shard_size: Annotated[int, typer.Option(min=1, help="Source items per shard (the unit of work and of resume).")] = 1024,
    limit: Annotated[Optional[int], typer.Option(min=0, help="Encode only the first N source items.")] = None,
    strict: Annotated[bool, typer.Option(help="Stop at the first rejected input instead of skipping it.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Delete an existing store at --out and start again.")] = False,
    device: Device = "auto",
    dtype: DType = "auto",
    image_column: Annotated[str, typer.Option(help="Parquet: the image struct column.")] = "image",
    caption_column: Annotated[str, typer.Option(help="Parquet/metadata: the caption column.")] = "text",
    id_column: Annotated[Optional[str], typer.Option(help="Parquet: a column of record ids.")] = None,
    caption_key: Annotated[Optional[str], typer.Option(help="Webdataset .json: the caption key [default: caption, then text].")] = None,
    ray_address: RayAddress = None,
    num_workers: Annotated[Optional[int], typer.Option(min=1, help="Ray actors [default: one per GPU, else per CPU].")] = None,
):
    """Encode image-caption pairs into a store: scaled VAE latents and CLIP text embeddings."""
    from pipeline.encode import EncodeConfig, encode as run_encode

    config = EncodeConfig(source=source, teacher=teacher, out=out, teacher_config=teacher_config, prompts=prompts,
                          prompt_column=prompt_column, resolution=resolution, min_size=min_size, batch_size=batch_size,
                          shard_size=shard_size, limit=limit, strict=strict, overwrite=overwrite, device=device,
                          dtype=dtype, image_column=image_column, caption_column=caption_column, id_column=id_column,
                          caption_key=caption_key, ray_address=ray_address, num_workers=num_workers)
    with progress_bar("encode", "item") as bar:
        summary = run_encode(config, progress=bar.update, on_total=lambda n: setattr(bar, "total", n))
    typer.echo(summary.line())


@app.command("teacher-label")
@command
def teacher_label(
    store: Annotated[str, typer.Argument(help="An encoded store (from `sdit encode`).")],
    teacher: Teacher,
    teacher_config: TeacherConfig = None,
    labels: Annotated[str, typer.Option(help="Name of this labelling: labels/NAME in the store.")] = "default",
    draws: Annotated[int, typer.Option(min=1, help="Labelled draws per record.")] = 4,
    timesteps: Annotated[str, typer.Option(help="uniform, or stratified: a record's draws spread across [0, T).")] = "uniform",
    perturb: Annotated[Optional[str], typer.Option(help="Perturbation mix, e.g. none=0.4,input=0.1,swap=0.3,mix=0.1,null=0.1, or a .json config file.")] = None,
    input_gamma: Annotated[float, typer.Option(min=0, help="γ of input perturbation: the input uses ε + γ·ξ.")] = 0.1,
    caption_min_t: Annotated[int, typer.Option(min=0, help="Swap and mix captions only at timesteps from here up.")] = 400,
    prompt_share: Annotated[float, typer.Option(min=0, max=1, help="Share of swap/mix captions from the prompt bank.")] = 1.0,
    guidance: Annotated[Optional[str], typer.Option(help="W_MIN:W_MAX: store guided targets ε_u + w(ε_c − ε_u) with w stored.")] = None,
    seed: Annotated[int, typer.Option(help="Same seed, same draws, whatever the executor or batch size.")] = 0,
    batch_size: BatchSize = 64,
    max_dropped: Annotated[float, typer.Option(min=0, max=1, help="Stop when more draws than this get a NaN/inf teacher output.")] = 0.01,
    overwrite: Annotated[bool, typer.Option(help="Delete labels of the same name and start again.")] = False,
    synthesize: Annotated[int, typer.Option(min=0, help="First sample the teacher N times per prompt of the store's prompt bank (synthetic records, store/synthetic), then label those too; 0: real records only.")] = 0,
    synth_steps: Annotated[int, typer.Option(min=1, help="Sampling steps of each synthetic record.")] = 25,
    synth_guidance: Annotated[float, typer.Option(min=0, help="Classifier-free guidance of each synthetic record (1: none).")] = 7.5,
    synth_seed: Annotated[int, typer.Option(help="Seeds each synthetic record's initial noise from (seed, prompt, sample).")] = 0,
    synth_scheduler: Annotated[Optional[str], typer.Option(help="Sampler of the synthetic records: ddim, dpm++, euler or pndm [default: the teacher's own].")] = None,
    device: Device = "auto",
    dtype: DType = "auto",
    ray_address: RayAddress = None,
    num_workers: Annotated[Optional[int], typer.Option(min=1, help="Ray actors [default: one per GPU, else per CPU].")] = None,
):
    """Run the teacher's UNet once over a store: K draws per record (timestep, noise, perturbation) and ε_T.
    With --synthesize N it first samples the prompt bank into synthetic records and labels them as well."""
    from pipeline.label import LabelConfig, label
    from sdit.errors import SDiTError
    from sdit.perturb import DEFAULT_MIX, PerturbConfig
    from sdit.synthesize import SynthesisConfig

    window = None
    if guidance:
        try:
            low, high = (float(x) for x in guidance.split(":"))
        except ValueError:
            raise SDiTError(f"--guidance {guidance!r}: give W_MIN:W_MAX, e.g. 2:8") from None
        window = (low, high)
    options = dict(input_gamma=input_gamma, caption_min_t=caption_min_t, prompt_share=prompt_share)
    if perturb and perturb.endswith(".json"):
        mix = PerturbConfig.from_file(perturb)
    elif perturb:
        mix = PerturbConfig.parse(perturb, **options)
    else:
        mix = PerturbConfig(mix=dict(DEFAULT_MIX), **options)
    config = LabelConfig(store=store, teacher=teacher, teacher_config=teacher_config, name=labels, draws=draws,
                         timesteps=timesteps, perturb=mix, guidance=window, seed=seed, batch_size=batch_size,
                         max_dropped=max_dropped, overwrite=overwrite, device=device, dtype=dtype,
                         ray_address=ray_address, num_workers=num_workers,
                         synthesis=SynthesisConfig(samples=synthesize, steps=synth_steps, guidance=synth_guidance,
                                                   seed=synth_seed, scheduler=synth_scheduler) if synthesize else None)
    with progress_bar("teacher-label", "draw") as bar:

        def on_stage(name: str, total: int) -> None:
            bar.reset(total)
            bar.set_description(name)
            bar.unit = "sample" if name == "synthesize" else "draw"

        counts = label(config, progress=bar.update, on_stage=on_stage)
    kinds = ", ".join(f"{k} {v}" for k, v in counts["kinds"].items())
    typer.echo(f"labelled {counts['draws']} draws in {counts['shards']} shards into {store}/labels/{labels} "
               f"({kinds}; {counts['dropped']} dropped; {counts['bytes_per_draw']:.0f} bytes a draw)")
    if "synthetic" in counts:
        s = counts["synthetic"]
        typer.echo(f"and {s['draws']} draws of {s['records']} synthetic records ({s['samples_dropped']} samples "
                   f"dropped; {s['dropped']} draws dropped); teacher forwards in all: "
                   f"{counts['teacher_forwards']['total']} ({counts['teacher_forwards']['synthesis']} to sample)")


# --- stage two ------------------------------------------------------------------------------------------
@app.command()
@command
def init(
    teacher: Teacher,
    student: Annotated[str, typer.Option("--student", "-s", help="Student preset: SDiT-S/2, SDiT-B/2, SDiT-L/2, SDiT-XL/2 (patch 2, 4 or 8), SDiT-T/2, ...")],
    out: Annotated[str, typer.Option("--out", "-o", help="Run folder to write.")],
    teacher_config: TeacherConfig = None,
    sample_size: Annotated[Optional[int], typer.Option(min=1, help="Latent side the student is built for [default: the teacher UNet's].")] = None,
    guidance_embed: Annotated[bool, typer.Option(help="A guidance-distilled student: it takes the CFG scale w (for guided labels).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the student's initial weights.")] = 0,
):
    """Write an untrained run folder: a fresh student beside the teacher's VAE, text encoder, tokenizer and scheduler."""
    from sdit.dit import count_parameters
    from dataclasses import replace

    from sdit.run import init_run, load_student, teacher_latent_space

    space = teacher_latent_space(teacher, teacher_config)
    run = init_run(out, teacher, student, teacher_config=teacher_config,
                   space=replace(space, sample_size=sample_size or space.sample_size), guidance_embed=guidance_embed,
                   seed=seed)
    model = load_student(run)
    params = count_parameters(model)["total"]
    typer.echo(f"wrote {run}: {student}, {params / 1e6:.1f}M parameters, latents {model.config.in_channels}x"
               f"{model.config.sample_size}x{model.config.sample_size}, text width {model.config.text_dim}")


@app.command()
@command
def train(
    store: Annotated[str, typer.Argument(help="A labelled store (from `sdit teacher-label`).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Run folder: the student pipeline, checkpoints, metrics, samples.")],
    init: Annotated[Optional[str], typer.Option(help="Start from this run folder (from `sdit init`).")] = None,
    student: Annotated[Optional[str], typer.Option("--student", "-s", help="Or start a fresh student of this preset.")] = None,
    teacher: Annotated[Optional[str], typer.Option("--teacher", "-t", help="With --student: the teacher whose VAE and text encoder go into the run [default: the store's].")] = None,
    teacher_config: TeacherConfig = None,
    labels: Annotated[str, typer.Option(help="Which labels of the store: labels/NAME.")] = "default",
    steps: Annotated[int, typer.Option(min=1, help="Optimiser steps in all (a resumed run may raise it).")] = 10_000,
    batch_size: Annotated[int, typer.Option(min=1, help="Draws per step, over all workers.")] = 64,
    lr: Annotated[float, typer.Option(min=0, help="AdamW learning rate after warm-up.")] = 1e-4,
    warmup: Annotated[int, typer.Option(min=0, help="Steps of linear learning-rate warm-up.")] = 500,
    weight_decay: Annotated[float, typer.Option(min=0)] = 0.0,
    grad_clip: Annotated[float, typer.Option(min=0, help="Clip the gradient's norm to this.")] = 1.0,
    ema_decay: Annotated[float, typer.Option(min=0, max=1, help="EMA of the weights (what the run folder holds).")] = 0.9999,
    task_weight: Annotated[float, typer.Option(min=0, help="Weight of |ε_s − ε|² on draws whose true noise is a target.")] = 1.0,
    kd_weight: Annotated[float, typer.Option(min=0, help="Weight of |ε_s − ε_T|²; 0 trains without the teacher.")] = 1.0,
    min_snr: Annotated[Optional[float], typer.Option(min=0, help="Min-SNR-γ timestep weighting (e.g. 5).")] = None,
    high_noise_weight: Annotated[Optional[float], typer.Option(min=1, help="Weight draws by min(1/ᾱ_t, γ): counts high-noise draws, where the caption decides the image, up to γ times more (e.g. 5).")] = None,
    synthetic_weight: Annotated[float, typer.Option(min=0, help="Scales the loss (task and KD) of synthetic records' draws (labels made with --synthesize).")] = 1.0,
    holdout: Annotated[float, typer.Option(min=0, max=0.99, help="Fraction of records held out for `sdit eval`.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seeds the data order, the held-out split and a fresh student.")] = 0,
    buffer_records: Annotated[int, typer.Option(min=1, help="Records in the shuffle window.")] = 1024,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Steps between checkpoints.")] = 1000,
    keep_checkpoints: Annotated[int, typer.Option(min=1, help="Checkpoints kept.")] = 3,
    sample_every: Annotated[int, typer.Option(min=0, help="Steps between sample grids (0: at the end only).")] = 0,
    sample_prompts: Annotated[int, typer.Option(min=1, help="Captions in a sample grid (the store's first).")] = 8,
    gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute activations in the backward pass: less memory, ~30% slower.")] = False,
    precision: Annotated[str, typer.Option(help="auto (bf16 autocast on GPU, fp32 on CPU), fp32 or bf16.")] = "auto",
    device: Device = "auto",
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
):
    """Train the student from the store alone (the teacher's UNet is never loaded). Data-parallel under torchrun."""
    from pipeline.train import TrainConfig, train as run_train

    config = TrainConfig(store=store, out=out, labels=labels, init=init, student=student, teacher=teacher,
                         teacher_config=teacher_config, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
                         weight_decay=weight_decay, grad_clip=grad_clip, ema_decay=ema_decay,
                         task_weight=task_weight, kd_weight=kd_weight, min_snr=min_snr,
                         high_noise_weight=high_noise_weight, synthetic_weight=synthetic_weight, holdout=holdout,
                         seed=seed, buffer_records=buffer_records, checkpoint_every=checkpoint_every,
                         keep_checkpoints=keep_checkpoints, sample_every=sample_every, sample_prompts=sample_prompts,
                         gradient_checkpointing=gradient_checkpointing, precision=precision, device=device,
                         resume=resume)
    main = int(os.environ.get("RANK", 0)) == 0
    with progress_bar("train", "step") as bar:
        bar.total, bar.disable = steps, bar.disable or not main

        def on_step(m: dict) -> None:
            bar.set_postfix_str(f"loss {m['loss']:.4f} task {_fmt(m['task_loss'])} kd {m['kd_loss']:.4f} "
                                f"{m['samples_per_s']:.0f} draws/s", refresh=False)
            bar.update(m["step"] - bar.n)

        summary = run_train(config, on_step)
    if main:
        typer.echo(f"trained {summary['steps']} steps in {summary['seconds']:.0f} s into {out} "
                   f"(samples: {summary['samples']}; metrics: {out}/metrics.jsonl; loss curve: {out}/loss.png)")


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


# --- benchmarks -----------------------------------------------------------------------------------------
@bench_app.command("encode")
@command
def bench_encode(
    source: Annotated[Optional[str], typer.Argument(help="Data to encode [default: generated images].")] = None,
    teacher: BenchTeacher = None,
    teacher_config: TeacherConfig = None,
    images: Annotated[int, typer.Option(min=8, help="Generated images in the small run; the large run has twice as many.")] = 1024,
    resolution: Annotated[int, typer.Option(help="Image side.")] = 128,
    batch_size: BatchSize = 32,
    shard_size: Annotated[int, typer.Option(min=1, help="Source items per shard.")] = 512,
    device: Device = "auto",
    dtype: DType = "auto",
    json_out: JsonOut = None,
):
    """Records/s of `sdit encode` against the bare VAE + text-encoder forward, and peak RSS at two sizes."""
    from pipeline.bench.encode import BenchEncodeConfig, bench_encode as run, format_table

    result = run(BenchEncodeConfig(source=source, teacher=teacher, teacher_config=teacher_config, images=images,
                                   resolution=resolution, batch_size=batch_size, shard_size=shard_size,
                                   device=device, dtype=dtype))
    _report(format_table(result), result, json_out)


@bench_app.command("label")
@command
def bench_label(
    store: Annotated[Optional[str], typer.Argument(help="An encoded store [default: generated images].")] = None,
    teacher: BenchTeacher = None,
    teacher_config: TeacherConfig = None,
    images: Annotated[int, typer.Option(min=1, help="Generated images to label.")] = 256,
    draws: Annotated[int, typer.Option(min=1, help="Labelled draws per record.")] = 4,
    batch_size: BatchSize = 64,
    project_images: Annotated[int, typer.Option(min=1, help="Images for the projected wall time.")] = 1_000_000,
    project_draws: Annotated[int, typer.Option(min=1, help="Draws per image for the projected wall time.")] = 4,
    device: Device = "auto",
    dtype: DType = "auto",
    json_out: JsonOut = None,
):
    """Draws/s of `sdit teacher-label` against the bare UNet forward, bytes per draw, FLOP rate."""
    from pipeline.bench.label import BenchLabelConfig, bench_label as run, format_label_table

    result = run(BenchLabelConfig(store=store, teacher=teacher, teacher_config=teacher_config, images=images,
                                  draws=draws, batch_size=batch_size, project_images=project_images,
                                  project_draws=project_draws, device=device, dtype=dtype))
    _report(format_label_table(result), result, json_out)


# --- sampling and evaluation ----------------------------------------------------------------------------
Run = Annotated[str, typer.Argument(help="A run folder (from `sdit init` or `sdit train`).")]
Steps = Annotated[int, typer.Option(min=1, help="Denoising steps.")]
Guidance = Annotated[float, typer.Option(min=0, help="Classifier-free guidance scale w (1: no guidance).")]
Scheduler = Annotated[str, typer.Option(help="Sampler: ddim, dpm++ (DPM-Solver++ multistep), euler, pndm or ddpm.")]


@bench_app.command("train")
@command
def bench_train(
    store: Annotated[Optional[str], typer.Argument(help="A labelled store [default: generated images, encoded and labelled].")] = None,
    teacher: BenchTeacher = None,
    teacher_config: TeacherConfig = None,
    student: Annotated[str, typer.Option("--student", "-s", help="Student preset to time.")] = "SDiT-T/2",
    images: Annotated[int, typer.Option(min=8, help="Generated images in the default store.")] = 512,
    batch_size: Annotated[int, typer.Option(min=1, help="Draws per step.")] = 64,
    steps: Annotated[int, typer.Option(min=1, help="Timed steps per measurement.")] = 20,
    device: Device = "auto",
    json_out: JsonOut = None,
):
    """Steps/s from the store vs from memory, offline vs online distillation, and FLOPs per step of each preset."""
    from pipeline.bench.train import BenchTrainConfig, bench_train as run, format_train_table

    result = run(BenchTrainConfig(store=store, teacher=teacher, teacher_config=teacher_config, student=student,
                                  images=images, batch_size=batch_size, steps=steps, device=device))
    _report(format_train_table(result), result, json_out)


@bench_app.command("distill")
@command
def bench_distill(
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for the data, store, runs and report.")] = "runs/distill",
    teacher: Annotated[Optional[str], typer.Option("--teacher", "-t", help="Teacher [default: the toy teacher in data/toy-sd].")] = None,
    runs: Annotated[str, typer.Option(help="Comma-separated: no_teacher, kd, kd_perturb, kd_synth.")] = "no_teacher,kd,kd_perturb,kd_synth",
    synth_samples: Annotated[int, typer.Option(min=1, help="kd_synth: teacher samples per prompt of the bank.")] = 1,
    records: Annotated[int, typer.Option(min=1, help="Records in the limited split.")] = 1000,
    draws: Annotated[int, typer.Option(min=1, help="Teacher draws per record.")] = 8,
    student: Annotated[str, typer.Option("--student", "-s", help="Student preset of every run.")] = "SDiT-T/2",
    steps: Annotated[int, typer.Option(min=1, help="Training steps of every run.")] = 2000,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    lr: Annotated[float, typer.Option(min=0)] = 1e-3,
    high_noise_weight: Annotated[float, typer.Option(min=0, help="Every run's `train --high-noise-weight` (0: off).")] = 5.0,
    per_prompt: Annotated[int, typer.Option(min=1, help="Samples per evaluation prompt (96 held-out, 120 seen prompts).")] = 2,
    sample_steps: Annotated[int, typer.Option(min=1, help="DDIM steps of every sample.")] = 25,
    guidance: Annotated[float, typer.Option(min=0, help="Classifier-free guidance of every sample.")] = 3.0,
    perturb: Annotated[Optional[str], typer.Option(help="The kd_perturb run's mix, e.g. none=0.4,input=0.1,swap=0.3,mix=0.1,null=0.1.")] = None,
    caption_min_t: Annotated[int, typer.Option(min=0, help="Swap and mix captions only at timesteps from here up.")] = 400,
    seed: Annotated[int, typer.Option()] = 0,
    json_out: JsonOut = None,
):
    """The shapes world: students with and without the teacher on limited data, scored on held-out concepts."""
    from pipeline.bench.distill import TOY_TEACHER, DistillConfig, distill, format_report
    from sdit.perturb import PerturbConfig

    mix = PerturbConfig.parse(perturb, caption_min_t=caption_min_t) if perturb else PerturbConfig(
        caption_min_t=caption_min_t)
    config = DistillConfig(out=out, teacher=teacher or str(TOY_TEACHER), runs=tuple(runs.split(",")), records=records,
                           draws=draws, student=student, steps=steps, batch_size=batch_size, lr=lr,
                           per_prompt=per_prompt, sample_steps=sample_steps, guidance=guidance, seed=seed,
                           high_noise_weight=high_noise_weight or None,
                           perturb=mix, synth_samples=synth_samples)
    bar = None

    def stage(name: str) -> None:
        nonlocal bar
        if bar is not None:
            bar.close()
        typer.echo(name, err=True)
        bar = progress_bar(name, "step") if name.startswith("train") else None
        if bar is not None:
            bar.total = steps

    def on_step(m: dict) -> None:
        bar.set_postfix_str(f"loss {m['loss']:.4f}", refresh=False)
        bar.update(m["step"] - bar.n)

    report = distill(config, stage, on_step)
    if bar is not None:
        bar.close()
    _report(format_report(report), {"runs": report["runs"], "teacher": report["teacher"]}, json_out)
    typer.echo(f"grid: {out}/grid.png (teacher row, then one row per run); report: {out}/report.md")


@app.command()
@command
def sample(
    run: Run,
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for the PNGs and grid.png.")],
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="A prompt (repeatable).")] = None,
    prompts_file: Annotated[Optional[str], typer.Option(help="A text file of prompts, one a line.")] = None,
    negative_prompt: Annotated[Optional[str], typer.Option(help="Replaces the empty caption of the guidance's unconditional branch.")] = None,
    num_images: Annotated[int, typer.Option(min=1, help="Images per prompt.")] = 1,
    height: Annotated[Optional[int], typer.Option(help="Pixels, a multiple of VAE factor x patch size [default: the student's training size].")] = None,
    width: Annotated[Optional[int], typer.Option(help="Pixels, as --height.")] = None,
    steps: Steps = 25,
    guidance: Guidance = 7.5,
    scheduler: Scheduler = "ddim",
    seed: Annotated[int, typer.Option(help="Image i uses seed + i, whatever the batch size.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 8,
    compare_teacher: Annotated[Optional[str], typer.Option(help="Also sample this SD teacher from the same prompts, seeds, noise, scheduler and steps; the grid shows a student row above a teacher row.")] = None,
    teacher_config: TeacherConfig = None,
    device: Device = "auto",
    dtype: DType = "auto",
):
    """Images from a run folder: one PNG each (prompt and settings in its text chunk) and a captioned grid."""
    from pipeline.sample import SampleConfig, sample as run_sample

    config = SampleConfig(run=run, out=out, prompts=tuple(prompt or ()), prompts_file=prompts_file,
                          negative_prompt=negative_prompt, num_images=num_images, height=height, width=width,
                          steps=steps, guidance=guidance, scheduler=scheduler, seed=seed, batch_size=batch_size,
                          compare_teacher=compare_teacher, teacher_config=teacher_config, device=device, dtype=dtype)
    with progress_bar("sample", "image") as bar:
        summary = run_sample(config, progress=bar.update, on_total=lambda n: setattr(bar, "total", n))
    typer.echo(summary.line())


@app.command("inspect")
@command
def inspect_store(
    store: Annotated[str, typer.Argument(help="A store (from `sdit encode`, with `sdit teacher-label --synthesize`).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for the PNGs and grid.png.")],
    synthetic: Annotated[bool, typer.Option(help="The teacher's samples (synthetic records) rather than the encoded images.")] = False,
    limit: Annotated[int, typer.Option(min=1, help="Decode the first N records of the group.")] = 32,
    vae: Annotated[Optional[str], typer.Option(help="A teacher or run folder whose VAE decodes [default: the store's teacher].")] = None,
    teacher_config: TeacherConfig = None,
    columns: Annotated[int, typer.Option(min=1, help="Images per row of the grid.")] = 8,
    device: Device = "auto",
):
    """Decode a store's latents to images: what the student will learn from."""
    from pipeline.synthesize import InspectConfig, inspect_store as run_inspect

    config = InspectConfig(store=store, out=out, synthetic=synthetic, limit=limit, vae=vae,
                           teacher_config=teacher_config, columns=columns, device=device)
    with progress_bar("inspect", "image") as bar:
        summary = run_inspect(config, progress=bar.update)
    typer.echo(f"wrote {summary['images']} images to {summary['out']} (grid: {summary['grid']})")


@app.command("eval")
@command
def evaluate(
    run: Run,
    store: Annotated[str, typer.Argument(help="The labelled store the run was trained on.")],
    labels: Annotated[Optional[str], typer.Option(help="Which labels of the store [default: the run's].")] = None,
    holdout: Annotated[Optional[float], typer.Option(min=0, max=0.99, help="Held-out fraction of records [default: the run's --holdout].")] = None,
    split_seed: Annotated[Optional[int], typer.Option(help="Seed of the held-out split [default: the run's].")] = None,
    buckets: Annotated[int, typer.Option(min=1, help="Timestep buckets of equal width.")] = 10,
    batch_size: BatchSize = 64,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Evaluate at most this many held-out draws.")] = None,
    clip_model: Annotated[Optional[str], typer.Option(help="A transformers CLIPModel folder on local disk: adds the CLIP score.")] = None,
    references: Annotated[Optional[str], typer.Option(help="Images with captions (folder or parquet): captions to sample, images to score as a reference.")] = None,
    samples: Annotated[int, typer.Option(min=1, help="Reference captions to sample for the CLIP score.")] = 64,
    steps: Steps = 25,
    guidance: Guidance = 7.5,
    scheduler: Scheduler = "ddim",
    seed: Annotated[int, typer.Option(help="Image i of the CLIP score uses seed + i.")] = 0,
    device: Device = "auto",
    dtype: Annotated[str, typer.Option(help="The student's: fp32, fp16 or bf16.")] = "fp32",
    json_out: JsonOut = None,
):
    """How close the student is to its teacher: ε MSE on held-out labelled draws, by timestep and perturbation."""
    from pipeline.evaluate import EvalConfig, evaluate as run_eval, format_eval

    config = EvalConfig(run=run, store=store, labels=labels, holdout=holdout, split_seed=split_seed, buckets=buckets,
                        batch_size=batch_size, limit=limit, device=device, dtype=dtype, clip_model=clip_model,
                        references=references, samples=samples, steps=steps, guidance=guidance, scheduler=scheduler,
                        seed=seed)
    with progress_bar("eval", "draw") as bar:
        result = run_eval(config, progress=bar.update, on_total=lambda n: setattr(bar, "total", n))
    _report(format_eval(result), result, json_out)


@bench_app.command("sample")
@command
def bench_sample(
    run: Annotated[Optional[str], typer.Argument(help="A run folder [default: an untrained --student beside the teacher].")] = None,
    teacher: Annotated[Optional[str], typer.Option(help="Teacher [default: the run's, or a tiny random SD-shaped one].")] = None,
    teacher_config: TeacherConfig = None,
    student: Annotated[str, typer.Option("--student", "-s", help="Preset of the default student.")] = "SDiT-T/2",
    images: Annotated[int, typer.Option(min=1, help="Images per timed run, in one batch.")] = 8,
    steps: Steps = 20,
    scheduler: Scheduler = "ddim",
    guidance: Guidance = 7.5,
    resolution: Annotated[Optional[int], typer.Option(help="Image side in pixels [default: the student's].")] = None,
    preset: Annotated[Optional[list[str]], typer.Option("--preset", help="Presets of the FLOPs table (repeatable) [default: SDiT-S/2, B/2, L/2, XL/2].")] = None,
    device: Device = "auto",
    dtype: DType = "auto",
    json_out: JsonOut = None,
):
    """Images/s of the student against the teacher, and FLOPs per sampling step at SD 1.5's size for each preset."""
    from pipeline.bench.sample import BenchSampleConfig, bench_sample as run_bench, format_sample_table

    options = {"presets": tuple(preset)} if preset else {}
    result = run_bench(BenchSampleConfig(run=run, teacher=teacher, teacher_config=teacher_config, student=student,
                                   images=images, steps=steps, scheduler=scheduler, guidance=guidance,
                                   resolution=resolution, device=device, dtype=dtype, **options))
    _report(format_sample_table(result), result, json_out)


if __name__ == "__main__":
    app()
