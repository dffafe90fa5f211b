"""The benchmarks' configs, without torch (the CLI reads their defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdit.config import DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, SD15_CONFIG_DIR, check_scheduler, vae_factor
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
class BenchRayEncodeConfig:
    images: int = 1024  # generated, in one Parquet file
    resolution: int = 128
    batch_size: int = 32
    shard_size: int = 256
    workers: int = 1  # encoder actors of each engine (Ray Data's decode tasks take the other CPUs)
    cpus: int = 2  # the local Ray's
    repeats: int = 2


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
    startup_shards: int = 1000  # the draw stream's start-up is timed on a random store of this many shards (0: not)
    # where the loader's supply is measured, on a random store at SD 1.5's size: "local" (a temporary folder) or a
    # URL (s3://bucket/prefix: object storage); none: not measured
    supply_at: tuple[str, ...] = ("local",)


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


# The stages of `sdit bench sd15` after the teacher's (always first), in the order they run, and what each needs.
SD15_STAGES = ("encode", "label", "train", "sample", "eval", "speed", "precision", "throughput")
SD15_NEEDS = {"label": "encode", "train": "label", "sample": "train", "eval": "train"}
ALL_PRESETS = ("SDiT-S/2", "SDiT-B/2", "SDiT-L/2", "SDiT-XL/2")


@dataclass(frozen=True)
class Sd15Config:
    out: str = "runs/bench-sd15"  # photographs, store, runs, samples
    cache: str | None = None  # the random teacher, built once; default: the user's cache folder (~/.cache/sdit)
    config_dir: str = str(SD15_CONFIG_DIR)  # the architecture (tests pass a tiny one)
    seed: int = 0  # of the random teacher's weights
    stages: tuple[str, ...] = ("encode", "label", "train", "sample", "eval", "speed", "precision")
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
    scheduler: str = DEFAULT_SCHEDULER
    # the side-by-side sampling speed: whole sampling runs (text encoder, guided loop, VAE decode) of the teacher
    # and each student, `repeats` alternating rounds after a warm-up run of `warmup_steps` steps each
    speed_students: tuple[str, ...] = ("SDiT-S/2", "SDiT-B/2")
    speed_images: int = 1  # batch of the side-by-side sampling
    speed_steps: int = 25
    repeats: int = 3
    warmup_steps: int = 1
    profile: bool = True  # a separate, untimed one-step pass per model for the share of attention (on CPU)
    fp16_latent: int = 8  # the fp16 teacher's latent side of the precision stage on CPU, where fp16 is slow
    # throughput at real batch sizes (the GPU check)
    throughput_presets: tuple[str, ...] = ALL_PRESETS
    throughput_resolutions: tuple[int, ...] = (256, 512)
    train_batches: tuple[int, ...] = (64, 32)  # per resolution
    label_batch: int = 64
    throughput_steps: int = 10  # timed calls after 2 warm-up calls
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None  # torch threads of every child; default: this machine's cores

    @classmethod
    def for_device(cls, device: str, **options) -> "Sd15Config":
        """The CPU defaults, or on a GPU the same stages at real batch sizes, every preset side by side and the
        throughput stage instead of the precision one; `options` override either. `auto` is CUDA when there is one."""
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda"):
            options = dict(stages=tuple(s for s in SD15_STAGES if s != "precision"), records=256, draws=4,
                           prompts=16, synth_steps=25, synth_scheduler="pndm", train_steps=20, batch_size=32,
                           sample_steps=25, speed_images=8, speed_students=ALL_PRESETS, profile=False) | options
        return cls(device=device, **options)

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
               self.speed_steps, self.repeats, self.warmup_steps) < 1:
            raise SDiTError("--records, --draws, --train-steps, --batch-size, --sample-steps, --speed-images, "
                            "--speed-steps and --repeats must be at least 1")
        if unknown := [s for s in self.stages if s not in SD15_STAGES]:
            raise SDiTError(f"unknown stages {unknown}; choose from: {', '.join(SD15_STAGES)}")
        for stage in self.stages:
            if stage in SD15_NEEDS and SD15_NEEDS[stage] not in self.stages:
                raise SDiTError(f"--stage {stage} needs what --stage {SD15_NEEDS[stage]} makes: add it")
        check_scheduler(self.scheduler, "--scheduler")
        check_scheduler(self.synth_scheduler, "--synth-scheduler")

    @property
    def teacher_config(self) -> str | None:
        """--teacher-config of the single file: none for SD 1.5's own configs."""
        return None if Path(self.config_dir).resolve() == SD15_CONFIG_DIR.resolve() else self.config_dir
