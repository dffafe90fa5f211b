"""The shapes-world experiments' configs, without torch (the CLI reads their defaults)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import LabelConfig
from sdit.config import TOY_TEACHER, PerturbConfig
from sdit.errors import SDiTError
from sdit.presets import PRESETS, check_text_positions
from sdit.shapes.config import EVAL_GUIDANCE, EVAL_STEPS

Say = Callable[[str], None]  # hears the name of each stage of an experiment as it starts


# Real pairs, with the empty caption one draw in ten so that every student can use classifier-free guidance.
PLAIN = PerturbConfig(mix={"none": 0.9, "null": 0.1})


PERTURBED = PerturbConfig()  # the default mix: none, input, swap, mix, null (swap and mix at high noise only)


@dataclass(frozen=True)
class Recipe:
    labels: str  # the kind of labelling the run trains on: plain, perturbed, synthetic, trajectory or guided
    kd_weight: float
    task_weight: float = 1.0
    # Variant options (LABEL_OPTIONS) the recipe sets itself; a variant `from` it starts from them.
    options: dict = field(default_factory=dict)


RECIPES = {
    "no_teacher": Recipe("plain", 0.0),
    "kd": Recipe("plain", 1.0),
    "kd_perturb": Recipe("perturbed", 1.0),
    "kd_synth": Recipe("synthetic", 1.0),
    "kd_traj": Recipe("trajectory", 1.0),  # labels only: the teacher's ε at states of its own sampler, no image
    # guided targets (the true noise is no target) on the records and on four trajectories per prompt of the bank,
    # their states on a 12-step schedule (t = 831 down to 250), keeping ε_c and ε_u so that training draws w afresh:
    # the guided recipe that passed 90% of kd_perturb at both seeds (docs/shapes-world.md)
    "kd_guided": Recipe("guided", 1.0, task_weight=0.0,
                        options={"trajectories": True, "synth_samples": 4, "trajectory_steps": 12,
                                 "fresh_guidance": True}),
}


GUIDED_LABELS = "guided"
SYNTHESIS_LABELS = ("synthetic", "trajectory")  # labellings that make the teacher sample the prompt bank first


# What a variant (`--variants FILE`) may change of the run it starts `from`: its labelling's options, then its
# training's. Each takes the type given.
LABEL_OPTIONS = {"perturb": str, "caption_min_t": int, "prompt_share": float, "draws": int, "guidance_range": str,
                 "guidance_conditional": float, "fresh_guidance": bool, "synth_samples": int, "trajectory_steps": int,
                 "trajectories": bool}


# ... and its student's initial weights (`sdit init`): w at the output rather than embedded, for guided labels; the
# text positions its cross-attention reads.
INIT_OPTIONS = {"guidance_linear": bool, "text_positions": int}


TRAIN_OPTIONS = {"steps": int, "batch_size": int, "lr": float, "warmup": int, "lr_schedule": str,
                 "high_noise_weight": float, "kd_weight": float, "task_weight": float, "synthetic_weight": float,
                 "student": str, "fresh_guidance_range": str}


PROMPTS_PER_PAIR = 6  # each shape-colour pair of the evaluation prompts: 3 backgrounds x 2 sizes


@dataclass(frozen=True)
class DistillConfig:
    out: str = "runs/distill"
    teacher: str = str(TOY_TEACHER)
    runs: tuple[str, ...] = tuple(RECIPES)
    # More runs, each a recipe of RECIPES with some options changed: name -> {"from": recipe, option: value}
    # (LABEL_OPTIONS, TRAIN_OPTIONS). The tuning tables are such files (`load_variants`).
    variants: dict[str, dict] = field(default_factory=dict)
    synth_samples: int = 1  # teacher samples per prompt for kd_synth, trajectories per prompt for kd_traj
    # kd_traj: its trajectories step through a DDIM schedule of this many steps; a record's `draws` states are those
    # after its first `draws` steps (16 steps, 8 draws: t = 869, 807, ..., 435, all at high noise).
    trajectory_steps: int = 16
    # The prompt bank: this many prompts of each of the 36 shape-colour pairs (None: all 1,944). 12 (432 prompts)
    # covers the world evenly at 4.5x fewer teacher forwards for kd_synth's samples.
    bank_per_pair: int | None = 12
    records: int = 1000  # the limited split
    draws: int = 8
    student: str = "SDiT-T/2"
    # Every student cross-attends to this many of the 77 text positions (None: all); the world's captions take 18 at
    # most.
    text_positions: int | None = None
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3  # 3e-3 learnt shapes sooner than 1e-3 for both kinds of student (1,000-step runs)
    warmup: int = 100
    lr_schedule: str = "constant"  # `train --lr-schedule` of every run
    ema_decay: float = 0.999
    high_noise_weight: float = 5.0  # every run's (0: off); it helped every student (docs/shapes-world.md)
    holdout: float = 0.05  # records kept out of training, for the teacher-agreement figure
    # Samples per evaluation prompt (2 or more: the intervals resample them). 17 keeps each held-out pair's standard
    # error at most 0.05 whatever its hit rate p: its 6 prompts give 102 samples, sqrt(p(1 - p) / 102) <= 0.0495.
    per_prompt: int = 17
    sample_steps: int = EVAL_STEPS
    guidance: float = EVAL_GUIDANCE  # students and teacher
    guidance_range: tuple[float, float] = (1.0, 3.0)  # kd_guided's labels: w drawn per draw from this window
    seed: int = 0
    perturb: PerturbConfig = field(default_factory=lambda: PERTURBED)
    curve_points: int = 8  # checkpoints of each run scored for its learning curve (0: no curves)
    curve_prompts: int = 2  # per shape-colour pair of the evaluation prompts (of 6), for the curves
    curve_per_prompt: int = 2  # samples per prompt of each curve point
    jobs: int = 0  # runs trained side by side, each in its own process (0: as many as runs, up to the cores)
    # The teacher's samples, kept for reruns with the same teacher, prompts, noise and sampler (None: in OUT).
    teacher_samples: str | None = None

    def check(self) -> None:
        if unknown := [r for r in self.runs if r not in RECIPES]:
            raise SDiTError(f"unknown runs {unknown}; choose from {list(RECIPES)}")
        if not self.runs and not self.variants:
            raise SDiTError("no runs: name some with --runs or give --variants")
        for name, options in self.variants.items():
            check_variant(name, options)
        if clash := set(self.runs) & set(self.variants):
            raise SDiTError(f"variants {sorted(clash)} are also runs of --runs: give them other names")
        if self.student not in PRESETS:
            raise SDiTError(f"unknown student preset {self.student!r}; choose one of: {', '.join(PRESETS)}")
        check_text_positions(self.text_positions, "--text-positions")
        if self.per_prompt < 2:
            raise SDiTError(f"--per-prompt {self.per_prompt}: give 2 or more (a score's 95% interval resamples each "
                            "prompt's samples)")
        for name in self.names:
            options = self.options(name)
            steps, draws = options.get("trajectory_steps", self.trajectory_steps), options.get("draws", self.draws)
            if has_trajectories(RECIPES[options["from"]].labels, options) and not draws < steps:
                option = "trajectory_steps" if "trajectory_steps" in options else "--trajectory-steps"
                raise SDiTError(f"{name}: a trajectory stops after its {draws} draws' steps, so {option} must be "
                                f"above --draws (now {steps})")
        if self.jobs < 0:
            raise SDiTError("--jobs must be at least 0 (0: as many as runs, up to the cores)")
        if self.curve_points < 0 or not 1 <= self.curve_prompts <= PROMPTS_PER_PAIR or self.curve_per_prompt < 1:
            raise SDiTError(f"--curve-points must be >= 0, --curve-prompts in 1..{PROMPTS_PER_PAIR} and "
                            "--curve-per-prompt at least 1")
        if not Path(self.teacher).exists():
            raise SDiTError(f"teacher not found: {self.teacher} (the toy teacher ships in data/toy-sd)")

    @property
    def names(self) -> tuple[str, ...]:
        """Every run of the experiment: --runs, then the variants."""
        return (*self.runs, *self.variants)

    def options(self, name: str) -> dict:
        """Run `name`'s options: `from` its recipe, the recipe's own options, then those its variant changes."""
        options = self.variants.get(name, {"from": name})
        return {**RECIPES[options["from"]].options, **options}


def check_variant(name: str, options: dict) -> None:
    """A variant's name and options, refused in one line when wrong."""
    if not name.replace("_", "").replace("-", "").isalnum() or name in RECIPES or name.startswith("init"):
        raise SDiTError(f"variant {name!r}: use letters, digits, '_' and '-', and not a run's name or 'init...'")
    if options.get("from") not in RECIPES:
        raise SDiTError(f"variant {name!r}: say which run it changes, from = one of {list(RECIPES)}")
    allowed = LABEL_OPTIONS | TRAIN_OPTIONS | INIT_OPTIONS
    for key, value in options.items():
        if key == "from":
            continue
        if key not in allowed:
            raise SDiTError(f"variant {name!r}: unknown option {key!r}; choose from {', '.join(allowed)}")
        kind = allowed[key]
        if not isinstance(value, kind) and not (kind is float and isinstance(value, int)):
            raise SDiTError(f"variant {name!r}: {key} takes a {kind.__name__}, not {value!r}")
    recipe = RECIPES[options["from"]]
    kind, merged = recipe.labels, {**recipe.options, **options}
    if "trajectories" in options and kind != GUIDED_LABELS:
        raise SDiTError(f"variant {name!r}: trajectories is for kd_guided's variants (kd_traj has them)")
    trajectories = has_trajectories(kind, merged)  # a guided student of trajectory draws takes kd_traj's options
    if "synth_samples" in options:
        if kind not in (*SYNTHESIS_LABELS, GUIDED_LABELS):
            raise SDiTError(f"variant {name!r}: synth_samples is for kd_synth's, kd_traj's or kd_guided's variants")
        if options["synth_samples"] < (1 if kind in SYNTHESIS_LABELS or trajectories else 0):
            raise SDiTError(f"variant {name!r}: synth_samples is 1 or more"
                            + (" (0, the records alone, for kd_guided's variants with trajectories = false)"
                               if kind == GUIDED_LABELS else ""))
    if "trajectory_steps" in options and not trajectories:
        raise SDiTError(f"variant {name!r}: trajectory_steps is for kd_traj's variants (or kd_guided's with "
                        "trajectories = true)")
    for key in ("guidance_range", "guidance_conditional", "fresh_guidance", "guidance_linear"):
        if options.get(key) and kind != GUIDED_LABELS:
            raise SDiTError(f"variant {name!r}: {key} is for students of guided labels (from = \"kd_guided\")")
    if "fresh_guidance_range" in options:
        if not merged.get("fresh_guidance"):
            raise SDiTError(f"variant {name!r}: fresh_guidance_range is the window training draws w from, for labels "
                            "with fresh_guidance = true")
        try:
            LabelConfig.parse_guidance(options["fresh_guidance_range"], "fresh_guidance_range")
        except SDiTError as err:
            raise SDiTError(f"variant {name!r}: {err}") from None
    if "student" in options and options["student"] not in PRESETS:
        raise SDiTError(f"variant {name!r}: unknown student preset {options['student']!r}")
    check_text_positions(options.get("text_positions"), f"variant {name!r}: text_positions")
    if "perturb" in options:  # a mix that does not sum to 1 is refused before the experiment starts
        try:
            PerturbConfig.from_option(options["perturb"])
        except SDiTError as err:
            raise SDiTError(f"variant {name!r}: {err}") from None


def has_trajectories(kind: str, options: dict) -> bool:
    """Whether labels of `kind` with a variant's `options` include trajectory draws: kd_traj's, or a kd_guided
    variant's with `trajectories = true` (guided targets at the states of the teacher's guided sampler)."""
    return kind == "trajectory" or bool(options.get("trajectories"))


@dataclass(frozen=True)
class SubstitutionConfig:
    sizes: tuple[int, ...] = (250, 500, 1000, 2000, 4000)  # records in the limited split
    multiplier_at: int = 1000  # N of the data multiplier: one of the sizes
    reference: str = "kd_perturb"  # the teacher run whose seen accuracy at N the no-teacher run must reach
    # Everything else as `bench distill` (runs, steps, student, seed, ...), without curves.
    distill: DistillConfig = field(default_factory=lambda: DistillConfig(
        out="runs/substitution", runs=("no_teacher", "kd_perturb"), curve_points=0))

    def check(self) -> None:
        self.distill.check()
        if len(self.sizes) < 2 or sorted(set(self.sizes)) != list(self.sizes) or self.sizes[0] < 1:
            raise SDiTError(f"--sizes {','.join(map(str, self.sizes))}: give two or more record counts, increasing")
        if self.multiplier_at not in self.sizes:
            raise SDiTError(f"--multiplier-at {self.multiplier_at} is not one of --sizes {list(self.sizes)}")
        if not {"no_teacher", self.reference} <= set(self.distill.names):
            raise SDiTError(f"the data multiplier compares no_teacher with {self.reference}: both must be in --runs")
