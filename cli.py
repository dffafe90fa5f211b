"""`sdit`: one thin command per stage. Options -> a frozen config -> one pipeline function.

Starting is quick: option defaults and choices come from torch-free config modules, and each command imports the
stage it runs (torch, diffusers, transformers) only when it runs. Every mistake a user can make prints one line on
stderr, `error: ...`, and exits 2: usage errors (a bad number, choice or option) and SDiTError from the library
alike; set SDIT_DEBUG=1 for the traceback.
"""

import contextlib
import dataclasses
import errno
import functools
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

# Option defaults and choices come from torch-free config modules, never typed here twice; each command imports
# the stage it runs (torch, diffusers, transformers) only when it runs.
from pipeline.bench.config import (
    SD15_STAGES,
    BenchEncodeConfig,
    BenchLabelConfig,
    BenchRayEncodeConfig,
    BenchSampleConfig,
    BenchTrainConfig,
    MemoryConfig,
    Sd15Config,
)
from pipeline.config import (
    LR_SCHEDULES,
    TIMESTEP_SAMPLING,
    EncodeConfig,
    EvalConfig,
    InitConfig,
    InspectConfig,
    LabelConfig,
    SampleConfig,
    TrainConfig,
)
from pipeline.experiments.config import DistillConfig, SubstitutionConfig
from sdit.config import SCHEDULERS, TOY_TEACHER, PerturbConfig, SynthesisConfig
from sdit.console import (
    ADVANCED,
    COLUMNS,
    HARDWARE,
    LOSS,
    MONITOR,
    PERTURB,
    SAMPLING,
    SCALE,
    SCHEDULE,
    SYNTH,
    command_line,
    typer_app,
)
from sdit.errors import SDiTError
from sdit.presets import PRESETS
from sdit.progress import advance_to, progress_bar
from sdit.shapes import config as toy

app = typer_app(name="sdit", help="Distil a Stable Diffusion teacher into a Diffusion Transformer.")
bench_app = typer_app(help="Measure a stage's speed and memory, and run the shapes-world experiments.")


def _version(value: bool) -> None:
    if value:
        import sdit

        typer.echo(f"sdit {sdit.__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                   help="Print the version and exit.")] = False) -> None:
    """Distil a Stable Diffusion teacher into a Diffusion Transformer."""


app.add_typer(bench_app, name="bench")

# --- shared options -------------------------------------------------------------------------------------
Teacher = Annotated[str, typer.Option("--teacher", "-t", help="SD model: a diffusers folder or a .safetensors/.ckpt file.")]
TeacherConfig = Annotated[Optional[str], typer.Option(rich_help_panel=ADVANCED,
    help="Diffusers folder whose configs describe a single-file teacher (default: SD 1.5's, shipped in data/).")]
Device = Annotated[str, typer.Option(rich_help_panel=HARDWARE, help="auto (CUDA when there is one), cpu, cuda or cuda:N.")]
DType = Annotated[str, typer.Option(rich_help_panel=HARDWARE, help="auto (fp32 on CPU, fp16 on GPU), fp32, fp16 or bf16.")]
BatchSize = Annotated[int, typer.Option(min=1, rich_help_panel=HARDWARE, help="Records per model forward.")]
RayAddress = Annotated[Optional[str], typer.Option(rich_help_panel=SCALE,
    help="Run shards on Ray: 'local' starts one for this run; 'auto' or 'ray://host:port' joins a cluster.")]
NumWorkers = Annotated[Optional[int], typer.Option(min=1, rich_help_panel=SCALE, help="Ray actors (default: one per GPU, else per CPU).")]
JsonOut = Annotated[Optional[Path], typer.Option("--json", help="Also write the figures to this JSON file.")]
BenchTeacher = Annotated[Optional[str], typer.Option(help="Teacher (default: a tiny random SD-shaped one).")]
# Choices are listed from the registries; the library checks them and refuses others in one line.
PRESET_NAMES = ", ".join(PRESETS)
Student = Annotated[str, typer.Option("--student", "-s", help=f"Student preset: {PRESET_NAMES}.")]
Scheduler = Annotated[str, typer.Option(help=f"Sampler: {', '.join(SCHEDULERS)}.")]
TextPositions = Annotated[Optional[int], typer.Option(min=2,
    help="The student's cross-attention reads only the first N of the text encoder's 77 positions (start token, "
         "caption, end token, padding): cheaper when every caption is shorter. Training refuses a store with a "
         "longer caption. Default: all.")]


def _quiet_libraries() -> None:
    """diffusers and transformers print load-time warnings and progress bars that say nothing to our users."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # teachers load from local disk, never from a hub
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def command(fn):
    """Register a command that reports SDiTError in one line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except SDiTError as err:
            if os.environ.get("SDIT_DEBUG"):
                raise
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
        except OSError as err:
            if err.errno not in DISK_FULL or os.environ.get("SDIT_DEBUG"):
                raise
            typer.echo(f"error: the disk is full or the file too large ({os.strerror(err.errno)}: "
                       f"{err.filename or 'a write'}); finished shards and checkpoints are kept: free space and "
                       "rerun the same command", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: finished shards and checkpoints are kept; rerun the same command "
                       "(`sdit train`: with --resume) to go on", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise SDiTError(f"{option} {text!r}: give whole numbers separated by commas, e.g. 250,500,1000") from None


def _names(text: str) -> tuple[str, ...]:
    """A comma-separated list; "" is none."""
    return tuple(filter(None, (part.strip() for part in text.split(","))))


def _report(table: str, result: dict, json_out: Optional[Path]) -> None:
    """A command's table on the terminal, and its figures as JSON when asked, with the command that made them."""
    typer.echo(table)
    if json_out:
        from pipeline.bench import write_json

        write_json({"command": command_line(), **result}, json_out)


def _main_process() -> bool:
    from pipeline.train import Workers

    return Workers.from_env().main


# --- stage one ------------------------------------------------------------------------------------------
@app.command()
@command
def encode(
    source: Annotated[str, typer.Argument(help="Image folder (+ .txt or metadata.jsonl/csv/parquet), parquet file(s), or webdataset .tar shard(s).")],
    teacher: Teacher,
    out: Annotated[str, typer.Option("--out", "-o", help="Store to write: a folder or an fsspec URL.")],
    teacher_config: TeacherConfig = None,
    prompt_bank: Annotated[Optional[str], typer.Option(help="Text-only prompts the teacher is asked about: a text file (one a line) or parquet.")] = None,
    prompt_column: Annotated[str, typer.Option(rich_help_panel=COLUMNS, help="Column of a parquet prompt bank.")] = EncodeConfig.prompt_column,
    resolution: Annotated[Optional[int], typer.Option(help="Square image side after resize and centre crop, a multiple of 8 (default: the teacher VAE's sample_size, 512 for SD 1.5).")] = None,
    min_size: Annotated[Optional[int], typer.Option(help="Reject images whose short side is smaller (default: resolution/4).")] = None,
    batch_size: BatchSize = EncodeConfig.batch_size,
    shard_size: Annotated[int, typer.Option(min=1, rich_help_panel=ADVANCED, help="Source items per shard (the unit of work and of resume).")] = EncodeConfig.shard_size,
    limit: Annotated[Optional[int], typer.Option(rich_help_panel=ADVANCED, min=0, help="Encode only the first N source items.")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Stop at the first rejected input instead of skipping it.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete an existing store at --out and start again.")] = False,
    device: Device = EncodeConfig.device,
    dtype: DType = EncodeConfig.dtype,
    image_column: Annotated[str, typer.Option(rich_help_panel=COLUMNS, help="Parquet: the image struct column.")] = EncodeConfig.image_column,
    caption_column: Annotated[str, typer.Option(rich_help_panel=COLUMNS, help="Parquet/metadata: the caption column.")] = EncodeConfig.caption_column,
    id_column: Annotated[Optional[str], typer.Option(rich_help_panel=COLUMNS, help="Parquet: a column of record ids.")] = None,
    caption_key: Annotated[Optional[str], typer.Option(rich_help_panel=COLUMNS, help="Webdataset .json: the caption key (default: caption, then text).")] = None,
    ray_address: RayAddress = None,
    num_workers: NumWorkers = None,
):
    """Encode image-caption pairs into a store: scaled VAE latents and CLIP text embeddings."""
    from pipeline.encode import encode as run_encode

    config = EncodeConfig(source=source, teacher=teacher, out=out, teacher_config=teacher_config, prompts=prompt_bank,
                          prompt_column=prompt_column, min_size=min_size, batch_size=batch_size,
                          shard_size=shard_size, limit=limit, strict=strict, overwrite=overwrite, device=device,
                          dtype=dtype, image_column=image_column, caption_column=caption_column, id_column=id_column,
                          caption_key=caption_key, ray_address=ray_address, num_workers=num_workers,
                          **({} if resolution is None else {"resolution": resolution}))
    with progress_bar("encode", "item") as bar:
        summary = run_encode(config, progress=bar.update, on_total=lambda n: setattr(bar, "total", n))
    typer.echo(summary.line())


@app.command("teacher-label")
@command
def teacher_label(
    store: Annotated[str, typer.Argument(help="An encoded store (from `sdit encode`).")],
    teacher: Teacher,
    teacher_config: TeacherConfig = None,
    labels: Annotated[str, typer.Option(help="Name of this labelling: labels/NAME in the store.")] = LabelConfig.name,
    draws: Annotated[int, typer.Option(min=1, help="Labelled draws per record.")] = LabelConfig.draws,
    timesteps: Annotated[str, typer.Option(help=f"{' or '.join(TIMESTEP_SAMPLING)}: stratified spreads a record's draws across [0, T).")] = LabelConfig.timesteps,
    perturb: Annotated[Optional[str], typer.Option(help="Perturbation mix, e.g. none=0.4,input=0.1,swap=0.3,mix=0.1,null=0.1, or a .json config file (default: that mix).")] = None,
    input_gamma: Annotated[float, typer.Option(rich_help_panel=PERTURB, min=0, help="γ of input perturbation: the input uses ε + γ·ξ.")] = PerturbConfig.input_gamma,
    caption_min_t: Annotated[int, typer.Option(rich_help_panel=PERTURB, min=0, help="Swap and mix captions only at timesteps from here up.")] = PerturbConfig.caption_min_t,
    prompt_share: Annotated[float, typer.Option(rich_help_panel=PERTURB, min=0, max=1, help="Share of swap/mix captions from the prompt bank.")] = PerturbConfig.prompt_share,
    guidance: Annotated[Optional[str], typer.Option(help="W_MIN:W_MAX: store guided targets ε_u + w(ε_c − ε_u) for a w drawn per draw, and that w.")] = None,
    guidance_conditional: Annotated[float, typer.Option(min=0, max=1, help="With --guidance: this share of draws takes w = 1, the teacher's conditional ε, on which the student learns the true noise too.")] = LabelConfig.guidance_conditional,
    fresh_guidance: Annotated[bool, typer.Option("--fresh-guidance", help="With --guidance: keep ε_c and ε_u of each draw (one more fp16 array, no more teacher forwards), so that training draws w afresh each time it reads a draw.")] = False,
    seed: Annotated[int, typer.Option(help="Same seed, same draws, whatever the executor or batch size.")] = LabelConfig.seed,
    batch_size: BatchSize = LabelConfig.batch_size,
    max_dropped: Annotated[float, typer.Option(rich_help_panel=ADVANCED, min=0, max=1, help="Stop when more draws than this get a NaN/inf teacher output.")] = LabelConfig.max_dropped,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete labels of the same name and start again.")] = False,
    synthesize: Annotated[int, typer.Option(min=0, help="First sample the teacher N times per prompt of the store's prompt bank (synthetic records, store/synthetic), then label those too; 0: real records only.")] = 0,
    synth_steps: Annotated[int, typer.Option(rich_help_panel=SYNTH, min=1, help="Sampling steps of each synthetic record.")] = SynthesisConfig.steps,
    synth_guidance: Annotated[float, typer.Option(rich_help_panel=SYNTH, min=0, help="Classifier-free guidance of each synthetic record (1: none).")] = SynthesisConfig.guidance,
    synth_seed: Annotated[int, typer.Option(rich_help_panel=SYNTH, help="Seeds each synthetic record's initial noise from (seed, prompt, sample).")] = SynthesisConfig.seed,
    synth_scheduler: Annotated[Optional[str], typer.Option(rich_help_panel=SYNTH, help=f"Sampler of the synthetic records: {', '.join(SCHEDULERS)} (default: the teacher's own).")] = None,
    synth_trajectory: Annotated[bool, typer.Option("--synth-trajectory", rich_help_panel=SYNTH, help="Trajectory draws: stop each sample after --draws DDIM steps of --synth-steps and label the states it visited, with its caption; no finished image becomes a record.")] = False,
    device: Device = LabelConfig.device,
    dtype: DType = LabelConfig.dtype,
    ray_address: RayAddress = None,
    num_workers: NumWorkers = None,
):
    """Run the teacher's UNet once over a store: K draws per record (timestep, noise, perturbation) and ε_T.
    With --synthesize N it first samples the prompt bank into synthetic records and labels them as well."""
    from pipeline.label import label

    mix = PerturbConfig.from_option(perturb, input_gamma=input_gamma, caption_min_t=caption_min_t,
                                    prompt_share=prompt_share)
    if synth_trajectory and not synthesize:
        raise SDiTError("--synth-trajectory labels the teacher's own samples: give --synthesize N as well")
    synthesis = SynthesisConfig(samples=synthesize, steps=synth_steps, guidance=synth_guidance, seed=synth_seed,
                                scheduler=synth_scheduler, trajectory=draws if synth_trajectory else 0) \
        if synthesize else None
    config = LabelConfig(store=store, teacher=teacher, teacher_config=teacher_config, name=labels, draws=draws,
                         timesteps=timesteps, perturb=mix, guidance=LabelConfig.parse_guidance(guidance),
                         guidance_conditional=guidance_conditional, guidance_fresh=fresh_guidance, seed=seed,
                         batch_size=batch_size,
                         max_dropped=max_dropped, overwrite=overwrite, device=device, dtype=dtype,
                         ray_address=ray_address, num_workers=num_workers, synthesis=synthesis)
    with progress_bar("teacher-label", "draw") as bar:

        def on_stage(name: str, total: int) -> None:
            bar.reset(total)
            bar.set_description(name)
            bar.unit = "sample" if name == "synthesize" else "draw"

        counts = label(config, progress=bar.update, on_stage=on_stage)
    kinds = ", ".join(f"{k} {v}" for k, v in counts["kinds"].items())
    typer.echo(f"labelled {counts['draws']} draws in {counts['shards']} shards into {store}/labels/{labels} "
               f"({kinds}; {counts['dropped']} dropped; {counts['bytes_per_draw']:.0f} bytes a draw written, "
               f"{counts['read_bytes_per_draw']:.0f} read, {counts['caption_bytes_per_draw']:.0f} of them for swapped "
               "captions)")
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
    student: Student,
    out: Annotated[str, typer.Option("--out", "-o", help="Run folder to write.")],
    teacher_config: TeacherConfig = None,
    sample_size: Annotated[Optional[int], typer.Option(min=1, help="Latent side the student is built for (default: the teacher UNet's).")] = None,
    guidance_embed: Annotated[bool, typer.Option("--guidance-embed", help="A guidance-distilled student: it takes the CFG scale w (for guided labels).")] = False,
    guidance_linear: Annotated[bool, typer.Option("--guidance-linear", help="With --guidance-embed: w scales a second output head, ε = u + w·d, as the teacher's ε_u + w(ε_c − ε_u), rather than entering through an embedding.")] = False,
    text_positions: TextPositions = None,
    seed: Annotated[int, typer.Option(help="Seed of the student's initial weights.")] = InitConfig.seed,
):
    """Write an untrained run folder: a fresh student beside the teacher's VAE, text encoder, tokenizer and scheduler."""
    from pipeline.init import init as run_init

    summary = run_init(InitConfig(teacher=teacher, student=student, out=out, teacher_config=teacher_config,
                                  sample_size=sample_size, guidance_embed=guidance_embed,
                                  guidance_linear=guidance_linear, text_positions=text_positions, seed=seed))
    typer.echo(summary.line())


@app.command()
@command
def train(
    ctx: typer.Context,
    store: Annotated[str, typer.Argument(help="A labelled store (from `sdit teacher-label`).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Run folder: the student pipeline, checkpoints, metrics, samples.")],
    init: Annotated[Optional[str], typer.Option(help="Start from this run folder (from `sdit init`).")] = None,
    student: Annotated[Optional[str], typer.Option("--student", "-s", help=f"Or start a fresh student of this preset ({PRESET_NAMES} (`sdit init` for the store's teacher, then train).")] = None,
    teacher: Annotated[Optional[str], typer.Option("--teacher", "-t", help="With --student: the teacher whose VAE and text encoder go into the run (default: the store's).")] = None,
    teacher_config: TeacherConfig = None,
    labels: Annotated[str, typer.Option(help="Which labels of the store: labels/NAME.")] = TrainConfig.labels,
    steps: Annotated[int, typer.Option(min=1, help="Optimiser steps in all (a resumed run may raise it).")] = TrainConfig.steps,
    batch_size: Annotated[int, typer.Option(min=1, help="Draws per step, over all workers.")] = TrainConfig.batch_size,
    grad_accum: Annotated[int, typer.Option(rich_help_panel=HARDWARE, min=1, help="Split each worker's share of --batch-size into this many forward-backward passes, gradients summed before the step: the same step in less memory.")] = TrainConfig.grad_accum,
    lr: Annotated[float, typer.Option(min=0, help="AdamW learning rate after warm-up.")] = TrainConfig.lr,
    warmup: Annotated[int, typer.Option(rich_help_panel=SCHEDULE, min=0, help="Steps of linear learning-rate warm-up.")] = TrainConfig.warmup,
    lr_schedule: Annotated[str, typer.Option(rich_help_panel=SCHEDULE, help=f"After the warm-up: {', '.join(LR_SCHEDULES)} (both decay to 0 at --steps, so a resume that raises --steps stretches the decay).")] = TrainConfig.lr_schedule,
    weight_decay: Annotated[float, typer.Option(rich_help_panel=SCHEDULE, min=0, help="AdamW's decoupled weight decay.")] = TrainConfig.weight_decay,
    grad_clip: Annotated[float, typer.Option(rich_help_panel=SCHEDULE, min=0, help="Clip the gradient's norm to this.")] = TrainConfig.grad_clip,
    ema_decay: Annotated[float, typer.Option(rich_help_panel=SCHEDULE, min=0, max=1, help="EMA of the weights (what the run folder holds).")] = TrainConfig.ema_decay,
    task_weight: Annotated[float, typer.Option(rich_help_panel=LOSS, min=0, help="Weight of |ε_s − ε|² on draws whose true noise is a target.")] = TrainConfig.task_weight,
    kd_weight: Annotated[float, typer.Option(rich_help_panel=LOSS, min=0, help="Weight of |ε_s − ε_T|²; 0 trains without the teacher.")] = TrainConfig.kd_weight,
    min_snr: Annotated[float, typer.Option(rich_help_panel=LOSS, min=0, help="Min-SNR-γ timestep weighting (e.g. 5); 0: off.")] = TrainConfig.min_snr,
    high_noise_weight: Annotated[float, typer.Option(rich_help_panel=LOSS, min=0, help="Weight draws by min(1/ᾱ_t, γ): counts high-noise draws, where the caption decides the image, up to γ times more (e.g. 5); 0: off.")] = TrainConfig.high_noise_weight,
    synthetic_weight: Annotated[float, typer.Option(rich_help_panel=LOSS, min=0, help="Scales the loss (task and KD) of synthetic records' draws (labels made with --synthesize).")] = TrainConfig.synthetic_weight,
    fresh_guidance_range: Annotated[Optional[str], typer.Option(rich_help_panel=LOSS, help="W_MIN:W_MAX: labels made with --fresh-guidance: draw each target's w from this window instead of the labels' own.")] = None,
    holdout: Annotated[float, typer.Option(min=0, max=0.99, help="Fraction of records held out for `sdit eval`.")] = TrainConfig.holdout,
    seed: Annotated[int, typer.Option(help="Seeds the data order, the held-out split and a fresh student.")] = TrainConfig.seed,
    buffer_records: Annotated[int, typer.Option(rich_help_panel=SCHEDULE, min=1, help="Records in the shuffle window.")] = TrainConfig.buffer_records,
    checkpoint_every: Annotated[int, typer.Option(rich_help_panel=SCHEDULE, min=1, help="Steps between checkpoints.")] = TrainConfig.checkpoint_every,
    keep_checkpoints: Annotated[int, typer.Option(rich_help_panel=SCHEDULE, min=1, help="Checkpoints kept.")] = TrainConfig.keep_checkpoints,
    sample_every: Annotated[int, typer.Option(rich_help_panel=MONITOR, min=0, help="Steps between sample grids (0: at the end only).")] = TrainConfig.sample_every,
    sample_prompts: Annotated[int, typer.Option(rich_help_panel=MONITOR, min=0, help="Captions in a sample grid (the store's first); 0: no grids.")] = TrainConfig.sample_prompts,
    eval_every: Annotated[int, typer.Option(rich_help_panel=MONITOR, min=0, help="Steps between evaluations of the EMA student on held-out draws (needs --holdout), logged to metrics.jsonl and the loss plot; 0: never.")] = TrainConfig.eval_every,
    eval_draws: Annotated[int, typer.Option(rich_help_panel=MONITOR, min=1, help="Held-out draws per evaluation (the same ones each time).")] = TrainConfig.eval_draws,
    eval_clip: Annotated[Optional[str], typer.Option(rich_help_panel=MONITOR, help="A CLIP model on local disk (a transformers CLIPModel folder, or an open_clip folder with open_clip_config.json): each evaluation also gives the CLIP score (torchmetrics' convention) of the EMA student's samples of the sample captions.")] = None,
    log: Annotated[str, typer.Option(rich_help_panel=MONITOR, help="jsonl (metrics.jsonl), or tensorboard: also event files in RUN/tensorboard (losses, lr, throughput, evaluations, sample grids).")] = TrainConfig.log,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", rich_help_panel=HARDWARE, help="Recompute activations in the backward pass: less memory, ~30% slower.")] = False,
    dtype: Annotated[str, typer.Option(rich_help_panel=HARDWARE, help="auto (bf16 autocast on GPU, fp32 on CPU), fp32 or bf16.")] = TrainConfig.precision,
    device: Device = TrainConfig.device,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")] = False,
    sample_steps: Annotated[int, typer.Option(rich_help_panel=MONITOR, min=1, help="Denoising steps of the sample grids.")] = TrainConfig.sample_steps,
    sample_guidance: Annotated[float, typer.Option(rich_help_panel=MONITOR, min=0, help="Classifier-free guidance scale of the sample grids (a guidance-distilled student takes it as w).")] = TrainConfig.sample_guidance,
    sample_scheduler: Annotated[str, typer.Option(rich_help_panel=MONITOR, help=f"Sampler of the sample grids: {', '.join(SCHEDULERS)}.")] = TrainConfig.sample_scheduler,
):
    """Train the student from the store alone (the teacher's UNet is never loaded). Data-parallel under torchrun."""
    from pipeline.train import train as run_train
    from pipeline.train_run import resume_config

    if (init is None) == (student is None) and not resume:
        raise SDiTError("give either --init RUN_FOLDER (from `sdit init`) or --student PRESET")
    options = dict(store=store, out=out, labels=labels, init=init, steps=steps, batch_size=batch_size, lr=lr,
                   grad_accum=grad_accum, warmup=warmup, lr_schedule=lr_schedule, weight_decay=weight_decay,
                   grad_clip=grad_clip, ema_decay=ema_decay,
                   task_weight=task_weight, kd_weight=kd_weight, min_snr=min_snr, high_noise_weight=high_noise_weight,
                   synthetic_weight=synthetic_weight, holdout=holdout, seed=seed, buffer_records=buffer_records,
                   fresh_guidance_range=LabelConfig.parse_guidance(fresh_guidance_range, "--fresh-guidance-range"),
                   checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, sample_every=sample_every,
                   sample_prompts=sample_prompts, sample_steps=sample_steps, sample_guidance=sample_guidance,
                   sample_scheduler=sample_scheduler, eval_every=eval_every, eval_draws=eval_draws,
                   eval_clip=eval_clip, log=log, gradient_checkpointing=gradient_checkpointing, precision=dtype,
                   device=device)
    if resume:  # the options the run records, with those given here on top; the library refuses what may not change
        source = lambda name: ctx.get_parameter_source("dtype" if name == "precision" else name).name  # noqa: E731
        given = (options | {"student": student}).items()
        config = resume_config(out, {k: v for k, v in given if source(k) in ("COMMANDLINE", "ENVIRONMENT")})
    else:
        config = TrainConfig(**options)
    make_run = None
    if student is not None:
        from pipeline.init import init_for_store

        make_run = functools.partial(init_for_store, store, labels, out, student, teacher=teacher,
                                     teacher_config=teacher_config, seed=seed)
    main = _main_process()
    with progress_bar("train", "step") as bar:
        bar.total, bar.disable = config.steps, bar.disable or not main

        def on_step(m: dict) -> None:
            held_out = f" held-out {m['eval_teacher_mse']:.4f}" if "eval_teacher_mse" in m else ""
            bar.set_postfix_str(f"loss {m['loss']:.4f} task {_fmt(m['task_loss'])} kd {m['kd_loss']:.4f} "
                                f"{m['samples_per_s']:.0f} draws/s{held_out}", refresh=False)
            advance_to(bar, m["step"])

        summary = run_train(config, on_step, make_run)
    if main:
        for note in summary["reset"]:
            typer.echo(f"resumed, but {note}", err=True)
        typer.echo(f"trained {summary['steps']} steps in {summary['seconds']:.0f} s into {out} "
                   f"(samples: {summary['samples']}; metrics: {out}/metrics.jsonl; loss curve: {out}/loss.png)")


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


# --- benchmarks -----------------------------------------------------------------------------------------
@bench_app.command("encode")
@command
def bench_encode(
    source: Annotated[Optional[str], typer.Argument(help="Data to encode (default: generated images).")] = None,
    teacher: BenchTeacher = None,
    teacher_config: TeacherConfig = None,
    images: Annotated[int, typer.Option(min=8, help="Generated images in the small run; the large run has twice as many.")] = BenchEncodeConfig.images,
    resolution: Annotated[int, typer.Option(help="Image side.")] = BenchEncodeConfig.resolution,
    batch_size: BatchSize = BenchEncodeConfig.batch_size,
    shard_size: Annotated[int, typer.Option(min=1, help="Source items per shard.")] = BenchEncodeConfig.shard_size,
    device: Device = BenchEncodeConfig.device,
    dtype: DType = BenchEncodeConfig.dtype,
    json_out: JsonOut = None,
):
    """Records/s of `sdit encode` against the bare VAE + text-encoder forward, and peak RSS at two sizes."""
    from pipeline.bench.encode import bench_encode as run
    from pipeline.bench.encode import format_table

    result = run(BenchEncodeConfig(source=source, teacher=teacher, teacher_config=teacher_config, images=images,
                                   resolution=resolution, batch_size=batch_size, shard_size=shard_size,
                                   device=device, dtype=dtype))
    _report(format_table(result), result, json_out)


@bench_app.command("ray-encode")
@command
def bench_ray_encode(
    images: Annotated[int, typer.Option(min=8, help="Generated images, in one Parquet file.")] = BenchRayEncodeConfig.images,
    workers: Annotated[int, typer.Option(min=1, help="Encoder actors of each engine.")] = BenchRayEncodeConfig.workers,
    cpus: Annotated[int, typer.Option(min=2, help="CPUs of the local Ray.")] = BenchRayEncodeConfig.cpus,
    json_out: JsonOut = None,
):
    """`sdit encode`'s actor pool against a Ray Data pipeline on the same Parquet source and the same local Ray."""
    from pipeline.bench.ray_encode import bench_ray_encode as run
    from pipeline.bench.ray_encode import format_table

    result = run(BenchRayEncodeConfig(images=images, workers=workers, cpus=cpus))
    _report(format_table(result), result, json_out)


@bench_app.command("label")
@command
def bench_label(
    store: Annotated[Optional[str], typer.Argument(help="An encoded store (default: generated images).")] = None,
    teacher: BenchTeacher = None,
    teacher_config: TeacherConfig = None,
    images: Annotated[int, typer.Option(min=1, help="Generated images to label.")] = BenchLabelConfig.images,
    draws: Annotated[int, typer.Option(min=1, help="Labelled draws per record.")] = BenchLabelConfig.draws,
    batch_size: BatchSize = BenchLabelConfig.batch_size,
    project_images: Annotated[int, typer.Option(min=1, help="Images for the projected wall time.")] = BenchLabelConfig.project_images,
    project_draws: Annotated[int, typer.Option(min=1, help="Draws per image for the projected wall time.")] = BenchLabelConfig.project_draws,
    device: Device = BenchLabelConfig.device,
    dtype: DType = BenchLabelConfig.dtype,
    json_out: JsonOut = None,
):
    """Draws/s of `sdit teacher-label` against the bare UNet forward, bytes per draw, FLOP rate."""
    from pipeline.bench.label import bench_label as run
    from pipeline.bench.label import format_label_table

    result = run(BenchLabelConfig(store=store, teacher=teacher, teacher_config=teacher_config, images=images,
                                  draws=draws, batch_size=batch_size, project_images=project_images,
                                  project_draws=project_draws, device=device, dtype=dtype))
    _report(format_label_table(result), result, json_out)


@bench_app.command("sd15")
@command
def bench_sd15(
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for the photographs, store, runs and samples.")] = Sd15Config.out,
    cache: Annotated[Optional[str], typer.Option(help="Where the random SD 1.5 is built once, in both layouts (default: $XDG_CACHE_HOME/sdit or ~/.cache/sdit).")] = None,
    records: Annotated[Optional[int], typer.Option(min=1, help=f"Photographs to encode (default: {Sd15Config.records}; on GPU 256).")] = None,
    resolution: Annotated[int, typer.Option(help="Image side in pixels (a multiple of 8 x the students' patch).")] = Sd15Config.resolution,
    draws: Annotated[Optional[int], typer.Option(min=1, help=f"Teacher draws per record (default: {Sd15Config.draws}; on GPU 4).")] = None,
    synthesize: Annotated[Optional[int], typer.Option(min=0, help=f"Teacher samples per prompt of the bank, 0: none (default: {Sd15Config.synthesize}).")] = None,
    student: Annotated[Optional[list[str]], typer.Option("--student", help=f"Students to init and train (repeatable) (default: {', '.join(Sd15Config.students)}).")] = None,
    speed_student: Annotated[Optional[list[str]], typer.Option("--speed-student", help=f"Students timed against the teacher (repeatable) (default: {', '.join(Sd15Config.speed_students)}; on GPU S/2 to XL/2).")] = None,
    train_steps: Annotated[Optional[int], typer.Option(min=1, help=f"(default: {Sd15Config.train_steps}; on GPU 20).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help=f"Training batch (default: {Sd15Config.batch_size}; on GPU 32).")] = None,
    speed_steps: Annotated[Optional[int], typer.Option(min=1, help=f"Sampling steps of each timed run side by side (default: {Sd15Config.speed_steps}).")] = None,
    speed_images: Annotated[Optional[int], typer.Option(min=1, help=f"Batch of the side-by-side timing (default: {Sd15Config.speed_images}; on GPU 8).")] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Timed rounds of the side-by-side sampling, the models taking turns; each model's fastest counts.")] = Sd15Config.repeats,
    stage: Annotated[Optional[list[str]], typer.Option("--stage", help=f"Stages to run after the teacher's (repeatable): {', '.join(SD15_STAGES)} (default: {', '.join(Sd15Config.stages)}; on GPU throughput instead of precision).")] = None,
    device: Annotated[str, typer.Option(rich_help_panel=HARDWARE, help="auto, cpu or cuda; on CUDA the same stages at real batch sizes, plus labels/s and train steps/s of S/2 to XL/2 at 256 and 512 px in bf16.")] = Sd15Config.device,
    dtype: DType = Sd15Config.dtype,
    json_out: JsonOut = None,
):
    """Every stage with SD 1.5's real architecture (seeded random weights, no download) at 512 px: time, peak RSS,
    GFLOP/s and output shapes per stage, the students' sampling speed against SD 1.5's, the precision paths."""
    from pipeline.bench.sd15 import bench_sd15 as run
    from pipeline.bench.sd15 import format_sd15_table

    options = {k: v for k, v in dict(records=records, draws=draws, synthesize=synthesize, train_steps=train_steps,
                                     batch_size=batch_size, speed_steps=speed_steps, speed_images=speed_images).items()
               if v is not None}
    options |= {"students": tuple(student)} if student else {}
    options |= {"speed_students": tuple(speed_student)} if speed_student else {}
    options |= {"stages": tuple(stage)} if stage else {}
    config = Sd15Config.for_device(device, out=out, cache=cache, resolution=resolution, dtype=dtype, repeats=repeats,
                                   **options)
    result = run(config, on_stage=lambda name: typer.echo(name, err=True))
    _report(format_sd15_table(result), result, json_out)


@bench_app.command("memory")
@command
def bench_memory(
    preset: Annotated[Optional[list[str]], typer.Option("--student", help=f"Students (repeatable) (default: {', '.join(MemoryConfig.presets)}).")] = None,
    batch: Annotated[Optional[list[int]], typer.Option("--batch", help=f"Batches (repeatable) (default: {', '.join(map(str, MemoryConfig.batches))}).")] = None,
    sample_size: Annotated[int, typer.Option(min=1, help="Latent side (64: 512 px).")] = MemoryConfig.sample_size,
    max_rss_gb: Annotated[float, typer.Option(min=1, help="Never run a step predicted to need more; extrapolate it.")] = MemoryConfig.max_rss_gb,
    max_step_seconds: Annotated[float, typer.Option(min=1, help="Nor one predicted to take longer.")] = MemoryConfig.max_step_seconds,
    json_out: JsonOut = None,
):
    """Peak memory of one training step of each student at 512 px, by batch, with and without gradient
    checkpointing, and the per-GPU batch it implies for 24, 40 and 80 GB."""
    from pipeline.bench.memory import bench_memory as run
    from pipeline.bench.memory import format_memory_table

    options = {"presets": tuple(preset)} if preset else {}
    options |= {"batches": tuple(batch)} if batch else {}
    result = run(MemoryConfig(sample_size=sample_size, max_rss_gb=max_rss_gb, max_step_seconds=max_step_seconds,
                              **options),
                 on_result=lambda r: typer.echo(f"{r['preset']} batch {r['batch']}{' ckpt' if r['checkpointing'] else ''}: "
                                                f"{r['step_gb']:.2f} GB" + ("" if r["measured"] else " (extrapolated)"),
                                                err=True))
    _report(format_memory_table(result), result, json_out)


# --- sampling and evaluation ----------------------------------------------------------------------------
Run = Annotated[str, typer.Argument(help="A run folder (from `sdit init` or `sdit train`).")]
Steps = Annotated[int, typer.Option(min=1, help="Denoising steps.")]
Guidance = Annotated[float, typer.Option(min=0, help="Classifier-free guidance scale w (1: no guidance).")]


@bench_app.command("train")
@command
def bench_train(
    store: Annotated[Optional[str], typer.Argument(help="A labelled store (default: generated images, encoded and labelled).")] = None,
    teacher: BenchTeacher = None,
    teacher_config: TeacherConfig = None,
    student: Student = BenchTrainConfig.student,
    images: Annotated[int, typer.Option(min=8, help="Generated images in the default store.")] = BenchTrainConfig.images,
    batch_size: Annotated[int, typer.Option(min=1, help="Draws per step.")] = BenchTrainConfig.batch_size,
    buffer_records: Annotated[int, typer.Option(min=64, help="The loader's shuffle window; the store must hold 4x as many records.")] = BenchTrainConfig.buffer_records,
    steps: Annotated[int, typer.Option(min=1, help="Timed steps per measurement.")] = BenchTrainConfig.steps,
    startup_shards: Annotated[int, typer.Option(min=0, help="Time the draw stream's start-up on a random labelled store of this many shards (0: not).")] = BenchTrainConfig.startup_shards,
    supply_at: Annotated[Optional[list[str]], typer.Option(help="Where to measure the loader's supply on an SD 1.5-sized random store (repeatable): local, or a URL such as s3://bucket/prefix (default: local).")] = None,
    device: Device = BenchTrainConfig.device,
    json_out: JsonOut = None,
):
    """Steps/s from the store vs from memory, offline vs online distillation, bytes read per draw, the draw stream's
    start-up, and FLOPs per step of each preset."""
    from pipeline.bench.train import bench_train as run
    from pipeline.bench.train import format_train_table

    result = run(BenchTrainConfig(store=store, teacher=teacher, teacher_config=teacher_config, student=student,
                                  images=images, batch_size=batch_size, buffer_records=buffer_records, steps=steps,
                                  startup_shards=startup_shards, device=device,
                                  supply_at=tuple(supply_at) if supply_at else BenchTrainConfig.supply_at))
    _report(format_train_table(result), result, json_out)


@bench_app.command("distill")
@command
def bench_distill(
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for the data, store, runs and report.")] = DistillConfig.out,
    teacher: Annotated[str, typer.Option("--teacher", "-t", show_default="data/toy-sd", help="The teacher.")] = DistillConfig.teacher,
    runs: Annotated[Optional[str], typer.Option(help="Comma-separated: no_teacher, kd, kd_perturb, kd_synth, kd_traj, kd_guided (default: all; with --sizes no_teacher,kd_perturb).")] = None,
    variants: Annotated[Optional[str], typer.Option(help="A TOML file of more runs, each a run above with some options changed (the tuning tables in docs/tuning/).")] = None,
    synth_samples: Annotated[int, typer.Option(min=1, help="kd_synth: teacher samples per prompt of the bank; kd_traj: trajectories.")] = DistillConfig.synth_samples,
    trajectory_steps: Annotated[int, typer.Option(min=2, help="kd_traj: the DDIM schedule its trajectories step through, --draws steps of it each.")] = DistillConfig.trajectory_steps,
    bank_per_pair: Annotated[int, typer.Option(min=0, max=54, help="The prompt bank (swaps and kd_synth's samples): this many prompts of each of the 36 shape-colour pairs; 0: all 1,944.")] = DistillConfig.bank_per_pair,
    records: Annotated[int, typer.Option(min=1, help="Records in the limited split.")] = DistillConfig.records,
    draws: Annotated[int, typer.Option(min=1, help="Teacher draws per record.")] = DistillConfig.draws,
    student: Student = DistillConfig.student,
    text_positions: TextPositions = DistillConfig.text_positions,
    steps: Annotated[int, typer.Option(min=1, help="Training steps of every run.")] = DistillConfig.steps,
    batch_size: Annotated[int, typer.Option(min=1, help="Draws per training step of every run.")] = DistillConfig.batch_size,
    lr: Annotated[float, typer.Option(min=0, help="Learning rate of every run.")] = DistillConfig.lr,
    lr_schedule: Annotated[str, typer.Option(help=f"Every run's `train --lr-schedule`: {', '.join(LR_SCHEDULES)}.")] = DistillConfig.lr_schedule,
    high_noise_weight: Annotated[float, typer.Option(min=0, help="Every run's `train --high-noise-weight` (0: off).")] = DistillConfig.high_noise_weight,
    per_prompt: Annotated[int, typer.Option(min=2, help="Samples per evaluation prompt (96 held-out, 120 seen prompts); 2 or more, for the 95% intervals.")] = DistillConfig.per_prompt,
    sample_steps: Annotated[int, typer.Option(min=1, help="DDIM steps of every sample.")] = DistillConfig.sample_steps,
    guidance: Annotated[float, typer.Option(min=0, help="Classifier-free guidance of every sample.")] = DistillConfig.guidance,
    guidance_range: Annotated[str, typer.Option(help="kd_guided's labels and training: W_MIN:W_MAX, w drawn afresh for each draw.")] = "{:g}:{:g}".format(*DistillConfig.guidance_range),
    perturb: Annotated[Optional[str], typer.Option(help="The kd_perturb run's mix, e.g. none=0.4,input=0.1,swap=0.3,mix=0.1,null=0.1 (default: that mix).")] = None,
    caption_min_t: Annotated[int, typer.Option(min=0, help="Swap and mix captions only at timesteps from here up.")] = PerturbConfig.caption_min_t,
    seed: Annotated[int, typer.Option(help="Seeds the split, the labels, the students and the samples.")] = DistillConfig.seed,
    curve_points: Annotated[int, typer.Option(min=0, help="Checkpoints of each run scored for its learning curve (0: none).")] = DistillConfig.curve_points,
    curve_prompts: Annotated[int, typer.Option(min=1, max=6, help="Prompts per shape-colour pair (of 6) the curves score.")] = DistillConfig.curve_prompts,
    curve_per_prompt: Annotated[int, typer.Option(min=1, help="Samples per prompt of each curve point.")] = DistillConfig.curve_per_prompt,
    jobs: Annotated[int, typer.Option(min=0, help="Runs trained side by side, a process each (0: as many as runs, up to the cores).")] = DistillConfig.jobs,
    sizes: Annotated[Optional[str], typer.Option(help="The substitution curve: the experiment at each of these sizes of the limited split, e.g. 250,500,1000,2000,4000 (replaces --records; no learning curves).")] = None,
    multiplier_at: Annotated[int, typer.Option(help="With --sizes: the N of the data multiplier (one of the sizes).")] = SubstitutionConfig.multiplier_at,
    json_out: JsonOut = None,
):
    """The shapes world: students with and without the teacher on limited data, scored on held-out concepts;
    with --sizes, at several sizes of the data, with the data multiplier the teacher is worth."""
    from pipeline.experiments.distill import distill
    from pipeline.experiments.plan import load_variants, longest_steps, total_steps
    from pipeline.experiments.report import format_report

    default_runs = SubstitutionConfig().distill.runs if sizes else DistillConfig.runs
    config = DistillConfig(out=out, teacher=teacher, runs=default_runs if runs is None else _names(runs),
                           variants=load_variants(variants),
                           records=records, draws=draws, student=student, text_positions=text_positions,
                           steps=steps, batch_size=batch_size,
                           lr=lr, lr_schedule=lr_schedule, per_prompt=per_prompt, sample_steps=sample_steps,
                           guidance=guidance, seed=seed, high_noise_weight=high_noise_weight,
                           synth_samples=synth_samples, trajectory_steps=trajectory_steps,
                           bank_per_pair=bank_per_pair or None,
                           curve_points=curve_points, curve_prompts=curve_prompts, curve_per_prompt=curve_per_prompt,
                           jobs=jobs, guidance_range=LabelConfig.parse_guidance(guidance_range),
                           perturb=PerturbConfig.from_option(perturb, caption_min_t=caption_min_t))
    if sizes:
        _substitution(SubstitutionConfig(sizes=_ints(sizes, "--sizes"), multiplier_at=multiplier_at,
                                         distill=dataclasses.replace(config, curve_points=0)), json_out)
        return
    with _stage_bars(longest_steps(config), total_steps(config)) as bars:
        report = distill(config, *bars)
    _report(format_report(report), {k: report[k] for k in ("runs", "teacher", "seconds", "stages")}, json_out)
    curves = f"; learning curves: {out}/curves.png" if curve_points else ""
    typer.echo(f"grid: {out}/grid.png (teacher row, then one row per run); report: {out}/report.md{curves}; "
               f"score against the teacher's cost: {out}/budget.png")


@bench_app.command("handoff")
@command
def bench_handoff(
    out: Annotated[str, typer.Argument(help="A finished `bench distill` folder (its --out).")],
    runs: Annotated[str, typer.Option(help="Comma-separated runs of that experiment.")],
    at: Annotated[int, typer.Option(min=-1, max=999, help="The teacher takes over (or hands over) at the steps with t <= this.")] = 500,
    json_out: JsonOut = None,
):
    """Where a student loses to the teacher: the experiment's samples drawn again with the teacher finishing
    them (the steps at t <= --at) and with the teacher starting them, from the same noise; fair held-out
    score and seen accuracy of each, with their 95% intervals."""
    from pipeline.experiments.handoff import HandoffConfig, format_handoff, handoff

    with progress_bar("handoff", "image") as bar:
        result = handoff(HandoffConfig(out=out, runs=_names(runs), at=at), progress=bar.update,
                         on_total=lambda n: setattr(bar, "total", n))
    _report(format_handoff(result), result, json_out)


@bench_app.command("substitution")
@command
def bench_substitution(
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for each size's experiment and the curve.")] = SubstitutionConfig().distill.out,
    teacher: Annotated[str, typer.Option("--teacher", "-t", show_default="data/toy-sd", help="The teacher.")] = DistillConfig.teacher,
    sizes: Annotated[str, typer.Option(help="Sizes of the limited split, increasing.")] = ",".join(map(str, SubstitutionConfig.sizes)),
    multiplier_at: Annotated[int, typer.Option(help="The N of the data multiplier (one of the sizes).")] = SubstitutionConfig.multiplier_at,
    runs: Annotated[str, typer.Option(help="Comma-separated runs of `bench distill` (no_teacher and kd_perturb at least).")] = ",".join(SubstitutionConfig().distill.runs),
    variants: Annotated[Optional[str], typer.Option(help="A TOML file of more runs (see `bench distill --variants`).")] = None,
    draws: Annotated[int, typer.Option(min=1, help="Teacher draws per record.")] = DistillConfig.draws,
    steps: Annotated[int, typer.Option(min=1, help="Training steps of every run at every size.")] = DistillConfig.steps,
    batch_size: Annotated[int, typer.Option(min=1, help="Draws per training step of every run.")] = DistillConfig.batch_size,
    per_prompt: Annotated[int, typer.Option(min=2, help="Samples per evaluation prompt (96 held-out, 120 seen prompts); 2 or more, for the 95% intervals.")] = DistillConfig.per_prompt,
    sample_steps: Annotated[int, typer.Option(min=1, help="DDIM steps of every sample.")] = DistillConfig.sample_steps,
    seed: Annotated[int, typer.Option(help="Seeds the split, the labels, the students and the samples.")] = DistillConfig.seed,
    jobs: Annotated[int, typer.Option(min=0, help="Runs trained side by side, a process each (0: as many as runs, up to the cores).")] = DistillConfig.jobs,
    json_out: JsonOut = None,
):
    """How many records the teacher is worth: `bench distill` at each size of the limited split (same student,
    steps, seed and scoring), the figures per size and run, and the data multiplier. Every other option is
    `bench distill`'s default; `bench distill --sizes` takes them all."""
    from pipeline.experiments.plan import load_variants

    config = DistillConfig(out=out, teacher=teacher, runs=_names(runs), draws=draws, steps=steps,
                           batch_size=batch_size, per_prompt=per_prompt, sample_steps=sample_steps, seed=seed,
                           jobs=jobs, curve_points=0, variants=load_variants(variants))
    _substitution(SubstitutionConfig(sizes=_ints(sizes, "--sizes"), multiplier_at=multiplier_at, distill=config),
                  json_out)


def _substitution(config: SubstitutionConfig, json_out: Optional[Path]) -> None:
    from pipeline.experiments.plan import longest_steps, total_steps
    from pipeline.experiments.substitution import format_substitution, substitution

    with _stage_bars(longest_steps(config.distill), total_steps(config.distill)) as bars:
        result = substitution(config, *bars)
    _report(format_substitution(result), result, json_out)
    out = config.distill.out
    typer.echo(f"curve: {out}/substitution.png; report: {out}/substitution.md; each size: {out}/n<records>/")


@contextlib.contextmanager
def _stage_bars(steps: int, all_steps: int):
    """(stage, on_step, progress, on_total) for a multi-stage experiment: each stage's name on stderr, a progress
    bar while runs train (of a run's `steps` when one trains at a time, of the `all_steps` of all runs together side
    by side) and while the scoring and curves stages sample (of the images they announce with on_total)."""
    bar = None

    def stage(name: str) -> None:
        nonlocal bar
        if bar is not None:
            bar.close()
        typer.echo(name, err=True)
        sampling = name.endswith(("sample and score", "learning curves"))
        bar = progress_bar(name, "step") if "train " in name else progress_bar(name, "image") if sampling else None
        if bar is not None and not sampling:
            bar.total = all_steps if "side by side" in name else steps

    def on_step(m: dict) -> None:
        if "loss" in m:  # one run at a time; side by side, the bar counts the steps of all runs
            bar.set_postfix_str(f"loss {m['loss']:.4f}", refresh=False)
        advance_to(bar, m["step"])

    def progress(n: int) -> None:
        bar.update(n)

    def on_total(n: int) -> None:
        bar.reset(total=n)

    try:
        yield stage, on_step, progress, on_total
    finally:
        if bar is not None:
            bar.close()


@bench_app.command("evaluator")
@command
def bench_evaluator(
    images: Annotated[int, typer.Option(min=10, help="Renders per condition (a tenth as many of each no-shape kind).")] = 3000,
    seed: Annotated[int, typer.Option(help="Seed of the renders.")] = 12345,
    json_out: JsonOut = None,
):
    """The shapes world's attribute evaluator: accuracy per attribute on clean, noisy, blurred and independently
    drawn images; "none" on images that hold no single shape; images read per second."""
    from pipeline.experiments.reader import benchmark, format_evaluator_table

    report = benchmark(images, seed)
    _report(format_evaluator_table(report), report, json_out)


@app.command()
@command
def sample(
    run: Run,
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for the PNGs and grid.png.")],
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="A prompt (repeatable).")] = None,
    prompts: Annotated[Optional[str], typer.Option(help="A text file of prompts, one a line.")] = None,
    negative_prompt: Annotated[Optional[str], typer.Option(rich_help_panel=SAMPLING, help="Replaces the empty caption of the guidance's unconditional branch.")] = None,
    per_prompt: Annotated[int, typer.Option(min=1, help="Images per prompt.")] = SampleConfig.num_images,
    height: Annotated[Optional[int], typer.Option(rich_help_panel=SAMPLING, help="Pixels, a multiple of VAE factor x patch size (default: the student's training size).")] = None,
    width: Annotated[Optional[int], typer.Option(rich_help_panel=SAMPLING, help="Pixels, as --height.")] = None,
    steps: Steps = SampleConfig.steps,
    guidance: Guidance = SampleConfig.guidance,
    scheduler: Scheduler = SampleConfig.scheduler,
    seed: Annotated[int, typer.Option(help="Image i uses seed + i, whatever the batch size.")] = SampleConfig.seed,
    batch_size: Annotated[int, typer.Option(rich_help_panel=HARDWARE, min=1, help="Images per batch.")] = SampleConfig.batch_size,
    compare_teacher: Annotated[Optional[str], typer.Option(help="Also sample this SD teacher from the same prompts, seeds, noise, scheduler and steps; the grid shows a student row above a teacher row.")] = None,
    teacher_config: TeacherConfig = None,
    device: Device = SampleConfig.device,
    dtype: DType = SampleConfig.dtype,
):
    """Images from a run folder: one PNG each (prompt and settings in its text chunk) and a captioned grid."""
    from pipeline.sample import sample as run_sample

    config = SampleConfig(run=run, out=out, prompts=tuple(prompt or ()), prompts_file=prompts,
                          negative_prompt=negative_prompt, num_images=per_prompt, height=height, width=width,
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
    synthetic: Annotated[bool, typer.Option("--synthetic", help="The teacher's samples (synthetic records) rather than the encoded images.")] = False,
    limit: Annotated[int, typer.Option(min=1, help="Decode the first N records of the group.")] = InspectConfig.limit,
    vae: Annotated[Optional[str], typer.Option(help="A teacher or run folder whose VAE decodes (default: the store's teacher).")] = None,
    teacher_config: TeacherConfig = None,
    columns: Annotated[int, typer.Option(min=1, help="Images per row of the grid.")] = InspectConfig.columns,
    device: Device = InspectConfig.device,
):
    """Decode a store's latents to images: what the student will learn from."""
    from pipeline.inspect import inspect_store as run_inspect

    config = InspectConfig(store=store, out=out, synthetic=synthetic, limit=limit, vae=vae,
                           teacher_config=teacher_config, columns=columns, device=device)
    with progress_bar("inspect", "image") as bar:
        summary = run_inspect(config, progress=bar.update)
    typer.echo(f"wrote {summary['images']} images to {summary['out']} (grid: {summary['grid']})")


@app.command()
@command
def verify(
    store: Annotated[str, typer.Argument(help="A store: a folder or an fsspec URL.")],
):
    """Read every manifest and every chunk of a store (each carries a checksum): one line per problem, then a
    summary; exit code 1 when anything is wrong."""
    from pipeline.verify import count_shards
    from pipeline.verify import verify as run_verify

    with progress_bar("verify", "shard") as bar:
        bar.total = count_shards(store)
        report = run_verify(store, progress=bar.update)
    for problem in report.problems:
        typer.echo(problem)
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(1)


@app.command("eval")
@command
def evaluate(
    run: Run,
    store: Annotated[Optional[str], typer.Argument(help="The labelled store the run was trained on: teacher agreement on its held-out draws.")] = None,
    labels: Annotated[Optional[str], typer.Option(rich_help_panel=ADVANCED, help="Which labels of the store (default: the run's).")] = None,
    holdout: Annotated[Optional[float], typer.Option(rich_help_panel=ADVANCED, min=0, max=0.99, help="Held-out fraction of records (default: the run's --holdout).")] = None,
    split_seed: Annotated[Optional[int], typer.Option(rich_help_panel=ADVANCED, help="Seed of the held-out split (default: the run's).")] = None,
    buckets: Annotated[int, typer.Option(rich_help_panel=ADVANCED, min=1, help="Timestep buckets of equal width.")] = EvalConfig.buckets,
    batch_size: BatchSize = EvalConfig.batch_size,
    limit: Annotated[Optional[int], typer.Option(rich_help_panel=ADVANCED, min=1, help="Evaluate at most this many held-out draws.")] = None,
    prompts: Annotated[Optional[str], typer.Option(help="Prompts to sample: a text file (one a line) or parquet (--prompt-column) (default: the captions of --references).")] = None,
    prompt_column: Annotated[str, typer.Option(rich_help_panel=ADVANCED, help="Column of a parquet --prompts file.")] = EvalConfig.prompt_column,
    references: Annotated[Optional[str], typer.Option(help="Reference images (folder, parquet or webdataset): FID statistics (cached), and captions to sample when --prompts is not given.")] = None,
    num_images: Annotated[int, typer.Option(min=1, help="Images per model in all: image i shows prompt i mod P from seed --seed + i.")] = EvalConfig.num,
    teacher: Annotated[Optional[str], typer.Option("--teacher", "-t", help="Also sample this SD teacher (same prompts, seeds, noise, scheduler, steps, guidance) and score it beside the student.")] = None,
    teacher_config: TeacherConfig = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Folder of the samples; a rerun reuses the images already there (default: RUN/eval-samples).")] = None,
    resolution: Annotated[Optional[int], typer.Option(rich_help_panel=SAMPLING, help="Side of the samples in pixels (default: the student's training size).")] = None,
    steps: Steps = EvalConfig.steps,
    guidance: Guidance = EvalConfig.guidance,
    scheduler: Scheduler = EvalConfig.scheduler,
    seed: Annotated[int, typer.Option(help="Image i uses seed + i.")] = EvalConfig.seed,
    sample_batch_size: Annotated[int, typer.Option(rich_help_panel=SAMPLING, min=1, help="Images per sampling batch (recorded: it moves FID through float rounding).")] = EvalConfig.sample_batch_size,
    clip_model: Annotated[Optional[str], typer.Option(help="A CLIP model on local disk (a transformers CLIPModel folder, or an open_clip model such as BK-SDM's ViT-g-14): adds the CLIP score.")] = None,
    clip_score: Annotated[Optional[str], typer.Option(rich_help_panel=ADVANCED, help="CLIP score convention: bk-sdm (the mean raw cosine) or torchmetrics (100 × the mean cosine, clamped at 0). Default: the FID protocol's (bk-sdm under bk-sdm, else torchmetrics).")] = None,
    fid_inception: Annotated[Optional[str], typer.Option(help="NVlabs' TorchScript inception-2015-12-05.pt on local disk: adds FID.")] = None,
    fid_protocol: Annotated[str, typer.Option(help="How images reach the network, on both sides: bk-sdm (BK-SDM's COCO-30K: JPEG, squash to 256, JPEG, pytorch-fid's resize; the default, to compare with its table), clean (clean-fid's clean mode) or tf (TensorFlow's resize, as StyleGAN and ADM).")] = EvalConfig.fid_protocol,
    fid_stats: Annotated[Optional[str], typer.Option(help="Reference statistics to compare with (.npz with mu and sigma) instead of --references; refused unless made under --fid-protocol.")] = None,
    fid_stats_protocol: Annotated[Optional[str], typer.Option(rich_help_panel=ADVANCED, help="The protocol of a --fid-stats file that does not say it (pytorch-fid's and clean-fid's files do not; BK-SDM's real_im256.npz is bk-sdm).")] = None,
    fid_size: Annotated[Optional[int], typer.Option(rich_help_panel=ADVANCED, help="Side images are fitted to before the network. Default: 256 under bk-sdm, else the samples' size.")] = None,
    fid_references: Annotated[Optional[int], typer.Option(rich_help_panel=ADVANCED, min=2, help="At most this many reference images in the statistics (default: all).")] = None,
    fid_cache: Annotated[Optional[str], typer.Option(rich_help_panel=ADVANCED, help="Folder of cached reference statistics (default: ~/.cache/sdit/fid-stats).")] = None,
    device: Device = EvalConfig.device,
    dtype: DType = EvalConfig.dtype,
    json_out: JsonOut = None,
):
    """The student in the field's units: teacher agreement on held-out draws (STORE), FID and CLIP score of its
    samples (--prompts/--references), with --teacher the teacher's beside them; one table, and --json."""
    from pipeline.evaluate import evaluate as run_eval
    from pipeline.evaluate import format_eval

    config = EvalConfig(run=run, store=store, labels=labels, holdout=holdout, split_seed=split_seed, buckets=buckets,
                        batch_size=batch_size, limit=limit, device=device, dtype=dtype, prompts=prompts,
                        prompt_column=prompt_column, references=references, num=num_images, teacher=teacher,
                        teacher_config=teacher_config, out=out, resolution=resolution, steps=steps, guidance=guidance,
                        scheduler=scheduler, seed=seed, sample_batch_size=sample_batch_size, clip_model=clip_model,
                        clip_score=clip_score, fid_inception=fid_inception, fid_protocol=fid_protocol,
                        fid_stats=fid_stats, fid_stats_protocol=fid_stats_protocol, fid_size=fid_size,
                        fid_references=fid_references, fid_cache=fid_cache)
    units = {"agreement": "draw", "sample": "image", "references": "image", "measure": "image"}
    with progress_bar("eval", "draw") as bar:

        def on_stage(name: str, total: int) -> None:
            bar.reset(total)
            bar.set_description(name)
            bar.unit = units.get(name, "item")

        result = run_eval(config, progress=bar.update, on_stage=on_stage)
    _report(format_eval(result), result, json_out)


@bench_app.command("sample")
@command
def bench_sample(
    run: Annotated[Optional[str], typer.Argument(help="A run folder (default: an untrained --student beside the teacher).")] = None,
    teacher: Annotated[Optional[str], typer.Option(help="Teacher (default: the run's, or a tiny random SD-shaped one).")] = None,
    teacher_config: TeacherConfig = None,
    student: Student = BenchSampleConfig.student,
    images: Annotated[int, typer.Option(min=1, help="Images per timed run, in one batch.")] = BenchSampleConfig.images,
    steps: Steps = BenchSampleConfig.steps,
    scheduler: Scheduler = BenchSampleConfig.scheduler,
    guidance: Guidance = BenchSampleConfig.guidance,
    resolution: Annotated[Optional[int], typer.Option(help="Image side in pixels (default: the student's).")] = None,
    preset: Annotated[Optional[list[str]], typer.Option("--preset", help=f"Presets of the FLOPs table (repeatable) (default: {', '.join(BenchSampleConfig.presets)}).")] = None,
    device: Device = BenchSampleConfig.device,
    dtype: DType = BenchSampleConfig.dtype,
    json_out: JsonOut = None,
):
    """Images/s of the student against the teacher, and FLOPs per sampling step at SD 1.5's size for each preset."""
    from pipeline.bench.sample import bench_sample as run_bench
    from pipeline.bench.sample import format_sample_table

    options = {"presets": tuple(preset)} if preset else {}
    result = run_bench(BenchSampleConfig(run=run, teacher=teacher, teacher_config=teacher_config, student=student,
                                   images=images, steps=steps, scheduler=scheduler, guidance=guidance,
                                   resolution=resolution, device=device, dtype=dtype, **options))
    _report(format_sample_table(result), result, json_out)


@bench_app.command("startup")
@command
def bench_startup(
    repeats: Annotated[int, typer.Option(min=1, help="Fresh interpreters per call; the table shows the median.")] = 5,
    json_out: JsonOut = None,
):
    """Seconds from `sdit --help` (and other calls) to the answer, each in a fresh interpreter; and whether
    `import cli` loads torch, diffusers or transformers (it should not)."""
    from pipeline.bench.startup import bench_startup as run
    from pipeline.bench.startup import format_startup_table

    result = run(repeats)
    _report(format_startup_table(result), result, json_out)


# --- the shapes world's toy teacher ---------------------------------------------------------------------
toy_app = typer_app(help="The shapes world's toy SD teacher: train it, score its samples.")
app.add_typer(toy_app, name="toy")


@toy_app.command("train")
@command
def toy_train(
    out: Annotated[str, typer.Option("--out", "-o", help="Teacher folder to write (diffusers layout, as data/toy-sd).")],
    work_dir: Annotated[Optional[str], typer.Option(help="Renders and checkpoints (default: OUT-work).")] = None,
    minutes: Annotated[Optional[float], typer.Option(min=0, help="Wall-time cap for the whole run.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the work folder's checkpoints (only --unet-steps may grow).")] = False,
    size: Annotated[str, typer.Option(help=f"Component sizes: {', '.join(toy.SIZES)}.")] = toy.ToyConfig.size,
    images: Annotated[int, typer.Option(min=1, help="Renders of the whole world to train on.")] = toy.DataConfig.images,
    vae_steps: Annotated[int, typer.Option(min=0, help="Training steps of the VAE.")] = toy.VAEConfig.steps,
    vae_object_weight: Annotated[float, typer.Option(min=0, help="Extra weight of the shape's pixels in the VAE's MSE.")] = toy.VAEConfig.object_weight,
    unet_steps: Annotated[int, typer.Option(min=0, help="Training steps of the UNet (and text encoder).")] = toy.UNetConfig.steps,
    frozen_text: Annotated[bool, typer.Option("--frozen-text", help="Keep the text encoder random and frozen.")] = False,
    offset_noise: Annotated[float, typer.Option(min=0, help="Per-channel noise offset added to the UNet's training noise; 0: SD's plain noise.")] = toy.UNetConfig.offset_noise,
    high_noise_weight: Annotated[float, typer.Option(min=0, help="γ: weight the UNet's ε loss by min(1/ᾱ_t, γ), so the highest noise levels count more; 0: SD's plain loss.")] = toy.UNetConfig.high_noise_weight,
    threads: Annotated[int, typer.Option(min=1, help="Torch CPU threads (part of the config: rounding depends on it).")] = toy.ToyConfig.threads,
    dtype: Annotated[str, typer.Option(help="Weights of the written teacher: fp16 (as data/toy-sd ships) or fp32.")] = "fp16",
    json_out: JsonOut = None,
):
    """Train the toy teacher on the whole shapes world (VAE, then UNet and text encoder) and write it to OUT."""
    import json
    from dataclasses import replace

    import torch

    from sdit.shapes.toy import train as train_toy

    config = toy.ToyConfig(size, toy.DataConfig(images=images),
                           replace(toy.VAEConfig(), steps=vae_steps, object_weight=vae_object_weight),
                           replace(toy.UNetConfig(), steps=unet_steps, train_text=not frozen_text,
                                   offset_noise=offset_noise, high_noise_weight=high_noise_weight), threads)
    bars: list = []

    def stages(stage: str, total: int):
        bar = progress_bar(stage, "step", total)
        bars.append(bar)

        def metrics(figures: dict) -> None:
            bar.set_postfix({k: f"{v:.4g}" for k, v in figures.items() if isinstance(v, float)}, refresh=False)
            if stage == "latents":
                bar.write(json.dumps(figures))

        return bar.update, metrics

    dtypes = {"fp16": torch.float16, "fp32": torch.float32}
    if dtype not in dtypes:
        raise SDiTError(f"--dtype {dtype!r}: fp16 or fp32")
    summary = train_toy(out, config, work_dir, resume, minutes, stages, dtype=dtypes[dtype])
    for bar in bars:
        bar.close()
    figures = {k: v for k, v in summary.items() if k != "config"}
    _report(json.dumps(figures, indent=2), figures, json_out)


@toy_app.command("eval")
@command
def toy_eval(
    teacher: Annotated[str, typer.Option("--teacher", "-t", show_default="data/toy-sd", help="A toy teacher folder.")] = str(TOY_TEACHER),
    per_prompt: Annotated[int, typer.Option(min=1, help="Samples per evaluation prompt (96 held-out, 120 seen).")] = 4,
    guidance: Guidance = toy.EVAL_GUIDANCE,
    steps: Steps = toy.EVAL_STEPS,
    seed: Annotated[int, typer.Option(help="Image i of each prompt set uses noise from seed + i.")] = 0,
    json_out: JsonOut = None,
):
    """Sample the teacher for held-out and seen prompts and read the samples: accuracy per attribute."""
    import time
    from dataclasses import asdict

    start = time.monotonic()
    from sdit.shapes.samples import format_scores, score_teacher

    scores = score_teacher(teacher, per_prompt, guidance, steps, seed)
    _report(format_scores(scores), {k: asdict(v) for k, v in scores.items()}, json_out)
    typer.echo(f"({time.monotonic() - start:.0f} s; DDIM {steps} steps, guidance {guidance}, {per_prompt} images "
               "per prompt)")


if __name__ == "__main__":
    app()
