"""The shapes-world experiment: does the teacher's knowledge reach a student trained on limited data?

Behind `make demo` (two students) and `sdit bench distill` (every run). Same student preset, steps, seed and
limited data for each run; only what the student learns from differs:

    no_teacher   real pairs only (--kd-weight 0), the baseline
    kd           the teacher's ε on the real pairs, no perturbations
    kd_perturb   the teacher's ε with perturbations, including caption swaps from the text-only prompt bank
    kd_synth     as kd_perturb, plus the teacher's own samples for every prompt of the bank as extra records

Steps, each a stage of its own: write the limited split (held-out concepts never drawn) and the prompt bank
of the whole world -> `encode` -> `teacher-label` (one labelling per perturbation mix) -> `train` each run
-> sample every student and the teacher from the same noise for held-out and seen prompts -> read the
samples with the attribute evaluator -> report.md, report.json and a grid (teacher row, then each student).

The figures (each run, and the teacher, from the same noise):
    heldout_acc        held-out concept accuracy: the share of samples for held-out prompts that show the held-out
                       concept their prompt names (the shape "cross", the colour "yellow", or a held-out pair such
                       as "red circle"), which a student can only have learnt from its teacher
    seen_acc           the share of samples for seen prompts showing the shape and colour asked for
    heldout_pair_acc   shape and colour both right on held-out prompts
    *_attr_acc         the mean over shape, colour, background, position and size of the share of samples showing
                       what the prompt asked (each attribute's accuracy in *_attributes)
    heldout_concepts   per held-out concept, the share of samples asked for it that show it
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.encode import EncodeConfig, encode
from pipeline.evaluate import EvalConfig, evaluate
from pipeline.label import LabelConfig, label
from pipeline.sample import captioned_grid, teacher_images
from pipeline.train import TrainConfig, train
from sdit import sampling
from sdit.shapes import evaluator, world
from sdit.errors import SDiTError
from sdit.perturb import PerturbConfig
from sdit.pipeline_sdit import SDiTPipeline
from sdit.synthesize import SynthesisConfig
from sdit.teacher import DATA_DIR, load_teacher

TOY_TEACHER = DATA_DIR / "toy-sd"

# Real pairs, with the empty caption one draw in ten so that every student can use classifier-free guidance.
PLAIN = PerturbConfig(mix={"none": 0.9, "null": 0.1})
PERTURBED = PerturbConfig()  # the default mix: none, input, swap, mix, null (swap and mix at high noise only)


@dataclass(frozen=True)
class Recipe:
    labels: str  # which labelling of the store the run trains on
    kd_weight: float


RECIPES = {
    "no_teacher": Recipe("plain", 0.0),
    "kd": Recipe("plain", 1.0),
    "kd_perturb": Recipe("perturbed", 1.0),
    "kd_synth": Recipe("synthetic", 1.0),
}


@dataclass(frozen=True)
class DistillConfig:
    out: str = "runs/distill"
    teacher: str = str(TOY_TEACHER)
    runs: tuple[str, ...] = tuple(RECIPES)
    synth_samples: int = 1  # teacher samples per prompt for kd_synth
    records: int = 1000  # the limited split
    draws: int = 8
    student: str = "SDiT-T/2"
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.999
    high_noise_weight: float | None = 5.0  # every run's; measured to help every student (README)
    holdout: float = 0.05  # records kept out of training, for the teacher-agreement figure
    per_prompt: int = 2  # samples per evaluation prompt
    sample_steps: int = 25
    guidance: float = 3.0  # students and teacher; measured better than 5 for both (README)
    seed: int = 0
    perturb: PerturbConfig = field(default_factory=lambda: PERTURBED)

    def check(self) -> None:
        if unknown := [r for r in self.runs if r not in RECIPES]:
            raise SDiTError(f"unknown runs {unknown}; choose from {list(RECIPES)}")
        if not Path(self.teacher).exists():
            raise SDiTError(f"teacher not found: {self.teacher} (the toy teacher ships in data/toy-sd)")


Progress = Callable[[str], None]


def distill(config: DistillConfig, progress: Progress = lambda _: None,
            on_step: Callable[[dict], None] | None = None) -> dict:
    """Every stage of the experiment into `config.out`; returns the report (also report.json). `progress` hears
    each stage's name, `on_step` each training step's metrics."""
    config.check()
    out = Path(config.out)
    runs = train_configs(config, out / "store")
    for run in runs.values():  # refuse bad training options before any work
        run.check()
    started = time.perf_counter()
    store = prepare_store(config, out, progress)
    for name, run in runs.items():
        progress(f"train {name}")
        train(run, on_step)
    progress("sample and evaluate")
    results = score_all(config, out, store)
    report = {"runs": {n: results[n] for n in config.runs}, "teacher": results["teacher"],
              "seconds": time.perf_counter() - started, "config": _jsonable(asdict(config))}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(format_report(report) + "\n")
    return report


def train_configs(config: DistillConfig, store: Path) -> dict[str, TrainConfig]:
    """Each run's training options: the same for every run but its labels and KD weight."""
    return {name: TrainConfig(store=str(store), out=str(Path(config.out) / name), labels=RECIPES[name].labels,
                              student=config.student, teacher=config.teacher, steps=config.steps,
                              batch_size=config.batch_size, lr=config.lr, warmup=config.warmup,
                              ema_decay=config.ema_decay, kd_weight=RECIPES[name].kd_weight,
                              high_noise_weight=config.high_noise_weight, holdout=config.holdout, seed=config.seed,
                              checkpoint_every=config.steps, sample_every=0)
            for name in config.runs}


def prepare_store(config: DistillConfig, out: Path, progress: Progress) -> Path:
    """The limited split and the world's prompt bank, encoded; one labelling per mix the runs need."""
    data, store = out / "data", out / "store"
    if not (data / "images").exists():
        progress("write the limited split and the prompt bank")
        world.write_split(world.limited_split(config.records, config.seed), data / "images")
        world.write_prompts(world.prompt_bank(config.seed), data / "prompts.txt")
    progress("encode")
    encode(EncodeConfig(source=str(data / "images"), teacher=config.teacher, out=str(store), resolution=64,
                        prompts=str(data / "prompts.txt"), shard_size=512, batch_size=64))
    for name in sorted({RECIPES[r].labels for r in config.runs}):
        progress(f"teacher-label {name}")
        # The teacher samples with the sampler whose accuracy the report's teacher row measures.
        synthesis = SynthesisConfig(samples=config.synth_samples, steps=config.sample_steps, guidance=config.guidance,
                                    seed=config.seed, scheduler="ddim") if name == "synthetic" else None
        label(LabelConfig(store=str(store), teacher=config.teacher, name=name, draws=config.draws,
                          perturb=PLAIN if name == "plain" else config.perturb, seed=config.seed, synthesis=synthesis))
    return store


def score_all(config: DistillConfig, out: Path, store: Path) -> dict[str, dict]:
    """Samples of the teacher and every student from the same noise; attribute accuracy on held-out and seen
    prompts; teacher agreement on held-out draws."""
    teacher = load_teacher(config.teacher)
    prompts = {"heldout": world.heldout_prompts(), "seen": world.seen_prompts()}
    models = ["teacher", *config.runs]
    images: dict[str, dict[str, list[np.ndarray]]] = {m: {} for m in models}
    for split, plist in prompts.items():
        texts = [p.text for p in plist for _ in range(config.per_prompt)]
        for name in models:
            images[name][split] = _sample(config, out / name if name != "teacher" else None, teacher, texts)
    results = {}
    for name in models:
        results[name] = {}
        for split, plist in prompts.items():
            readings = evaluator.evaluate_batch(images[name][split])
            asked = [p for p in plist for _ in range(config.per_prompt)]
            scored = evaluator.score(readings, asked)
            results[name] |= {f"{split}_pair_acc": pair_accuracy(readings, asked),
                              f"{split}_attr_acc": float(np.mean(list(scored.accuracy.values()))),
                              f"{split}_attributes": dict(scored.accuracy)}
            if split == "heldout":
                results[name] |= {"heldout_acc": evaluator.concept_accuracy(readings, asked),
                                  "heldout_concepts": {c: s.hit for c, s in scored.concepts.items()}}
        results[name]["seen_acc"] = results[name]["seen_pair_acc"]
        if name != "teacher":
            agreement = evaluate(EvalConfig(run=str(out / name), store=str(store), labels="plain"))
            results[name]["teacher_mse"] = agreement["teacher_agreement"]["mse"]
            results[name]["teacher_forwards"] = teacher_forwards(store, RECIPES[name])
    write_grid(out / "grid.png", images, prompts, config.per_prompt)
    return results


def teacher_forwards(store: Path, recipe: Recipe) -> int:
    """What a run's labels cost in teacher UNet forwards (0 without the teacher: its ε_T goes unused)."""
    if recipe.kd_weight == 0:
        return 0
    counts = json.loads((store / "labels" / recipe.labels / "manifest.json").read_text())["counts"]
    return int(counts["teacher_forwards"]["total"])


def _sample(config: DistillConfig, run: Path | None, teacher, prompts: list[str], batch: int = 64) -> list:
    """(H, W, 3) uint8 images of a student run, or of the teacher (run=None); image i starts from the noise of
    seed config.seed + i whichever model draws it."""
    pipe = SDiTPipeline.from_pretrained(run) if run is not None else None
    if pipe is not None:
        pipe.set_progress_bar_config(disable=True)
    shape = (teacher.unet.config.in_channels, teacher.unet.config.sample_size, teacher.unet.config.sample_size)
    made = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        gens = [torch.Generator().manual_seed(config.seed + start + i) for i in range(len(chunk))]
        noise = sampling.initial_noise(shape, gens, torch.device("cpu"))
        if pipe is None:
            scheduler = sampling.make_scheduler("ddim", teacher.scheduler_config)
            made += list(teacher_images(teacher, chunk, None, noise, scheduler, config.sample_steps, config.guidance,
                                        torch.device("cpu")))
        else:
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
    captioned_grid(rows, captions, columns).save(path)


def format_report(report: dict) -> str:
    lines = ["| run | held-out concepts | held-out shape+colour | seen shape+colour | attributes: held-out / seen | "
             "teacher MSE (held-out draws) | teacher forwards |", "|---|---|---|---|---|---|---|"]
    rows = {**report["runs"], "teacher": report["teacher"]}
    for name, r in rows.items():
        mse = f"{r['teacher_mse']:.4f}" if "teacher_mse" in r else "-"
        forwards = f"{r['teacher_forwards']:,}" if "teacher_forwards" in r else "-"
        lines.append(f"| {name} | {r['heldout_acc']:.3f} | {r['heldout_pair_acc']:.3f} | {r['seen_acc']:.3f} | "
                     f"{r['heldout_attr_acc']:.3f} / {r['seen_attr_acc']:.3f} | {mse} | {forwards} |")
    concepts = list(report["teacher"]["heldout_concepts"])
    lines += ["", "Held-out concepts, each: the share of samples asked for it that show it.", "",
              "| run | " + " | ".join(concepts) + " |", "|---" * (len(concepts) + 1) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['heldout_concepts'][k]:.2f}" for k in concepts) + " |")
    c = report["config"]
    lines.append("")
    lines.append(f"{c['student']}, {c['steps']} steps at batch {c['batch_size']}, {c['records']} records x "
                 f"{c['draws']} draws, {c['per_prompt']} samples per prompt (DDIM {c['sample_steps']}, guidance "
                 f"{c['guidance']}), high-noise weight {c['high_noise_weight']}; {report['seconds']:.0f} s in all.")
    return "\n".join(lines)


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))
