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
            typer.echo("interrupted: finished shards are kept; rerun the same command to resume", err=True)
            raise typer.Exit(130) from None

    return wrapper


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
    perturb: Annotated[Optional[str], typer.Option(help="Perturbation mix, e.g. none=0.6,input=0.1,swap=0.1,mix=0.1,null=0.1, or a .json config file.")] = None,
    input_gamma: Annotated[float, typer.Option(min=0, help="γ of input perturbation: the input uses ε + γ·ξ.")] = 0.1,
    caption_min_t: Annotated[int, typer.Option(min=0, help="Swap and mix captions only at timesteps from here up.")] = 400,
    prompt_share: Annotated[float, typer.Option(min=0, max=1, help="Share of swap/mix captions from the prompt bank.")] = 0.5,
    guidance: Annotated[Optional[str], typer.Option(help="W_MIN:W_MAX: store guided targets ε_u + w(ε_c − ε_u) with w stored.")] = None,
    seed: Annotated[int, typer.Option(help="Same seed, same draws, whatever the executor or batch size.")] = 0,
    batch_size: BatchSize = 64,
    max_dropped: Annotated[float, typer.Option(min=0, max=1, help="Stop when more draws than this get a NaN/inf teacher output.")] = 0.01,
    overwrite: Annotated[bool, typer.Option(help="Delete labels of the same name and start again.")] = False,
    device: Device = "auto",
    dtype: DType = "auto",
    ray_address: RayAddress = None,
    num_workers: Annotated[Optional[int], typer.Option(min=1, help="Ray actors [default: one per GPU, else per CPU].")] = None,
):
    """Run the teacher's UNet once over a store: K draws per record (timestep, noise, perturbation) and ε_T."""
    from pipeline.label import LabelConfig, label
    from sdit.errors import SDiTError
    from sdit.perturb import DEFAULT_MIX, PerturbConfig

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
                         ray_address=ray_address, num_workers=num_workers)
    with progress_bar("teacher-label", "draw") as bar:
        counts = label(config, progress=bar.update, on_total=lambda n: setattr(bar, "total", n))
    kinds = ", ".join(f"{k} {v}" for k, v in counts["kinds"].items())
    typer.echo(f"labelled {counts['draws']} draws in {counts['shards']} shards into {store}/labels/{labels} "
               f"({kinds}; {counts['dropped']} dropped; {counts['bytes_per_draw']:.0f} bytes a draw)")


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
    from pipeline.bench import BenchEncodeConfig, bench_encode as run, format_table, write_json

    result = run(BenchEncodeConfig(source=source, teacher=teacher, teacher_config=teacher_config, images=images,
                                   resolution=resolution, batch_size=batch_size, shard_size=shard_size,
                                   device=device, dtype=dtype))
    typer.echo(format_table(result))
    if json_out:
        write_json(result, json_out)


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
    from pipeline.bench import BenchLabelConfig, bench_label as run, format_label_table, write_json

    result = run(BenchLabelConfig(store=store, teacher=teacher, teacher_config=teacher_config, images=images,
                                  draws=draws, batch_size=batch_size, project_images=project_images,
                                  project_draws=project_draws, device=device, dtype=dtype))
    typer.echo(format_label_table(result))
    if json_out:
        write_json(result, json_out)


if __name__ == "__main__":
    app()
