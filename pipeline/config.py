"""The stages' configs: one frozen dataclass a stage, its defaults and its checks.

Nothing here imports torch, diffusers or transformers: the CLI builds its options from these defaults before any
command runs, and each stage module imports its config from here.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from sdit.config import (
    CLIP_SCORES,
    DEFAULT_GUIDANCE,
    DEFAULT_SCHEDULER,
    PerturbConfig,
    SynthesisConfig,
    check_high_noise_weight,
    check_scheduler,
    labels_group,
)
from sdit.errors import SDiTError
from sdit.fid_protocols import DEFAULT_PROTOCOL
from sdit.presets import PRESETS, check_text_positions


def check_cluster_path(ray_address: str | None, path: str, what: str) -> None:
    """Joining a Ray cluster, workers write the store wherever they run: a relative path there is not the driver's
    folder, so it is refused in one line before any work (a URL, or an absolute path every machine mounts)."""
    if ray_address and ray_address != "local" and "://" not in path and not os.path.isabs(path):
        raise SDiTError(f"{what} {path} is a relative path, which each machine of the Ray cluster at {ray_address} "
                        "would read from its own working folder: give an absolute path every machine mounts, or an "
                        "object-storage URL (s3://...)")


@dataclass(frozen=True)
class EncodeConfig:
    source: str
    teacher: str
    out: str
    teacher_config: str | None = None
    prompts: str | None = None  # a text file (one prompt a line) or a parquet file with `prompt_column`
    prompt_column: str = "text"
    resolution: int | None = None  # square image side; None: the teacher VAE's sample_size (`with_resolution`)
    min_size: int | None = None  # smallest accepted short side; default resolution // 4
    batch_size: int = 16
    shard_size: int = 1024
    limit: int | None = None  # encode only the first N source items
    strict: bool = False
    overwrite: bool = False
    device: str = "auto"
    dtype: str = "auto"
    image_column: str = "image"
    caption_column: str = "text"
    id_column: str | None = None
    caption_key: str | None = None
    ray_address: str | None = None
    num_workers: int | None = None
    # Torch threads per CPU worker. CPU convolutions round differently with another thread count, so
    # every executor uses the same one (default: this machine's) and writes the same bytes.
    threads: int | None = None

    def check(self) -> None:
        check_cluster_path(self.ray_address, self.out, "--out")
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            raise SDiTError(f"--resolution {self.resolution}: must be a positive multiple of 8")
        for name in ("batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise SDiTError(f"--{name.replace('_', '-')} must be at least 1")
        if self.limit is not None and self.limit < 0:
            raise SDiTError("--limit must not be negative")

    def with_resolution(self, sample_size: int) -> "EncodeConfig":
        """This config with its resolution decided: `--resolution`, else the teacher VAE's `sample_size`."""
        return self if self.resolution is not None else dataclasses.replace(self, resolution=int(sample_size))

    @property
    def min_short_side(self) -> int:
        """The smallest accepted short side (of a config whose resolution is decided)."""
        return self.resolution // 4 if self.min_size is None else self.min_size


TIMESTEP_SAMPLING = ("uniform", "stratified")


def check_guidance_window(window: tuple[float, float] | None, option: str) -> None:
    """A window (w_min, w_max) of guidance scales, or None: refused in one line unless 0 <= w_min <= w_max."""
    if window is not None and not 0 <= window[0] <= window[1]:
        raise SDiTError(f"{option} {window}: give W_MIN:W_MAX with 0 <= W_MIN <= W_MAX")


@dataclass(frozen=True)
class LabelConfig:
    store: str
    teacher: str
    teacher_config: str | None = None
    name: str = "default"
    draws: int = 4
    timesteps: str = "uniform"
    perturb: PerturbConfig = dataclasses.field(default_factory=PerturbConfig)
    guidance: tuple[float, float] | None = None  # (w_min, w_max): store ε_u + w(ε_c − ε_u)
    # With guidance: this share of draws takes w = 1 (the conditional ε), on which a student learns the true noise too.
    guidance_conditional: float = 0.0
    # With guidance: keep ε_c and ε_u of each draw (one more fp16 array, no more teacher forwards), so that training
    # draws w afresh each time it reads the draw instead of the one w drawn here.
    guidance_fresh: bool = False
    seed: int = 0
    batch_size: int = 64
    max_dropped: float = 0.01  # stop when more than this fraction of draws has a non-finite teacher output
    overwrite: bool = False
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    ray_address: str | None = None
    num_workers: int | None = None
    synthesis: SynthesisConfig | None = None  # also make and label the teacher's samples for the prompt bank

    def check(self) -> None:
        check_cluster_path(self.ray_address, self.store, "STORE")
        if self.draws < 1 or self.batch_size < 1:
            raise SDiTError("--draws and --batch-size must be at least 1")
        if self.timesteps not in TIMESTEP_SAMPLING:
            raise SDiTError(f"--timesteps {self.timesteps!r}: choose {' or '.join(TIMESTEP_SAMPLING)}")
        check_guidance_window(self.guidance, "--guidance")
        if self.guidance_conditional and (self.guidance is None or not 0 <= self.guidance_conditional <= 1):
            raise SDiTError(f"--guidance-conditional {self.guidance_conditional}: a share from 0 to 1 of the draws "
                            "of guided labels (give --guidance W_MIN:W_MAX too)")
        if self.guidance_fresh and self.guidance is None:
            raise SDiTError("--fresh-guidance keeps both ε of guided labels: give --guidance W_MIN:W_MAX too")
        if not self.name or "/" in self.name:
            raise SDiTError(f"--labels {self.name!r}: a plain name, no '/'")
        if self.synthesis is not None:
            self.synthesis.check()
            if self.synthesis.trajectory not in (0, self.draws):
                raise SDiTError(f"trajectory draws: each record's {self.draws} draws are the states of its "
                                f"sample, so it stops after --draws steps (not {self.synthesis.trajectory})")

    @property
    def group(self) -> str:
        return labels_group(self.name)

    @staticmethod
    def parse_guidance(text: str | None, option: str = "--guidance") -> tuple[float, float] | None:
        """`--guidance W_MIN:W_MAX` (or another `option`'s) as a (w_min, w_max) window; None for unguided targets."""
        if not text:
            return None
        try:
            low, high = (float(x) for x in text.split(":"))
        except ValueError:
            raise SDiTError(f"{option} {text!r}: give W_MIN:W_MAX, e.g. 2:8") from None
        return low, high

    def label_group(self, group: str) -> str:
        """Where the labels of a records ("records") or synthetic ("synthetic") shard go."""
        return self.group if group == "records" else f"{self.group}/{group}"


@dataclass(frozen=True)
class InitConfig:
    teacher: str
    student: str  # a preset of sdit.presets.PRESETS
    out: str
    teacher_config: str | None = None
    sample_size: int | None = None  # latent side the student is built for; None: the teacher UNet's
    guidance_embed: bool = False  # a guidance-distilled student: it takes the CFG scale w (for guided labels)
    guidance_linear: bool = False  # with guidance_embed: w at the output, ε = u + w·d of two heads, not embedded
    text_positions: int | None = None  # of the text encoder's positions, the first the student cross-attends to
    seed: int = 0  # of the student's initial weights

    def check(self) -> None:
        if self.student not in PRESETS:
            raise SDiTError(f"unknown student preset {self.student!r}; choose one of: {', '.join(PRESETS)}")
        if self.sample_size is not None and self.sample_size < 1:
            raise SDiTError(f"--sample-size {self.sample_size}: at least 1")
        if self.guidance_linear and not self.guidance_embed:
            raise SDiTError("--guidance-linear is how a guidance-distilled student takes w: add --guidance-embed")
        check_text_positions(self.text_positions, "--text-positions")


LR_SCHEDULES = ("constant", "cosine", "linear")  # after the warm-up; cosine and linear decay to 0 at --steps
LOGS = ("jsonl", "tensorboard")  # metrics.jsonl always; tensorboard adds event files beside it


@dataclass(frozen=True)
class TrainConfig:
    store: str
    out: str
    labels: str = "default"
    init: str | None = None  # a run folder from `sdit init`, copied into `out`; None: `train`'s make_run makes it
    steps: int = 10_000
    batch_size: int = 64  # global: split over data-parallel workers
    grad_accum: int = 1  # each worker's share of the batch in this many forward-backward passes a step
    lr: float = 1e-4
    warmup: int = 500
    lr_schedule: str = "constant"  # after the warm-up: constant, or a decay to 0 at `steps` (LR_SCHEDULES)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    task_weight: float = 1.0
    kd_weight: float = 1.0
    min_snr: float = 0.0  # γ of min-SNR timestep weighting; 0: off, every timestep counts the same
    high_noise_weight: float = 0.0  # γ: weight draws by min(1/ᾱ_t, γ) (sdit.losses.high_noise_weight); 0: off
    synthetic_weight: float = 1.0  # scales the loss (task and KD) of synthetic records' draws
    # labels with fresh guidance: draw training's w from this window (w_min, w_max) instead of the labels' own
    fresh_guidance_range: tuple[float, float] | None = None
    holdout: float = 0.0  # fraction of records held out for `sdit eval`
    seed: int = 0
    buffer_records: int = 1024  # records in the shuffle window
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    sample_every: int = 0  # 0: only at the end
    sample_prompts: int = 8  # 0: no sample grids
    # How the sample grids (and --eval-clip's samples) are drawn: `sdit sample`'s defaults.
    sample_steps: int = 25
    sample_guidance: float = DEFAULT_GUIDANCE
    sample_scheduler: str = DEFAULT_SCHEDULER
    eval_every: int = 0  # 0: never; else teacher agreement on held-out draws every N steps
    eval_draws: int = 256  # held-out draws per evaluation (the same ones every time)
    eval_clip: str | None = None  # a local CLIPModel folder: also the CLIP score of the sample captions
    log: str = "jsonl"
    gradient_checkpointing: bool = False
    precision: str = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU; or fp32, bf16
    device: str = "auto"
    threads: int | None = None
    resume: bool = False

    def check(self) -> None:
        if min(self.steps, self.batch_size, self.grad_accum, self.checkpoint_every, self.keep_checkpoints) < 1:
            raise SDiTError("--steps, --batch-size, --grad-accum, --checkpoint-every and --keep-checkpoints must be at "
                            "least 1")
        if self.task_weight < 0 or self.kd_weight < 0 or self.task_weight + self.kd_weight == 0:
            raise SDiTError("--task-weight and --kd-weight must be >= 0, and not both 0")
        check_high_noise_weight(self.high_noise_weight)
        if self.min_snr < 0:
            raise SDiTError(f"--min-snr {self.min_snr}: a γ above 0 (e.g. 5), or 0 (off)")
        if self.synthetic_weight < 0:
            raise SDiTError(f"--synthetic-weight {self.synthetic_weight}: must be >= 0")
        check_guidance_window(self.fresh_guidance_range, "--fresh-guidance-range")
        if not 0 <= self.holdout < 1:
            raise SDiTError(f"--holdout {self.holdout}: a fraction in [0, 1)")
        if not 0 <= self.ema_decay < 1:
            raise SDiTError(f"--ema-decay {self.ema_decay}: in [0, 1)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise SDiTError(f"--lr-schedule {self.lr_schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise SDiTError(f"--dtype {self.precision!r}: auto, fp32 or bf16")
        if self.eval_every < 0 or self.eval_draws < 1:
            raise SDiTError("--eval-every must be >= 0 and --eval-draws at least 1")
        if self.eval_every and not self.holdout:
            raise SDiTError("--eval-every measures the student on held-out draws: give --holdout F (e.g. 0.01)")
        if self.eval_clip and not self.eval_every:
            raise SDiTError("--eval-clip scores samples at each evaluation: give --eval-every N too")
        if self.eval_clip and not self.sample_prompts:
            raise SDiTError("--eval-clip scores samples of the sample captions: --sample-prompts must be at least 1")
        if self.sample_steps < 1 or self.sample_guidance < 0:
            raise SDiTError("--sample-steps must be at least 1 and --sample-guidance at least 0")
        check_scheduler(self.sample_scheduler, "--sample-scheduler")
        if self.log not in LOGS:
            raise SDiTError(f"--log {self.log!r}: choose one of {', '.join(LOGS)}")


@dataclass(frozen=True)
class SampleConfig:
    run: str
    out: str
    prompts: tuple[str, ...] = ()
    prompts_file: str | None = None  # one prompt a line; blank lines are skipped
    negative_prompt: str | None = None
    num_images: int = 1  # per prompt
    height: int | None = None  # pixels; default: the student's training size
    width: int | None = None
    steps: int = 25
    guidance: float = DEFAULT_GUIDANCE
    scheduler: str = DEFAULT_SCHEDULER
    seed: int = 0
    batch_size: int = 8
    columns: int = 8  # of the grid
    compare_teacher: str | None = None
    teacher_config: str | None = None
    device: str = "auto"
    dtype: str = "auto"

    def check(self) -> None:
        check_scheduler(self.scheduler, "--scheduler")
        for name in ("num_images", "steps", "batch_size", "columns"):
            if getattr(self, name) < 1:
                raise SDiTError(f"--{name.replace('_', '-')} must be at least 1")
        if self.guidance < 0:
            raise SDiTError(f"--guidance {self.guidance}: the CFG scale cannot be negative")
        if self.teacher_config and not self.compare_teacher:
            raise SDiTError("--teacher-config describes the --compare-teacher file; give that too")


@dataclass(frozen=True)
class EvalConfig:
    run: str
    store: str | None = None  # teacher agreement on the store's held-out draws
    labels: str | None = None  # default: the labels the run trained on
    holdout: float | None = None  # default: the run's --holdout
    split_seed: int | None = None  # default: the run's split seed
    buckets: int = 10  # timestep buckets of equal width over [0, T)
    batch_size: int = 64
    limit: int | None = None  # at most this many held-out draws
    device: str = "auto"
    dtype: str = "auto"  # the student's; MSEs are accumulated in float64 whatever it is
    # the sampling protocol (pipeline/eval_samples.py)
    prompts: str | None = None  # a text file (one a line) or parquet; default: the captions of `references`
    prompt_column: str = "text"
    references: str | None = None  # images (folder, parquet, webdataset): FID statistics, and captions
    num: int = 64  # images per model: image i shows prompt i mod P from seed `seed + i`
    teacher: str | None = None  # also sample the teacher the same way
    teacher_config: str | None = None
    out: str | None = None  # the samples' folder; default RUN/eval-samples
    resolution: int | None = None  # pixels, square; default the student's training size
    steps: int = 25
    guidance: float = DEFAULT_GUIDANCE
    scheduler: str = DEFAULT_SCHEDULER
    seed: int = 0
    sample_batch_size: int = 8
    clip_model: str | None = None
    clip_score: str | None = None  # sdit.config.CLIP_SCORES; default: the protocol's ("bk-sdm" under bk-sdm)
    fid_inception: str | None = None  # NVlabs' inception-2015-12-05.pt (sdit.fid)
    fid_protocol: str = DEFAULT_PROTOCOL  # sdit.fid_protocols.PROTOCOLS: every step from image to network
    fid_stats: str | None = None  # published statistics (.npz with mu, sigma) instead of `references`
    fid_stats_protocol: str | None = None  # the protocol of a --fid-stats file that does not say it
    fid_size: int | None = None  # images become fid_size² before the network; default: the protocol's
    fid_references: int | None = None  # at most this many reference images in the statistics
    fid_cache: str | None = None  # where reference statistics are cached; default ~/.cache/sdit/fid-stats

    @property
    def sampling(self) -> bool:
        return bool(self.prompts or self.references)

    def check(self) -> None:
        from sdit.fid_protocols import get_protocol

        if min(self.buckets, self.batch_size, self.num, self.steps, self.sample_batch_size) < 1:
            raise SDiTError("--buckets, --batch-size, --num, --steps and --sample-batch-size must be at least 1")
        if self.holdout is not None and not 0 < self.holdout < 1:
            raise SDiTError(f"--holdout {self.holdout}: a fraction in (0, 1)")
        if not self.store and not self.sampling:
            raise SDiTError("nothing to evaluate: give STORE (teacher agreement on held-out draws) and/or "
                            "--prompts FILE or --references IMAGES (samples: FID, CLIP score)")
        if (self.clip_model or self.teacher or self.fid_inception) and not self.sampling:
            raise SDiTError("--clip-model, --teacher and --fid-inception score samples: give --prompts FILE "
                            "(or --references with captions) to say what to sample")
        if self.fid_inception and not (self.fid_stats or self.references):
            raise SDiTError("FID needs statistics to compare with: --fid-stats FILE.npz, or --references IMAGES")
        if self.fid_stats and not self.fid_inception:
            raise SDiTError("--fid-stats needs --fid-inception (the extractor the samples' features come from)")
        if self.fid_size is not None and self.fid_size < 8:
            raise SDiTError(f"--fid-size {self.fid_size}: at least 8 pixels")
        get_protocol(self.fid_protocol)
        if self.fid_stats_protocol is not None:
            get_protocol(self.fid_stats_protocol, "--fid-stats-protocol")
            if not self.fid_stats:
                raise SDiTError("--fid-stats-protocol says what a --fid-stats file holds: give --fid-stats FILE.npz")
        if self.clip_score is not None and not self.clip_model:
            raise SDiTError("--clip-score picks how CLIP cosines are averaged: give --clip-model too")
        if self.clip_score is not None and self.clip_score not in CLIP_SCORES:
            raise SDiTError(f"--clip-score {self.clip_score!r}: choose one of {', '.join(CLIP_SCORES)}")
        check_scheduler(self.scheduler, "--scheduler")


@dataclass(frozen=True)
class InspectConfig:
    store: str
    out: str
    synthetic: bool = False  # the teacher's samples (synthetic/) rather than the encoded images (records/)
    limit: int = 32  # the first records of the group, in store order
    vae: str | None = None  # a teacher (diffusers folder or single file) or a run folder; default: the store's teacher
    teacher_config: str | None = None
    columns: int = 8
    batch_size: int = 16
    device: str = "auto"

    def check(self) -> None:
        if min(self.limit, self.columns, self.batch_size) < 1:
            raise SDiTError("--limit, --columns and --batch-size must be at least 1")
