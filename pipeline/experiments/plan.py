"""The experiment's plan: the runs of `sdit bench distill` (its recipes and a TOML file's variants), the labellings
they need (runs that would draw the same share one), and each run's training options."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from pipeline.experiments.config import (
    GUIDED_LABELS,
    PLAIN,
    RECIPES,
    SYNTHESIS_LABELS,
    TRAIN_OPTIONS,
    DistillConfig,
    has_trajectories,
)
from pipeline.label import LabelConfig
from pipeline.train import TrainConfig
from sdit.errors import SDiTError
from sdit.perturb import PerturbConfig
from sdit.run import RUN_FILE, read_run

STORE = "store"  # OUT/store: the limited split and the prompt bank, encoded, and the labellings
# A store holds one set of synthetic records: kd_synth's samples go into STORE, every other labelling that makes some
# (kd_traj's trajectories, a variant's) into a copy of the encoded store of its own, OUT/store-<labels name>.


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
    kind: str  # plain, perturbed, synthetic, trajectory or guided (Recipe.labels)
    perturb: PerturbConfig
    draws: int
    guidance: tuple[float, float] | None  # guided targets: w drawn per draw in this window
    guidance_conditional: float = 0.0  # guided targets: this share of draws at w = 1 instead
    guidance_fresh: bool = False  # guided targets: both ε kept, w drawn afresh in training
    samples: int = 0  # the teacher's samples (or trajectories) per prompt of the bank; 0: none
    trajectory_steps: int = 0  # trajectories: the DDIM schedule they step through


@dataclass(frozen=True)
class Run:
    """One student of the experiment: the labelling it trains on, where it starts, what its training changes."""
    recipe: str
    labels: str  # the labelling's name in the store
    store: str  # the store's folder in OUT (`store_of`)
    init: str  # the folder (in OUT) of its initial weights, shared by every run of its student and kind
    student: str  # its preset
    guidance_linear: bool  # a guided student that takes w at its output (sdit init --guidance-linear)
    text_positions: int | None  # of the text its student cross-attends to (sdit init --text-positions)
    training: dict  # TrainConfig fields set for this run: its recipe's weights, a variant's training options


def plan(config: DistillConfig) -> tuple[dict[str, Labelling], dict[str, Run]]:
    """The labellings the runs need (runs that would draw the same share one) and each run."""
    labellings: dict[str, Labelling] = {}
    runs: dict[str, Run] = {}
    for name in config.names:
        options = config.options(name)
        recipe = RECIPES[options["from"]]
        labelling = _labelling(config, recipe.labels, options)
        labels = next((k for k, v in labellings.items() if v == labelling), None)
        if labels is None:  # a recipe's own labelling keeps its kind's name; a variant's takes the variant's
            labels = recipe.labels if labelling == _labelling(config, recipe.labels, recipe.options) else name
            labellings[labels] = labelling
        student = options.get("student", config.student)
        linear = bool(options.get("guidance_linear"))
        positions = options.get("text_positions", config.text_positions)
        init = "init" + ("-guided" if recipe.labels == GUIDED_LABELS else "") + ("-linear" if linear else "") + (
            "" if student == config.student else "-" + student.replace("/", "-")) + (
            "" if positions == config.text_positions else f"-text{positions}")
        training = {"kd_weight": recipe.kd_weight, "task_weight": recipe.task_weight} | {
            k: v for k, v in options.items() if k in TRAIN_OPTIONS and k != "student"}
        if "fresh_guidance_range" in training:
            training["fresh_guidance_range"] = LabelConfig.parse_guidance(training["fresh_guidance_range"])
        runs[name] = Run(options["from"], labels, store_of(labels, labelling), init, student, linear, positions,
                         training)
    return labellings, runs


def store_of(name: str, labelling: Labelling) -> str:
    """The store folder (in OUT) of labelling `name`."""
    return STORE if not labelling.samples or name == "synthetic" else f"{STORE}-{name}"


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
    trajectories = has_trajectories(kind, options)  # kd_guided's may have them too
    # samples (or trajectories) default to --synth-samples for kd_synth, kd_traj and guided trajectory variants; a
    # guided variant without trajectories has finished samples only where it sets synth_samples
    samples = options.get("synth_samples", config.synth_samples if kind in SYNTHESIS_LABELS or trajectories else 0)
    steps = options.get("trajectory_steps", config.trajectory_steps) if trajectories else 0
    conditional = options.get("guidance_conditional", 0.0) if kind == GUIDED_LABELS else 0.0
    fresh = bool(options.get("fresh_guidance")) if kind == GUIDED_LABELS else False
    return Labelling(kind, perturb, options.get("draws", config.draws), guidance, conditional, fresh, samples, steps)


def train_configs(config: DistillConfig, runs: dict[str, Run]) -> dict[str, TrainConfig]:
    """Each run's training options: the experiment's, but for its labels, initial weights and its own options.
    A run folder trained before (an interrupted experiment) resumes."""
    trainings = {}
    for name, run in runs.items():
        steps = run_steps(config, run)
        out = Path(config.out) / name
        trainings[name] = replace(TrainConfig(
            store=str(Path(config.out) / run.store), out=str(out), labels=run.labels,
            init=str(Path(config.out) / run.init),
            steps=config.steps, batch_size=config.batch_size, lr=config.lr, warmup=config.warmup,
            lr_schedule=config.lr_schedule, ema_decay=config.ema_decay, high_noise_weight=config.high_noise_weight,
            holdout=config.holdout, seed=config.seed, sample_every=0,
            resume=(out / RUN_FILE).exists() and "train" in read_run(out),
            # curve_points checkpoints, the last at the final step (none a few steps apart)
            checkpoint_every=-(-steps // max(config.curve_points, 1)), keep_checkpoints=max(config.curve_points, 1)),
            **run.training)
    return trainings


def run_steps(config: DistillConfig, run: Run) -> int:
    """The steps a run trains: the experiment's, or its variant's own."""
    return run.training.get("steps", config.steps)


def longest_steps(config: DistillConfig) -> int:
    """The steps of the longest-training run of the experiment (a variant may train longer than --steps)."""
    return max(_all_steps(config))


def total_steps(config: DistillConfig) -> int:
    """The steps of all the experiment's runs together."""
    return sum(_all_steps(config))


def _all_steps(config: DistillConfig) -> list[int]:
    config.check()  # bad variants are refused in one line before their steps are read
    return [run_steps(config, run) for run in plan(config)[1].values()]
