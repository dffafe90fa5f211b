"""The shapes-world experiment: does the teacher's knowledge reach a student trained on limited data?

Behind `make demo` (two students) and `sdit bench distill` (every run). Same student preset, steps, seed and
limited data for each run; only what the student learns from differs:

    no_teacher   real pairs only (--kd-weight 0), the baseline
    kd           the teacher's ε on the real pairs, no perturbations
    kd_perturb   the teacher's ε with perturbations, including caption swaps from the text-only prompt bank
    kd_synth     as kd_perturb, plus the teacher's own samples for every prompt of the bank as extra records
    kd_traj      as kd_perturb, plus trajectory draws for every prompt of the bank: the teacher's ε at the states
                 its own sampler visits in its first steps from pure noise (labels only: no teacher image)
    kd_guided    as kd_perturb, but the targets are the teacher's guided ε_u + w(ε_c − ε_u), on the records and on
                 four trajectories per prompt of the bank (states down to t = 250); the labels keep ε_c and ε_u
                 and training draws w afresh in `guidance_range` each time it reads a draw; the student takes w
                 (--guidance-embed) and learns the targets alone (--task-weight 0): it samples with one forward a
                 step where the others run two

Steps, each a stage of its own: write the limited split (held-out concepts never drawn) and the prompt bank
of the whole world -> `encode` -> `teacher-label` (one labelling per perturbation mix) -> `train` each run
-> sample every student and the teacher from the same noise for held-out and seen prompts -> read the
samples with the shapes reader -> report.md, report.json and a grid (teacher row, then each student).

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
                       seen accuracy on its curve (interpolated; None if never reached, and for the no-teacher run)
    intervals, gain    95% intervals of heldout_acc, seen_acc and heldout_hit (bootstrap over prompts and their
                       samples), and a student's paired gain over the no-teacher run with its interval
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline.encode import EncodeConfig, encode
from pipeline.experiments.config import DistillConfig, Say
from pipeline.experiments.plan import STORE, Labelling, Run, plan, store_of, train_configs
from pipeline.experiments.plots import plot_budget
from pipeline.experiments.report import format_report
from pipeline.experiments.scoring import add_curves, curve_images, score_all, scoring_images
from pipeline.experiments.side_by_side import train_side_by_side
from pipeline.init import init_for_store
from pipeline.label import LabelConfig, label
from pipeline.train_monitor import METRICS, read_metrics
from sdit.config import SynthesisConfig
from sdit.errors import SDiTError
from sdit.files import check_folder, replace_text, writing_folder
from sdit.progress import Progress, no_progress
from sdit.run import read_run
from sdit.shapes import files, world
from sdit.store import WRITER_LOCK
from sdit.teacher import load_teacher

DATA = "data"  # the limited split (images/), the prompt bank (prompts.txt) and the options that drew them
SPLIT_RECORD = "split.json"


def distill(config: DistillConfig, say: Say = lambda _: None,
            on_step: Callable[[dict], None] | None = None, progress: Progress = no_progress,
            on_total: Callable[[int], None] = lambda _: None) -> dict:
    """Every stage of the experiment into `config.out`; returns the report (also report.json). `say` hears
    each stage's name, `on_step` each training step's metrics; `on_total(n)` hears the samples the scoring and
    the curves stages each draw, once each stage starts, and `progress(n)` counts them. A rerun into the same
    folder picks up where the last one stopped: finished stages are kept, training resumes from each run's last
    checkpoint."""
    config.check()
    out = check_folder(config.out)
    labellings, runs = plan(config)
    trainings = train_configs(config, runs)
    for training in trainings.values():  # refuse bad training options before any work
        training.check()
    check_inits(out, runs, config.seed)
    check_split(out / DATA, config)
    started, stages = time.perf_counter(), {}
    with timed(stages, "store"):
        prepare_store(config, out, labellings, say)
    with timed(stages, "train"):
        for run in inits(runs):
            if not (out / run.init).exists():
                init_for_store(str(out / run.store), run.labels, str(out / run.init), run.student,
                               teacher=config.teacher, seed=config.seed, guidance_linear=run.guidance_linear,
                               text_positions=run.text_positions)
        for training in trainings.values():  # a folder left by a start that trained nothing begins again
            if not training.resume:
                shutil.rmtree(training.out, ignore_errors=True)
        train_side_by_side(trainings, config.jobs or min(len(runs), len(os.sched_getaffinity(0))), say, on_step)
    say("sample and score")
    on_total(scoring_images(config))
    with timed(stages, "score"):
        teacher = load_teacher(config.teacher)  # once, for the teacher's row and its curve reference
        results = score_all(config, out, teacher, labellings, runs, progress)
    if config.curve_points:
        say("learning curves")
        on_total(curve_images(config, out, runs))
        with timed(stages, "curves"):
            add_curves(config, out, results, teacher, runs, progress)
    for name, training in trainings.items():
        results[name]["train_steps_per_s"] = steps_per_second(Path(training.out), training.batch_size)
    report = {"runs": {n: results[n] for n in config.names}, "teacher": results["teacher"],
              "seconds": time.perf_counter() - started, "stages": stages, "config": _jsonable(asdict(config)),
              "teacher_hashes": teacher.identity.hashes}
    plot_budget(out / "budget.png", report["runs"], report["teacher"])
    replace_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    replace_text(out / "report.md", format_report(report) + "\n")
    return report


@contextmanager
def timed(stages: dict[str, float], name: str) -> Iterator[None]:
    """Keeps the seconds the block took as `stages[name]`."""
    start = time.perf_counter()
    yield
    stages[name] = time.perf_counter() - start


def steps_per_second(run: Path, batch_size: int) -> float | None:
    """A run's training speed: the median of its logged steps (checkpoints and evaluations left out); None for a
    run that logged none."""
    rates = [m["samples_per_s"] / batch_size for m in read_metrics(run / METRICS)]
    return float(np.median(rates)) if rates else None


def inits(runs: dict[str, Run]) -> list[Run]:
    """One run of each initial-weights folder: runs of one student and kind start from the same weights."""
    return list({run.init: run for run in runs.values()}.values())


def check_inits(out: Path, runs: dict[str, Run], seed: int) -> None:
    """Refuse a rerun whose students differ from the initial weights an earlier start left in `out` (another
    --student, --text-positions or --seed): its runs would resume training those."""
    for run in inits(runs):
        folder = out / run.init
        if not folder.exists():
            continue
        made = read_run(folder)["student"]
        made = (made["preset"], made.get("text_positions"), made["seed"])
        wanted = (run.student, run.text_positions, seed)
        if made != wanted:
            raise SDiTError(f"{folder} holds the initial weights of {_student(*made)}, and this experiment trains "
                            f"{_student(*wanted)}: pass another --out, or remove {out} to start again")


def _student(preset: str, text_positions: int | None, seed: int) -> str:
    """'a SDiT-T/2 student of seed 0', with its text positions when it reads fewer than all."""
    return f"a {preset} student" + (f" of {text_positions} text positions" if text_positions else "") + \
        f" of seed {seed}"


def split_options(config: DistillConfig) -> dict:
    """The options that draw the limited split and the prompt bank, as the command line spells them."""
    return {"records": config.records, "bank_per_pair": config.bank_per_pair or 0, "seed": config.seed}


def check_split(data: Path, config: DistillConfig) -> None:
    """Refuse a rerun whose split options differ from those an earlier start wrote `data` with: its runs would
    train and be scored on the old split."""
    record = data / SPLIT_RECORD
    if not record.exists():  # no split yet, or one written before the record was kept
        return
    made, wanted = json.loads(record.read_text()), split_options(config)
    if made != wanted:
        differ = ", ".join(f"--{key.replace('_', '-')} {made[key]}, not {value}" for key, value in wanted.items()
                           if made[key] != value)
        raise SDiTError(f"{data} holds a split made with {differ}: pass another --out, or remove "
                        f"{data.parent} to start again")


def write_split(data: Path, config: DistillConfig, say: Say) -> None:
    """The limited split, the world's prompt bank and the options that drew them, written whole
    (`writing_folder`), so that a start killed while writing them is never taken for a whole split."""
    if data.exists():
        return
    say("write the limited split and the prompt bank")
    with writing_folder(data) as tmp:
        files.write_split(world.limited_split(config.records, config.seed), tmp / "images")
        files.write_prompts(world.prompt_bank(config.seed, config.bank_per_pair), tmp / "prompts.txt")
        (tmp / SPLIT_RECORD).write_text(json.dumps(split_options(config)) + "\n")


def prepare_store(config: DistillConfig, out: Path, labellings: dict[str, Labelling], say: Say) -> None:
    """The limited split and the world's prompt bank, encoded, and each labelling the runs need (trajectories in
    a copy of the encoded store: a store holds one set of synthetic records)."""
    data, store = out / DATA, out / STORE
    write_split(data, config, say)
    say("encode")
    encode(EncodeConfig(source=str(data / "images"), teacher=config.teacher, out=str(store), resolution=64,
                        prompts=str(data / "prompts.txt"), shard_size=512, batch_size=64))
    for name, labelling in sorted(labellings.items()):
        if store_of(name, labelling) != STORE:
            copy_encoded(store, out / store_of(name, labelling))
        say(f"teacher-label {name}")
        label(LabelConfig(store=str(out / store_of(name, labelling)), teacher=config.teacher, name=name,
                          draws=labelling.draws, perturb=labelling.perturb, seed=config.seed,
                          synthesis=_synthesis(config, labelling), guidance=labelling.guidance,
                          guidance_conditional=labelling.guidance_conditional,
                          guidance_fresh=labelling.guidance_fresh))


def _synthesis(config: DistillConfig, labelling: Labelling) -> SynthesisConfig | None:
    """kd_synth's samples (or a guided variant's), with the sampler whose accuracy the report's teacher row
    measures; kd_traj's trajectories (or a guided variant's), the states of its first `draws` steps."""
    if labelling.trajectory_steps:  # kd_traj's, or a guided variant's
        return SynthesisConfig(samples=labelling.samples, steps=labelling.trajectory_steps, guidance=config.guidance,
                               seed=config.seed, trajectory=labelling.draws)
    if labelling.samples:  # kd_synth's, or a guided variant's
        return SynthesisConfig(samples=labelling.samples, steps=config.sample_steps, guidance=config.guidance,
                               seed=config.seed, scheduler="ddim")
    return None


def copy_encoded(store: Path, to: Path) -> None:
    """A copy of the encoded store (its manifest, records, prompts and null embedding; no labels or synthetic
    records), written whole (`writing_folder`), so that an interrupted copy is never taken for one."""
    if to.exists():
        return
    skip = {"labels", "synthetic", WRITER_LOCK}
    with writing_folder(to) as tmp:
        shutil.copytree(store, tmp, ignore=lambda folder, names: [n for n in names if n in skip], dirs_exist_ok=True)


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))
