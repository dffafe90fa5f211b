"""The benchmarks' and the shapes-world experiments' configs, without torch (the CLI reads their defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sdit.config import (DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, SD15_CONFIG_DIR, TOY_TEACHER, PerturbConfig,
                         check_scheduler,
                         vae_factor)
from sdit.errors import SDiTError
from sdit.presets import DEFAULT_PRESETS, PRESETS


@dataclass(frozen=True)
class BenchEncodeConfig:
    source: str | None = None  # default: `images * 2` generated images
    teacher: str | None = None  # default: a tiny random SD-shaped teacher
    teacher_config: str | None = None
    images: int = 1024  # the small run; the large run encodes twice as many
    resolution: int = 128  # at 64 px the tiny VAE's forward costs less than decoding a PNG
    batch_size: int = 32
    shard_size: int = 512
    device: str = "auto"
    dtype: str = "auto"


@dataclass(frozen=True)
class BenchLabelConfig:
    store: str | None = None  # default: generated images encoded with the teacher
    teacher: str | None = None  # default: a tiny random SD-shaped teacher
    teacher_config: str | None = None
    images: int = 256
    resolution: int = 64
    draws: int = 4
    batch_size: int = 64
    project_images: int = 1_000_000  # for the projected wall time
    project_draws: int = 4
    device: str = "auto"
    dtype: str = "auto"


@dataclass(frozen=True)
class BenchTrainConfig:
    store: str | None = None  # a labelled store; default: generated images, encoded and labelled
    teacher: str | None = None  # default: a tiny random SD-shaped teacher (the online step runs its UNet)
    teacher_config: str | None = None
    student: str = "SDiT-T/2"  # the demo's student
    images: int = 1024  # 4x the shuffle window, so that the timed steps read most of the store
    draws: int = 4
    batch_size: int = 64
    buffer_records: int = 256  # the loader's shuffle window
    steps: int = 64  # timed steps per measurement (1,024 records x 4 draws / 64: one pass over the store)
    warmup: int = 3  # untimed steps first, on in-memory batches: the store is read cold in the timed steps
    device: str = "auto"


@dataclass(frozen=True)
class BenchSampleConfig:
    run: str | None = None  # default: an untrained `student` beside the tiny teacher
    teacher: str | None = None  # default: the run's teacher, or the tiny one
    teacher_config: str | None = None
    student: str = "SDiT-T/2"  # preset of the default run
    images: int = 8  # per timed run, in one batch
    steps: int = 20
    scheduler: str = DEFAULT_SCHEDULER
    guidance: float = DEFAULT_GUIDANCE
    resolution: int | None = None  # pixels; default: the student's
    repeats: int = 3
    presets: tuple[str, ...] = DEFAULT_PRESETS
    flops_latent: int = 64  # SD 1.5's latent side at 512 px
    device: str = "auto"
    dtype: str = "auto"

    def check(self) -> None:
        check_scheduler(self.scheduler, "--scheduler")
        if min(self.images, self.steps, self.repeats) < 1:
            raise SDiTError("--images, --steps and --repeats must be at least 1")
        if unknown := [p for p in (self.student, *self.presets) if p not in PRESETS]:
            raise SDiTError(f"unknown student presets {unknown}; choose from: {', '.join(PRESETS)}")


@dataclass(frozen=True)
class MemoryConfig:
    presets: tuple[str, ...] = DEFAULT_PRESETS
    batches: tuple[int, ...] = (1, 2, 4)
    max_batch: dict | None = None  # preset -> the largest batch to run (the rest extrapolated), e.g. to save time
    checkpointing: tuple[bool, ...] = (False, True)
    sample_size: int = 64  # latent side: 512 px
    text_dim: int = 768
    tokens: int = 77
    max_rss_gb: float = 11.0  # never start a child predicted to go above this
    max_step_seconds: float = 400.0  # nor one whose step is predicted to take longer
    threads: int | None = None

    def check(self) -> None:
        if unknown := [p for p in self.presets if p not in PRESETS]:
            raise SDiTError(f"unknown student presets {unknown}; choose from: {', '.join(PRESETS)}")
        if not self.batches or min(self.batches) < 1:
            raise SDiTError("--batch: each at least 1")


@dataclass(frozen=True)
class Sd15Config:
    out: str = "runs/bench-sd15"  # photographs, store, runs, samples
    cache: str | None = None  # the random teacher, built once; default: OUT/teacher
    config_dir: str = str(SD15_CONFIG_DIR)  # the architecture (tests pass a tiny one)
    seed: int = 0  # of the random teacher's weights
    records: int = 8
    resolution: int = 512
    draws: int = 2
    prompts: int = 1  # the text-only prompt bank, each sampled `synthesize` times by the teacher
    synthesize: int = 1
    synth_steps: int = 2
    synth_scheduler: str = "ddim"  # 2 steps = 4 guided forwards (PNDM's extra first step would add 2)
    students: tuple[str, ...] = ("SDiT-S/2", "SDiT-B/2")
    checkpointing: tuple[bool, ...] = (False, True)
    train_steps: int = 2
    batch_size: int = 2
    sample_steps: int = 2
    guidance: float = DEFAULT_GUIDANCE
    sample_guidance: tuple[float, ...] = (DEFAULT_GUIDANCE, 1.0)  # one `sdit sample` run each: guided, unguided
    eval: bool = True
    scheduler: str = DEFAULT_SCHEDULER
    speed_students: tuple[str, ...] = ("SDiT-S/2", "SDiT-B/2")
    speed_images: int = 1  # batch of the side-by-side sampling
    speed_steps: int = 2
    project_steps: int = 25  # images/s projected to this many steps from the parts' timings
    precision: bool = True  # the fp16/bf16 paths against fp32 (on CPU)
    fp16_latent: int = 8  # the fp16 teacher's latent side on CPU, where fp16 has no fast kernels
    # throughput at real batch sizes (the GPU check; none on CPU by default)
    throughput_presets: tuple[str, ...] = ()
    throughput_resolutions: tuple[int, ...] = (256, 512)
    train_batches: tuple[int, ...] = (64, 32)  # per resolution
    label_batch: int = 64
    throughput_steps: int = 10  # timed calls after 2 warm-up calls

    @classmethod
    def for_device(cls, device: str, **options) -> "Sd15Config":
        """The CPU defaults, or on a GPU the same stages at real batch sizes plus the throughput of every preset,
        sized to take about 8 minutes on one GPU; `options` override either. `auto` is CUDA when there is one."""
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda"):
            options = dict(records=256, draws=4, prompts=16, synth_steps=25, synth_scheduler="pndm", train_steps=20,
                           batch_size=32, sample_steps=25, speed_images=8, speed_steps=25,
                           speed_students=("SDiT-S/2", "SDiT-B/2", "SDiT-L/2", "SDiT-XL/2"), precision=False,
                           throughput_presets=("SDiT-S/2", "SDiT-B/2", "SDiT-L/2", "SDiT-XL/2")) | options
        return cls(device=device, **options)
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None  # torch threads of every child; default: this machine's cores

    def check(self) -> None:
        factor, latent_channels = vae_factor(Path(self.config_dir))
        if self.resolution <= 0 or self.resolution % factor:
            raise SDiTError(f"--resolution {self.resolution}: the VAE divides images by {factor}; use a positive "
                            f"multiple of {factor} (512 for SD 1.5)")
        if len(self.train_batches) != len(self.throughput_resolutions):
            raise SDiTError("one training batch per throughput resolution")
        for res in self.throughput_resolutions:
            if res % (factor * 8):
                raise SDiTError(f"throughput resolution {res}: a multiple of {factor * 8}")
        if unknown := [p for p in (*self.students, *self.speed_students, *self.throughput_presets)
                       if p not in PRESETS]:
            raise SDiTError(f"unknown student presets {unknown}; choose from: {', '.join(PRESETS)}")
        latent = self.resolution // factor
        for preset in (*self.students, *self.speed_students):
            if latent % PRESETS[preset].patch_size:
                raise SDiTError(f"{preset}: its patch {PRESETS[preset].patch_size} does not divide the "
                                f"{latent}x{latent} latent grid of {self.resolution} px; pick another --resolution "
                                f"(a multiple of {factor * PRESETS[preset].patch_size}) or patch")
        if min(self.records, self.draws, self.train_steps, self.batch_size, self.sample_steps, self.speed_images,
               self.speed_steps) < 1:
            raise SDiTError("--records, --draws, --train-steps, --batch-size, --sample-steps, --speed-images and "
                            "--speed-steps must be at least 1")
        check_scheduler(self.scheduler, "--scheduler")
        check_scheduler(self.synth_scheduler, "--synth-scheduler")

    @property
    def teacher_config(self) -> str | None:
        """--teacher-config of the single file: none for SD 1.5's own configs."""
        return None if Path(self.config_dir).resolve() == SD15_CONFIG_DIR.resolve() else self.config_dir


# Real pairs, with the empty caption one draw in ten so that every student can use classifier-free guidance.
PLAIN = PerturbConfig(mix={"none": 0.9, "null": 0.1})


PERTURBED = PerturbConfig()  # the default mix: none, input, swap, mix, null (swap and mix at high noise only)


@dataclass(frozen=True)
class Recipe:
    labels: str  # the kind of labelling the run trains on: plain, perturbed, synthetic or guided
    kd_weight: float
    task_weight: float = 1.0


RECIPES = {
    "no_teacher": Recipe("plain", 0.0),
    "kd": Recipe("plain", 1.0),
    "kd_perturb": Recipe("perturbed", 1.0),
    "kd_synth": Recipe("synthetic", 1.0),
    "kd_guided": Recipe("guided", 1.0, task_weight=0.0),  # guided targets: the true noise is no target
}


GUIDED_LABELS = "guided"


# What a variant (`--variants FILE`) may change of the run it starts `from`: its labelling's options, then its
# training's. Each takes the type given.
LABEL_OPTIONS = {"perturb": str, "caption_min_t": int, "prompt_share": float, "draws": int, "guidance_range": str}


TRAIN_OPTIONS = {"steps": int, "batch_size": int, "lr": float, "high_noise_weight": float, "kd_weight": float,
                 "task_weight": float, "student": str}


PROMPTS_PER_PAIR = 6  # each shape-colour pair of the evaluation prompts: 3 backgrounds x 2 sizes


@dataclass(frozen=True)
class DistillConfig:
    out: str = "runs/distill"
    teacher: str = str(TOY_TEACHER)
    runs: tuple[str, ...] = tuple(RECIPES)
    # More runs, each a recipe of RECIPES with some options changed: name -> {"from": recipe, option: value}
    # (LABEL_OPTIONS, TRAIN_OPTIONS). The tuning tables are such files (`load_variants`).
    variants: dict[str, dict] = field(default_factory=dict)
    synth_samples: int = 1  # teacher samples per prompt for kd_synth
    # The prompt bank: this many prompts of each of the 36 shape-colour pairs (None: all 1,944). 12 (432 prompts)
    # covers the world evenly at 4.5x fewer teacher forwards for kd_synth's samples.
    bank_per_pair: int | None = 12
    records: int = 1000  # the limited split
    draws: int = 8
    student: str = "SDiT-T/2"
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3  # 3e-3 learnt shapes sooner than 1e-3 for both kinds of student (1,000-step runs)
    warmup: int = 100
    ema_decay: float = 0.999
    high_noise_weight: float = 5.0  # every run's (0: off); it helped every student (docs/shapes-world.md)
    holdout: float = 0.05  # records kept out of training, for the teacher-agreement figure
    per_prompt: int = 2  # samples per evaluation prompt
    sample_steps: int = 25
    guidance: float = 3.0  # students and teacher; better than 5 for both (docs/shapes-world.md)
    guidance_range: tuple[float, float] = (1.0, 5.0)  # kd_guided's labels: w drawn per draw from this window
    seed: int = 0
    perturb: PerturbConfig = field(default_factory=lambda: PERTURBED)
    curve_points: int = 8  # checkpoints of each run scored for its learning curve (0: no curves)
    curve_prompts: int = 2  # per shape-colour pair of the evaluation prompts (of 6), for the curves
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
        if self.jobs < 0:
            raise SDiTError("--jobs must be at least 0 (0: as many as runs, up to the cores)")
        if self.curve_points < 0 or not 1 <= self.curve_prompts <= PROMPTS_PER_PAIR:
            raise SDiTError(f"--curve-points must be >= 0 and --curve-prompts in 1..{PROMPTS_PER_PAIR}")
        if not Path(self.teacher).exists():
            raise SDiTError(f"teacher not found: {self.teacher} (the toy teacher ships in data/toy-sd)")

    @property
    def names(self) -> tuple[str, ...]:
        """Every run of the experiment: --runs, then the variants."""
        return (*self.runs, *self.variants)


def check_variant(name: str, options: dict) -> None:
    """A variant's name and options, refused in one line when wrong."""
    if not name.replace("_", "").replace("-", "").isalnum() or name in RECIPES or name.startswith("init"):
        raise SDiTError(f"variant {name!r}: use letters, digits, '_' and '-', and not a run's name or 'init...'")
    if options.get("from") not in RECIPES:
        raise SDiTError(f"variant {name!r}: say which run it changes, from = one of {list(RECIPES)}")
    allowed = LABEL_OPTIONS | TRAIN_OPTIONS
    for key, value in options.items():
        if key == "from":
            continue
        if key not in allowed:
            raise SDiTError(f"variant {name!r}: unknown option {key!r}; choose from {', '.join(allowed)}")
        kind = allowed[key]
        if not isinstance(value, kind) and not (kind is float and isinstance(value, int)):
            raise SDiTError(f"variant {name!r}: {key} takes a {kind.__name__}, not {value!r}")
    if "student" in options and options["student"] not in PRESETS:
        raise SDiTError(f"variant {name!r}: unknown student preset {options['student']!r}")
    if "perturb" in options:  # a mix that does not sum to 1 is refused before the experiment starts
        try:
            PerturbConfig.from_option(options["perturb"])
        except SDiTError as err:
            raise SDiTError(f"variant {name!r}: {err}") from None


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
