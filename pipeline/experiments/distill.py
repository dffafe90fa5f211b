"""The shapes-world experiment: does the teacher's knowledge reach a student trained on limited data?

Behind `make demo` (two students) and `sdit bench distill` (every run). Same student preset, steps, seed and
limited data for each run; only what the student learns from differs:

    no_teacher   real pairs only (--kd-weight 0), the baseline
    kd           the teacher's ε on the real pairs, no perturbations
    kd_perturb   the teacher's ε with perturbations, including caption swaps from the text-only prompt bank
    kd_synth     as kd_perturb, plus the teacher's own samples for every prompt of the bank as extra records
    kd_guided    as kd_perturb, but the targets are the teacher's guided ε_u + w(ε_c − ε_u) for a w drawn per draw
                 in `guidance_range`, the student takes w (--guidance-embed) and learns the targets alone
                 (--task-weight 0): it samples with one forward a step where the others run two

Steps, each a stage of its own: write the limited split (held-out concepts never drawn) and the prompt bank
of the whole world -> `encode` -> `teacher-label` (one labelling per perturbation mix) -> `train` each run
-> sample every student and the teacher from the same noise for held-out and seen prompts -> read the
samples with the attribute evaluator -> report.md, report.json and a grid (teacher row, then each student).

The figures (each run, and the teacher, from the same noise):
    heldout_acc        the fair held-out score: for each of the seven held-out concepts (the shape "cross", the
                       colour "yellow", five pairs such as "red circle"), hit − false positive, where a sample
                       shows a concept only if it is a recognisable object carrying the concept's value(s), hit =
                       P(shown | asked for it) and false positive = P(shown | asked for another value of that
                       attribute), over every evaluation prompt; the mean over the concepts. A student that draws
                       a cross for every prompt scores 0 on "cross", one that draws it exactly when asked 1.
    heldout_hit        the raw figure: the share of samples for held-out prompts that show the concept they name
    heldout_concepts   per concept: hit, false_positive, fair
    seen_acc           the share of samples for seen prompts showing the shape and colour asked for
    heldout_pair_acc   shape and colour both right on held-out prompts
    *_attr_acc         the mean over shape, colour, background, position and size of the share of samples showing
                       what the prompt asked (each attribute's accuracy in *_attributes)
    curves             heldout_acc and seen_acc of the EMA weights at `curve_points` checkpoints (and step 0), on a
                       fixed subset of the prompts (`curve_prompts` per shape-colour pair) and the same noise
    speedup            the no-teacher run's steps / the steps this run needed to reach the no-teacher run's final
                       seen accuracy on its curve (interpolated; None if never reached)
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import numpy as np
import torch
from safetensors.torch import load_model

from pipeline.encode import EncodeConfig, encode
from pipeline.evaluate import EvalConfig, evaluate
from pipeline.init import init_for_store
from pipeline.label import LabelConfig, label
from pipeline.train import METRICS, TrainConfig, checkpoint_dirs, read_metrics, train
from sdit.shapes import evaluator, samples, world
from sdit.dit import PRESETS
from sdit.errors import SDiTError
from sdit.files import check_folder, replace_text, replacing
from sdit.perturb import PerturbConfig
from sdit.run import RUN_FILE, read_run
from sdit.images import captioned_grid
from sdit.pipeline_sdit import SDiTPipeline
from sdit.synthesize import SynthesisConfig
from sdit.teacher import DATA_DIR, load_teacher
from pipeline.experiments.config import (GUIDED_LABELS, LABEL_OPTIONS, PERTURBED, PLAIN, PROMPTS_PER_PAIR, RECIPES,
                                   TRAIN_OPTIONS, DistillConfig, Recipe, check_variant)
from sdit.config import TOY_TEACHER



def load_variants(path: str | None) -> dict[str, dict]:
    """A TOML file of variants, one table each: `[name]`, `from = "kd_perturb"`, then the options it changes
    (checked with the rest of the config, by `DistillConfig.check`); no file, no variants."""
    if path is None:
        return {}
    try:
        variants = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise SDiTError(f"--variants {path}: {err}") from None
    for name, options in variants.items():
        if not isinstance(options, dict):
            raise SDiTError(f"--variants {path}: {name!r} is not a table; write [{name}] and its options under it")
    return variants


@dataclass(frozen=True)
class Labelling:
    """One labelling of the store: its kind and what its draws were made with."""
    kind: str  # plain, perturbed, synthetic or guided (Recipe.labels)
    perturb: PerturbConfig
    draws: int
    guidance: tuple[float, float] | None  # guided targets: w drawn per draw in this window


@dataclass(frozen=True)
class Run:
    """One student of the experiment: the labelling it trains on, where it starts, what its training changes."""
    recipe: str
    labels: str  # the labelling's name in the store
    init: str  # the folder (in OUT) of its initial weights, shared by every run of its student and kind
    student: str  # its preset
    training: dict  # TrainConfig fields set for this run: its recipe's weights, a variant's training options


def plan(config: DistillConfig) -> tuple[dict[str, Labelling], dict[str, Run]]:
    """The labellings the runs need (runs that would draw the same share one) and each run."""
    labellings: dict[str, Labelling] = {}
    runs: dict[str, Run] = {}
    for name in config.names:
        options = config.variants.get(name, {"from": name})
        recipe = RECIPES[options["from"]]
        labelling = _labelling(config, recipe.labels, options)
        labels = next((k for k, v in labellings.items() if v == labelling), None)
        if labels is None:  # a recipe's own labelling keeps its kind's name; a variant's takes the variant's
            labels = recipe.labels if labelling == _labelling(config, recipe.labels, {}) else name
            labellings[labels] = labelling
        student = options.get("student", config.student)
        init = "init" + ("-guided" if recipe.labels == GUIDED_LABELS else "") + (
            "" if student == config.student else "-" + student.replace("/", "-"))
        training = {"kd_weight": recipe.kd_weight, "task_weight": recipe.task_weight} | {
            k: v for k, v in options.items() if k in TRAIN_OPTIONS and k != "student"}
        runs[name] = Run(options["from"], labels, init, student, training)
    return labellings, runs


def _labelling(config: DistillConfig, kind: str, options: dict) -> Labelling:
    perturb = PLAIN if kind == "plain" else config.perturb
    if "perturb" in options:
        perturb = PerturbConfig.from_option(options["perturb"], input_gamma=perturb.input_gamma,
                                            caption_min_t=perturb.caption_min_t, prompt_share=perturb.prompt_share)
    perturb = replace(perturb, **{k: options[k] for k in ("caption_min_t", "prompt_share") if k in options})
    guidance = None
    if kind == GUIDED_LABELS:
        guidance = LabelConfig.parse_guidance(options["guidance_range"]) if "guidance_range" in options \
            else config.guidance_range
    return Labelling(kind, perturb, options.get("draws", config.draws), guidance)


Progress = Callable[[str], None]


def distill(config: DistillConfig, progress: Progress = lambda _: None,
            on_step: Callable[[dict], None] | None = None) -> dict:
    """Every stage of the experiment into `config.out`; returns the report (also report.json). `progress` hears
    each stage's name, `on_step` each training step's metrics. A rerun into the same folder picks up where the
    last one stopped: finished stages are kept, training resumes from each run's last checkpoint."""
    config.check()
    out = check_folder(config.out)
    labellings, runs = plan(config)
    trainings = train_configs(config, out / "store", runs)
    for training in trainings.values():  # refuse bad training options before any work
        training.check()
    started = time.perf_counter()
    store = prepare_store(config, out, labellings, progress)
    for run in {r.init: r for r in runs.values()}.values():  # runs of one student and kind start from one init
        if not (out / run.init).exists():
            init_for_store(str(store), run.labels, str(out / run.init), run.student, teacher=config.teacher,
                           seed=config.seed)
    for training in trainings.values():  # a folder left by a start that trained nothing begins again
        if not training.resume:
            shutil.rmtree(training.out, ignore_errors=True)
    train_side_by_side(trainings, config.jobs or min(len(runs), len(os.sched_getaffinity(0))), progress, on_step)
    progress("sample and evaluate")
    teacher = load_teacher(config.teacher)  # once, for the teacher's row and its curve reference
    results = score_all(config, out, store, teacher, labellings, runs)
    if config.curve_points:
        progress("learning curves")
        add_curves(config, out, results, teacher, runs)
    report = {"runs": {n: results[n] for n in config.names}, "teacher": results["teacher"],
              "seconds": time.perf_counter() - started, "config": _jsonable(asdict(config)),
              "teacher_hashes": teacher.identity.hashes}
    replace_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    replace_text(out / "report.md", format_report(report) + "\n")
    return report


def train_configs(config: DistillConfig, store: Path, runs: dict[str, Run]) -> dict[str, TrainConfig]:
    """Each run's training options: the experiment's, but for its labels, initial weights and its own options.
    A run folder trained before (an interrupted experiment) resumes."""
    trainings = {}
    for name, run in runs.items():
        steps = run_steps(config, run)
        out = Path(config.out) / name
        trainings[name] = replace(TrainConfig(
            store=str(store), out=str(out), labels=run.labels, init=str(Path(config.out) / run.init),
            steps=config.steps, batch_size=config.batch_size, lr=config.lr, warmup=config.warmup,
            ema_decay=config.ema_decay, high_noise_weight=config.high_noise_weight, holdout=config.holdout,
            seed=config.seed, sample_every=0, resume=(out / RUN_FILE).exists() and "train" in read_run(out),
            # curve_points checkpoints, the last at the final step (none a few steps apart)
            checkpoint_every=-(-steps // max(config.curve_points, 1)), keep_checkpoints=max(config.curve_points, 1)),
            **run.training)
    return trainings


def run_steps(config: DistillConfig, run: Run) -> int:
    """The steps a run trains: the experiment's, or its variant's own."""
    return run.training.get("steps", config.steps)


def longest_steps(config: DistillConfig) -> int:
    """The steps of the longest-training run of the experiment (a variant may train longer than --steps)."""
    config.check()  # bad variants are refused in one line before their steps are read
    return max(run_steps(config, run) for run in plan(config)[1].values())


def train_side_by_side(runs: dict[str, TrainConfig], jobs: int, progress: Progress,
                       on_step: Callable[[dict], None] | None) -> None:
    """Train the runs, `jobs` at a time, each in a process of its own with the torch threads split among them
    (small students use many threads poorly, so side by side finishes sooner); one at a time in this process
    when `jobs` is 1. `on_step` hears the step every running run has reached."""
    if jobs <= 1:
        for name, run in runs.items():
            progress(f"train {name}")
            train(run, on_step)
        return
    progress(f"train {', '.join(runs)} ({jobs} side by side)")
    threads = max(1, torch.get_num_threads() // jobs)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch thread pool inherited
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_training_process,
                             initargs=(threads, os.getpid())) as pool:
        pending = {pool.submit(train, run) for run in runs.values()}
        while pending:
            done, pending = wait(pending, timeout=1.0)
            for future in done:
                future.result()  # a run's error stops the experiment here
            if on_step:
                on_step({"step": min(len(read_metrics(Path(run.out) / METRICS)) for run in runs.values())})


def _training_process(threads: int, parent: int) -> None:
    """Set up a process that trains runs side by side: its torch threads, and a watch that ends it when the
    experiment's process is gone (killed, or stopped with Ctrl-C), so that no orphan goes on writing into a
    run folder that a rerun resumes."""
    torch.set_num_threads(threads)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="watch-parent").start()


def prepare_store(config: DistillConfig, out: Path, labellings: dict[str, Labelling], progress: Progress) -> Path:
    """The limited split and the world's prompt bank, encoded, and each labelling the runs need."""
    data, store = out / "data", out / "store"
    if not (data / "images").exists():
        progress("write the limited split and the prompt bank")
        world.write_split(world.limited_split(config.records, config.seed), data / "images")
        world.write_prompts(world.prompt_bank(config.seed, config.bank_per_pair), data / "prompts.txt")
    progress("encode")
    encode(EncodeConfig(source=str(data / "images"), teacher=config.teacher, out=str(store), resolution=64,
                        prompts=str(data / "prompts.txt"), shard_size=512, batch_size=64))
    for name, labelling in sorted(labellings.items()):
        progress(f"teacher-label {name}")
        # The teacher samples with the sampler whose accuracy the report's teacher row measures.
        synthesis = SynthesisConfig(samples=config.synth_samples, steps=config.sample_steps, guidance=config.guidance,
                                    seed=config.seed, scheduler="ddim") if labelling.kind == "synthetic" else None
        label(LabelConfig(store=str(store), teacher=config.teacher, name=name, draws=labelling.draws,
                          perturb=labelling.perturb, seed=config.seed, synthesis=synthesis,
                          guidance=labelling.guidance))
    return store


def score_all(config: DistillConfig, out: Path, store: Path, teacher, labellings: dict[str, Labelling],
              runs: dict[str, Run]) -> dict[str, dict]:
    """Samples of the teacher and every student from the same noise; fair held-out scores, attribute accuracy
    on held-out and seen prompts; teacher agreement on held-out draws."""
    prompts = {"heldout": world.heldout_prompts(), "seen": world.seen_prompts()}
    texts = {split: [p.text for p in plist for _ in range(config.per_prompt)] for split, plist in prompts.items()}
    images, seconds = {}, {}
    images["teacher"], seconds["teacher"] = teacher_samples(config, out, teacher, texts)
    for name in config.names:
        started = time.perf_counter()
        images[name] = {split: _sample(config, out / name, teacher, t) for split, t in texts.items()}
        seconds[name] = time.perf_counter() - started
    asked = {split: [p for p in plist for _ in range(config.per_prompt)] for split, plist in prompts.items()}
    results = {}
    for name in images:
        readings = {split: evaluator.evaluate_batch(images[name][split]) for split in prompts}
        results[name] = scores(readings, asked)
        results[name]["sample_s_per_image"] = seconds[name] / sum(len(a) for a in asked.values())
        results[name]["sample_forwards"] = config.sample_steps * (1 if distilled(out, name) else 2)
        if name != "teacher":
            # on held-out draws of real pairs where the experiment has them; a guided student against guided
            # targets, its own kind
            run = runs[name]
            plain = "plain" in labellings and labellings[run.labels].kind != GUIDED_LABELS
            agreement = evaluate(EvalConfig(run=str(out / name), store=str(store),
                                            labels="plain" if plain else run.labels))
            results[name]["teacher_mse"] = agreement["teacher_agreement"]["mse"]
            results[name]["teacher_forwards"] = teacher_forwards(store, run)
    write_grid(out / "grid.png", images, prompts, config.per_prompt)
    return results


def teacher_samples(config: DistillConfig, out: Path, teacher,
                    texts: dict[str, list[str]]) -> tuple[dict[str, list[np.ndarray]], float]:
    """The teacher's samples of `texts` and the seconds they took: read from `config.teacher_samples` (default
    OUT/teacher-samples.npz) when that file was made by the same teacher, prompts, noise and sampler, else
    made and kept there. The substitution curve's sizes share one file: the teacher does not change with them."""
    path = Path(config.teacher_samples or out / "teacher-samples.npz")
    key = json.dumps({"teacher": teacher.identity.hashes, "texts": texts,
                      "steps": config.sample_steps, "guidance": config.guidance, "seed": config.seed}, sort_keys=True)
    if path.exists():
        with np.load(path) as kept:
            if str(kept["key"]) == key:
                return {split: list(kept[split]) for split in texts}, float(kept["seconds"])
    started = time.perf_counter()
    images = {split: _sample(config, None, teacher, t) for split, t in texts.items()}
    seconds = time.perf_counter() - started
    with replacing(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, key=np.array(key), seconds=np.array(seconds), **{s: np.stack(i) for s, i in images.items()})
    return images, seconds


def distilled(out: Path, name: str) -> bool:
    """Whether a model samples with one forward a step (a guidance-distilled student)."""
    return name != "teacher" and json.loads((out / name / "transformer" / "config.json").read_text())["guidance_embed"]


def scores(readings: dict[str, list[evaluator.Reading]], asked: dict[str, list[world.Prompt]]) -> dict:
    """Every figure of one model from its readings of the held-out and seen prompts' samples."""
    everything = [r for split in readings for r in readings[split]], [a for split in asked for a in asked[split]]
    concepts = evaluator.fair_concepts(*everything)
    result = {"heldout_acc": evaluator.mean_fair(concepts),
              "heldout_hit": evaluator.concept_accuracy(readings["heldout"], asked["heldout"]),
              "heldout_concepts": {c: {"hit": s.hit, "false_positive": s.false_positive, "fair": s.fair}
                                   for c, s in concepts.items()}}
    for split in readings:
        scored = evaluator.score(readings[split], asked[split])
        result |= {f"{split}_pair_acc": pair_accuracy(readings[split], asked[split]),
                   f"{split}_attr_acc": float(np.mean(list(scored.accuracy.values()))),
                   f"{split}_attributes": dict(scored.accuracy)}
    result["seen_acc"] = result["seen_pair_acc"]
    return result


# --- learning curves ----------------------------------------------------------------------------------------------


def curve_prompts(config: DistillConfig) -> dict[str, list[world.Prompt]]:
    """The fixed subset the curves score: `curve_prompts` of each pair's six prompts, both splits."""
    keep = np.linspace(0, PROMPTS_PER_PAIR - 1, config.curve_prompts).round().astype(int)
    return {split: [p for i, p in enumerate(plist) if i % PROMPTS_PER_PAIR in keep]
            for split, plist in (("heldout", world.heldout_prompts()), ("seen", world.seen_prompts()))}


def add_curves(config: DistillConfig, out: Path, results: dict[str, dict], teacher, runs: dict[str, Run]) -> None:
    """Score the EMA weights of every checkpoint of every run (and the shared initial weights at step 0) on the
    curve prompts, from the same noise each time; the teacher on them too, as the reference line. Adds `curves`
    and `speedup` to each run's results and writes curves.png."""
    prompts = curve_prompts(config)
    asked = {split: [p for p in plist for _ in range(config.per_prompt)] for split, plist in prompts.items()}
    texts = {split: [p.text for p in plist] for split, plist in asked.items()}

    def point(run: Path | None, ema: Path | None = None) -> dict:
        readings = {split: evaluator.evaluate_batch(_sample(config, run, teacher, texts[split], ema=ema))
                    for split in texts}
        figures = scores(readings, asked)
        return {"heldout_acc": figures["heldout_acc"], "seen_acc": figures["seen_acc"]}

    starts = {}  # step 0 of every run that starts from the same weights
    for name in config.names:
        init = out / runs[name].init
        if init not in starts:
            starts[init] = {"step": 0} | point(init)
        results[name]["curves"] = [starts[init]] + [
            {"step": int(folder.name.removeprefix("step-"))} | point(out / name, folder / "ema.safetensors")
            for folder in checkpoint_dirs(out / name)]
    reference = point(None)
    for name in config.names:  # against the no-teacher run's final seen accuracy, when it is one of the runs
        baseline = results["no_teacher"]["curves"][-1] if "no_teacher" in config.runs else None
        needed = steps_to_reach(results[name]["curves"], baseline["seen_acc"]) if baseline else None
        results[name]["speedup"] = baseline["step"] / needed if needed else None
    results["teacher"]["curve_reference"] = reference
    plot_curves(out / "curves.png", {name: results[name]["curves"] for name in config.names}, reference)


def steps_to_reach(curve: list[dict], target: float, key: str = "seen_acc") -> float | None:
    """The step at which `curve` first reaches `target`, interpolated linearly between its points; None if it
    never does (or the target is not above the first point, where no step count is meaningful)."""
    if not curve or target <= curve[0][key]:
        return None
    for before, after in zip(curve, curve[1:]):
        if after[key] >= target:
            share = (target - before[key]) / (after[key] - before[key])
            return before["step"] + share * (after["step"] - before["step"])
    return None


def plot_curves(png: Path, curves: dict[str, list[dict]], teacher: dict) -> None:
    """Step on x; the fair held-out score and the seen accuracy on y; a line per run, the teacher dashed."""
    plot_scores(png, {name: [(p["step"], p) for p in curve] for name, curve in curves.items()}, teacher,
                "training step")


def plot_scores(png: Path, lines: dict[str, list[tuple[float, dict]]], teacher: dict, xlabel: str,
                log_x: bool = False) -> None:
    """Two panels, the fair held-out score and the seen accuracy, against x: a line of (x, figures) points per
    run, the teacher's figure dashed (the learning curves, and the substitution curve on log records)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for ax, key, title in ((axes[0], "heldout_acc", "held-out concepts (fair: hit - false positive)"),
                           (axes[1], "seen_acc", "seen prompts: shape and colour")):
        for k, (name, points) in enumerate(lines.items()):
            ax.plot([x for x, _ in points], [f[key] for _, f in points], marker="o", markersize=3, label=name,
                    color=f"C{k}")
        ax.axhline(teacher[key], color="black", linestyle="--", linewidth=1, label="teacher")
        if log_x:  # a tick at each measured x, written out (not 2x10^3)
            ax.set_xscale("log")
            xs = sorted({x for points in lines.values() for x, _ in points})
            ax.set_xticks(xs, [f"{x:,.0f}" for x in xs])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    with replacing(png) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def teacher_forwards(store: Path, run: Run) -> int:
    """What a run's labels cost in teacher UNet forwards (0 without the teacher: its ε_T goes unused)."""
    if run.training["kd_weight"] == 0:
        return 0
    counts = json.loads((store / "labels" / run.labels / "manifest.json").read_text())["counts"]
    return int(counts["teacher_forwards"]["total"])


def _sample(config: DistillConfig, run: Path | None, teacher, prompts: list[str], batch: int = 64,
            ema: Path | None = None) -> list:
    """(H, W, 3) uint8 images of a student run (with the EMA weights of checkpoint file `ema` when given), or of
    the teacher (run=None); image i starts from the noise of seed config.seed + i whichever model draws it."""
    if run is None:
        return samples.sample_teacher(teacher, prompts, config.sample_steps, config.guidance, config.seed, batch)
    pipe = SDiTPipeline.from_pretrained(run)
    pipe.set_progress_bar_config(disable=True)
    if ema is not None:
        load_model(pipe.transformer, str(ema))
    made = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        noise = samples.seeded_noise(samples.latent_shape(teacher), config.seed, start, len(chunk))
        made += [np.asarray(i) for i in pipe(chunk, latents=noise, num_inference_steps=config.sample_steps,
                                              guidance_scale=config.guidance).images]
    return made


def pair_accuracy(readings: list[evaluator.Reading], asked: list[world.Prompt]) -> float:
    """Share of samples whose shape and colour are both the ones asked for."""
    return float(np.mean([r.shape == a.attrs.shape and r.colour == a.attrs.colour for r, a in zip(readings, asked)]))


def write_grid(path: Path, images: dict, prompts: dict, per_prompt: int, columns: int = 8) -> None:
    """The first image of `columns` prompts, half held-out and half seen: one row per model."""
    picks = {"heldout": np.linspace(0, len(prompts["heldout"]) - 1, columns // 2).astype(int),
             "seen": np.linspace(0, len(prompts["seen"]) - 1, columns - columns // 2).astype(int)}
    rows = {name: [images[name][split][i * per_prompt] for split, idx in picks.items() for i in idx]
            for name in images}
    captions = [prompts[split][i].text for split, idx in picks.items() for i in idx]
    with replacing(path) as tmp:
        captioned_grid(rows, captions, columns).save(tmp)


def format_report(report: dict) -> str:
    lines = ["| run | held-out concepts (fair) | seen shape+colour | speed-up | teacher forwards | held-out hits (raw) | "
             "held-out shape+colour | attributes: held-out / seen | teacher MSE (held-out draws) | "
             "sampling: forwards, ms / image |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rows = {**report["runs"], "teacher": report["teacher"]}
    for name, r in rows.items():
        mse = f"{r['teacher_mse']:.4f}" if "teacher_mse" in r else "-"
        forwards = f"{r['teacher_forwards']:,}" if "teacher_forwards" in r else "-"
        speedup = f"{r['speedup']:.1f}x" if r.get("speedup") else "-"
        lines.append(f"| {name} | {r['heldout_acc']:.3f} | {r['seen_acc']:.3f} | {speedup} | {forwards} | "
                     f"{r['heldout_hit']:.3f} | {r['heldout_pair_acc']:.3f} | {r['heldout_attr_acc']:.3f} / "
                     f"{r['seen_attr_acc']:.3f} | {mse} | {r['sample_forwards']}, "
                     f"{1000 * r['sample_s_per_image']:.0f} |")
    concepts = list(report["teacher"]["heldout_concepts"])
    lines += ["", "Held-out concepts, each: hit / false positive / fair (a sample shows a concept only when it is a "
              "recognisable object).", "", "| run | " + " | ".join(concepts) + " |", "|---" * (len(concepts) + 1) + "|"]
    for name, r in rows.items():
        cells = [r["heldout_concepts"][k] for k in concepts]
        lines.append(f"| {name} | " + " | ".join(f"{c['hit']:.2f} / {c['false_positive']:.2f} / {c['fair']:.2f}"
                                                 for c in cells) + " |")
    c = report["config"]
    lines.append("")
    for name, options in c["variants"].items():
        changes = ", ".join(f"{k}={v}" for k, v in options.items() if k != "from")
        lines.append(f"{name}: {options['from']} with {changes}.")
    lines.append(f"{c['student']}, {c['steps']} steps at batch {c['batch_size']}, {c['records']} records x "
                 f"{c['draws']} draws, {c['per_prompt']} samples per prompt (DDIM {c['sample_steps']}, guidance "
                 f"{c['guidance']}), high-noise weight {c['high_noise_weight']}; {report['seconds']:.0f} s in all.")
    return "\n".join(lines)


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))
