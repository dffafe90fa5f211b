"""Stage two: train the SDiT student from a labelled store, without the teacher.

    prepare (rank 0)   the run folder: `--init DIR` copied, or made by the caller's `make_run` (the CLI's
                       `--student PRESET` runs the init stage, pipeline/init.py); checked against the store
    stream             shuffled batches of draws, inputs rebuilt exactly as the teacher saw them (sdit.loader)
    step               AdamW on task_weight·|ε_s − ε|² + kd_weight·|ε_s − ε_T|² (sdit.losses); EMA of weights
    every N steps      an atomic checkpoint (weights, EMA, optimiser, step, data position, RNG states) and the
                       EMA weights into RUN/transformer; every M steps a grid of samples; every E steps the
                       EMA student's agreement with the teacher on held-out draws (and, with a CLIP model, the
                       CLIP score of its samples), logged with that step's metrics
    --log tensorboard  the same figures and the sample grids as TensorBoard event files in RUN/tensorboard
    finish             RUN/transformer (EMA), metrics.jsonl, loss.png, sdit_run.json "complete"

Nothing imported here can load a teacher (invariant 9): the store holds everything training needs.

Data-parallel: launched by torchrun (WORLD_SIZE > 1), each worker keeps its share of every global batch
(gloo on CPU, NCCL on GPUs); rank 0 writes. `--resume` continues from the last checkpoint with the same
loss curve as an uninterrupted run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdit.agreement import agreement, check_fit
from sdit.devices import setup_worker
from sdit.dit import SDiT
from sdit.errors import SDiTError
from sdit.files import check_folder, recover_folder, replace_text, replacing
from sdit.images import grid
from sdit.loader import Batch, DrawStream, LabelledStore, Position, Split
from sdit.losses import distillation_loss, draw_weight, timestep_weight, true_noise_mask
from sdit.run import (load_student, location, read_run, same_location, save_student, student_folder,
                      update_run)
from sdit.sampling import decode, denoise, initial_noise, make_scheduler
from sdit.training import ema_decay, load_checkpoint, save_checkpoint, update_ema, warmup_factor
from pipeline.config import TrainConfig

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
SAMPLES = "samples"
TENSORBOARD = "tensorboard"


# Options a resumed run may change; any other change would make it another run. `out` is where the run folder
# is now, wherever it was trained, and `resume` says that it resumes: neither is compared.
RESUMABLE = ("steps", "checkpoint_every", "keep_checkpoints", "sample_every", "sample_prompts", "sample_steps",
             "sample_guidance", "sample_scheduler", "eval_every", "eval_draws", "eval_clip", "log", "device",
             "threads", "precision", "gradient_checkpointing")
PATHS = ("store", "init", "out")  # recorded and compared as where they lead, not as written
FLAGS = {"precision": "--dtype", "threads": None}  # the CLI's names where they differ from the field's; None: none


# --- distribution ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workers:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Workers:
        """torchrun's environment; one worker without it."""
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(values)
        return values


def _start_workers(workers: Workers, device: torch.device) -> None:
    if workers.world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")


# --- the run folder ----------------------------------------------------------------------------------------------


def prepare_run(config: TrainConfig, make_run: Callable[[], object] | None) -> None:
    """Rank 0: make (or check, when resuming) the run folder."""
    out = Path(config.out)
    if config.resume:
        train = read_run(out).get("train") or {}
        check_resumable(out, recorded_config(out), dataclasses.asdict(config))
        tidy_checkpoints(out)
        update_run(out, train=train | {"config": recorded(config)})  # a later --resume reads these options back
        return
    if out.exists() and any(out.iterdir()):
        raise SDiTError(f"{out} exists; pass --resume to continue its training, or choose a new --out")
    if config.init:
        student_folder(config.init)
        shutil.copytree(config.init, out, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(CHECKPOINTS, METRICS, SAMPLES, TENSORBOARD, "loss.png"))
    elif make_run is not None:
        make_run()
    else:
        raise SDiTError("give --init RUN_FOLDER (from `sdit init`) or --student PRESET")
    update_run(out, train={"config": recorded(config), "store": location(config.store),
                           "labels": config.labels, "holdout": config.holdout, "split_seed": config.seed, "step": 0,
                           "status": "started"})


def resume_config(out: str | Path, given: dict) -> TrainConfig:
    """The config that resumes the run in `out`: the options its folder records (an option newer than the run at
    its default) with `given`, the options the user gave, on top. Only RESUMABLE options may differ from the
    record; another is refused in one line naming it. `given` may hold `student`, the preset a new run would
    start from, which must be the run's."""
    given = dict(given)
    if "student" in given:
        check_resumable(out, {"student": read_run(out).get("student", {}).get("preset")},
                        {"student": given.pop("student")})
    config = recorded_config(out)
    check_resumable(out, dataclasses.asdict(config), given)
    return dataclasses.replace(config, **given | {"out": str(out), "resume": True})


def recorded_config(out: str | Path) -> TrainConfig:
    """The options the run in `out` was trained with, as its sdit_run.json records them."""
    record = (read_run(out).get("train") or {}).get("config")
    if record is None:
        raise SDiTError(f"{out} has no training to resume; drop --resume")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in record.items() if k in names})


def recorded(config: TrainConfig) -> dict:
    """`config` as the run records it: its paths absolute, so the record means the same from any folder."""
    return dataclasses.asdict(config) | {k: location(getattr(config, k)) for k in PATHS if getattr(config, k)}


def check_resumable(out: str | Path, record: TrainConfig | dict, given: dict) -> None:
    """Refuse, in one line naming them, the options in `given` that differ from the run's `record` and may not
    change on resume."""
    record = dataclasses.asdict(record) if isinstance(record, TrainConfig) else record
    changed = [k for k, v in given.items() if k not in (*RESUMABLE, "out", "resume") and not same_option(
        k, v, record.get(k))]
    if changed:
        raise SDiTError(f"{' '.join(option(k, given[k]) for k in changed)}: {out} was trained with "
                        f"{' '.join(option(k, record.get(k)) for k in changed)}; only "
                        f"{', '.join(option(k) for k in RESUMABLE if FLAGS.get(k, k))} may change on resume (train "
                        "into a new --out to change the others)")


def same_option(name: str, a, b) -> bool:
    if name in PATHS and a is not None and b is not None:
        return same_location(a, b)
    return a == b


def option(name: str, value=...) -> str:
    """A field as its command-line option: `--batch-size 16`, `--init none`; a switch as `--flag` or `no --flag`."""
    flag = FLAGS.get(name) or f"--{name.replace('_', '-')}"
    if value is ...:
        return flag
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    return f"{flag} {'none' if value is None else value}"


def check_targets(data: LabelledStore, config: TrainConfig) -> None:
    """Guided labels are no task target: a one-line refusal of --task-weight for them."""
    if data.labels.guided and config.task_weight > 0:
        raise SDiTError(f"labels {config.labels!r} are guided (ε_T = ε_u + w·(ε_c − ε_u)), so the true noise is "
                        "no target for them: pass --task-weight 0")


# --- checkpoints -------------------------------------------------------------------------------------------------


def checkpoint_dirs(out: Path) -> list[Path]:
    folder = out / CHECKPOINTS
    if not folder.exists():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith("step-") and p.name[5:].isdigit())


def save_state(out: Path, state: TrainState, keep: int) -> Path:
    """A checkpoint folder `checkpoints/step-N` (sdit.training); then the oldest beyond `keep` go."""
    final = save_checkpoint(out / CHECKPOINTS / f"step-{state.step:08d}", {"model": _plain(state.model),
                                                                          "ema": state.ema},
                            state.optimizer, {"step": state.step, "position": dataclasses.asdict(state.position)},
                            state.scheduler)
    for old in checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(old)
    return final


def tidy_checkpoints(out: Path) -> None:
    """After a kill: a checkpoint whose replacement stopped between its renames is put back, and the folders of
    writes that did not finish are deleted."""
    folder = out / CHECKPOINTS
    for aside in folder.glob(".step-*.old"):
        recover_folder(folder / aside.name[1:-len(".old")])
    for tmp in folder.glob(".step-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def load_state(folder: Path, state: TrainState) -> None:
    meta = load_checkpoint(folder, {"model": _plain(state.model), "ema": state.ema}, state.optimizer,
                           state.scheduler)
    state.step, state.position = meta["step"], Position(**meta["position"])


def _plain(model: torch.nn.Module) -> SDiT:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# --- the training state and step ---------------------------------------------------------------------------------


@dataclass
class TrainState:
    model: torch.nn.Module  # SDiT, or DDP around it
    ema: SDiT
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int = 0
    position: Position = dataclasses.field(default_factory=Position)


def make_state(student: SDiT, config: TrainConfig, device: torch.device, workers: Workers) -> TrainState:
    student.to(device).train()
    if config.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    model = student
    if workers.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_factor(step, config.warmup))
    return TrainState(model, ema, optimizer, scheduler)


class Trainer:
    """One training step at a time; `fit` runs the loop with checkpoints, metrics and samples."""

    def __init__(self, config: TrainConfig, state: TrainState, data: LabelledStore, device: torch.device,
                 workers: Workers = Workers()):
        self.config, self.state, self.data, self.device, self.workers = config, state, data, device, workers
        bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        self.guided = data.labels.guided
        self.board = None  # a TensorBoard writer on the main worker with --log tensorboard (`fit` opens it)

    def step(self, batch: Batch) -> dict:
        """Forward, backward, clip, AdamW, EMA. Returns this step's metrics (over all workers)."""
        s, c, dev = self.state, self.config, self.device
        x, text = batch.x_t.to(dev), batch.text.to(dev).float()
        t = batch.timesteps.to(dev)
        with self.autocast:
            eps = s.model(x, t, text, guidance=batch.guidance.to(dev) if self.guided else None)
        weight = timestep_weight(self.data.schedule, batch.timesteps, c.min_snr, c.high_noise_weight)
        weight = weight.to(dev) if weight is not None else None
        weight = draw_weight(batch.synthetic.to(dev), c.synthetic_weight, weight)
        mask = true_noise_mask(batch.kind, batch.guidance).to(dev)
        losses = distillation_loss(eps, batch.noise.to(dev), batch.eps_teacher.to(dev), mask, c.task_weight,
                                   c.kd_weight, weight)
        totals = self.workers.sum(torch.stack([losses.loss.detach() * len(batch), losses.task_sum,
                                               losses.task_count, losses.kd_sum,
                                               torch.tensor(float(len(batch)), device=dev)]).float())
        loss, task_sum, task_count, kd_sum, n = totals.tolist()
        if not math.isfinite(loss):
            raise NonFinite(s.step + 1, "loss")
        s.optimizer.zero_grad(set_to_none=True)
        losses.loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(s.model.parameters(), c.grad_clip))
        if not math.isfinite(grad_norm):
            raise NonFinite(s.step + 1, "gradient norm")
        lr = s.scheduler.get_last_lr()[0]
        s.optimizer.step()
        s.scheduler.step()
        s.step += 1
        s.position = batch.position
        update_ema(s.ema, _plain(s.model), ema_decay(s.step, c.ema_decay))
        return {"step": s.step, "loss": loss / n, "task_loss": task_sum / task_count if task_count else None,
                "kd_loss": kd_sum / n, "lr": lr, "grad_norm": grad_norm}

    def fit(self, batches: Iterable[Batch], on_step: Callable[[dict], None] | None = None) -> None:
        c, s = self.config, self.state
        last = time.perf_counter()
        for batch in batches:
            if s.step >= c.steps:
                break
            metrics = self.step(batch)
            now = time.perf_counter()
            metrics["samples_per_s"] = c.batch_size / (now - last)
            if c.eval_every and s.step % c.eval_every == 0 and self.workers.main:
                metrics |= self.evaluate()
            self.log(metrics)
            if s.step % c.checkpoint_every == 0 or s.step == c.steps:
                self.save()
            if c.sample_every and c.sample_prompts and s.step % c.sample_every == 0 and self.workers.main:
                self.sample_grid()
            if on_step:
                on_step(metrics)
            last = time.perf_counter()  # checkpoints, samples and evaluations do not count against samples/s

    def log(self, metrics: dict) -> None:
        """One line of metrics.jsonl per step (rank 0), and the same scalars to TensorBoard."""
        if not self.workers.main:
            return
        with open(Path(self.config.out) / METRICS, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.board is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.board.add_scalar(board_tag(key), value, metrics["step"])

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The EMA student on the first `eval_draws` held-out draws (the same every time): MSE to the teacher's
        ε and to the true noise; with --eval-clip, the CLIP score of its samples of the sample captions."""
        figures = held_out_agreement(self.state.ema, self.data, self.config, self.device, self.autocast)
        if self.config.eval_clip:
            images, captions = self.sample_images()
            figures["eval_clip_score"] = float(self.clip().score([Image.fromarray(im) for im in images],
                                                                 captions).mean())
        return figures

    def clip(self):
        if not hasattr(self, "_clip"):
            from pipeline.evaluate import load_clip

            self._clip = load_clip(self.config.eval_clip, self.device)
        return self._clip

    def save(self) -> None:
        if self.workers.main:
            out = Path(self.config.out)
            save_state(out, self.state, self.config.keep_checkpoints)
            save_student(out, self.state.ema)  # the run folder always holds the latest EMA weights
            update_run(out, train=read_run(out)["train"] | {"step": self.state.step})
        self.workers.barrier()

    def sample_grid(self) -> Path:
        """The EMA student's samples for fixed captions of the store, as the seed's "student samples_gs-N"."""
        images, captions = self.sample_images()
        folder = Path(self.config.out) / SAMPLES
        folder.mkdir(exist_ok=True)
        replace_text(folder / "prompts.txt", "\n".join(captions) + "\n")
        path = folder / f"student_samples_gs-{self.state.step:08d}.png"
        picture = grid(images, columns=min(8, len(images)))
        with replacing(path) as tmp:
            picture.save(tmp)
        if self.board is not None:
            self.board.add_image("samples", np.asarray(picture), self.state.step, dataformats="HWC")
        return path

    def sample_images(self) -> tuple[np.ndarray, list[str]]:
        """(n, H, W, 3) uint8 samples of the EMA student for the store's first `sample_prompts` captions, from
        fixed noise, and the captions."""
        c = self.config
        text, null, captions = sample_captions(self.data, c.sample_prompts)
        ema = self.state.ema
        scheduler = make_scheduler(c.sample_scheduler, self.data.labels.scheduler)
        generators = [torch.Generator().manual_seed(c.seed * 1_000_003 + i) for i in range(len(text))]
        shape = tuple(self.data.manifest.latent_shape)
        noise = initial_noise(shape, generators, self.device)
        guidance = torch.full((len(text),), c.sample_guidance, device=self.device) if self.guided else None

        def eps_model(x, t, context):
            with self.autocast:
                if guidance is not None:
                    return ema(x, t, context, guidance=guidance).float()
                return ema(x, t, context).float()

        latents = denoise(eps_model, scheduler, noise, text.to(self.device), None if self.guided else
                          null.to(self.device), c.sample_steps, 1.0 if self.guided else c.sample_guidance)
        return decode(self.vae(), latents), captions

    def vae(self):
        if not hasattr(self, "_vae"):
            from diffusers import AutoencoderKL

            self._vae = AutoencoderKL.from_pretrained(Path(self.config.out) / "vae").to(self.device).eval()
        return self._vae


class NonFinite(SDiTError):
    def __init__(self, step: int, what: str):
        super().__init__(f"the {what} became NaN or inf at step {step}; stopped. The last checkpoint is intact: "
                         "lower --lr, raise --warmup or use --dtype fp32, then --resume")


def held_out_agreement(model: SDiT, data: LabelledStore, config: TrainConfig, device: torch.device,
                       autocast) -> dict:
    """The model's agreement with the teacher on the first `eval_draws` held-out draws (sdit.agreement), as
    metrics.jsonl logs it: `sdit eval`'s overall figures, on fewer draws."""
    figures = agreement(model, data, Split(config.holdout, config.seed), device, batch_size=config.batch_size,
                        limit=config.eval_draws, autocast=autocast)
    return {"eval_teacher_mse": figures["mse"], "eval_true_noise_mse": figures["true_noise"]["student_mse"],
            "eval_draws": figures["draws"]}


def summary_writer():
    """torch's TensorBoard writer class; a one-line error where the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise SDiTError("--log tensorboard needs the tensorboard package: pip install tensorboard "
                        "(or this project's [tensorboard] extra)") from err
    return SummaryWriter


def open_board(out: Path, purge_step: int):
    """A TensorBoard writer in RUN/tensorboard; on resume, events from `purge_step` on are dropped (they will be
    logged again), as metrics.jsonl forgets the steps after the last checkpoint."""
    return summary_writer()(log_dir=str(out / TENSORBOARD), purge_step=purge_step)


def board_tag(key: str) -> str:
    """metrics.jsonl's keys as TensorBoard tags: eval_teacher_mse -> eval/teacher_mse, loss -> train/loss."""
    return f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"


def sample_captions(data: LabelledStore, n: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The first captions of the store: half from the records, half from the prompt bank when there is one.
    Returns text (n, L, D) and null (n, L, D) embeddings as float32, and the captions."""
    groups = ["records", "prompts"] if data.bank.size("prompts") else ["records"]
    texts, captions = [], []
    for k, group in enumerate(groups):
        want = n - len(captions) if k == len(groups) - 1 else n // len(groups)
        for index, record in data.store.finished(group).items():
            if want <= 0:
                break
            rows = data.store.read(group, index, ("text_emb", "captions"), 0, min(want, record["count"]))
            texts.append(rows["text_emb"])
            captions += [str(s) for s in rows["captions"]]
            want -= len(rows["captions"])
    text = torch.as_tensor(np.concatenate(texts)).float()
    null = torch.as_tensor(data.null).float().expand_as(text)
    return text, null, captions


# --- the whole stage ---------------------------------------------------------------------------------------------


def train(config: TrainConfig, on_step: Callable[[dict], None] | None = None,
          make_run: Callable[[], object] | None = None) -> dict:
    """Train (or resume) a student; returns a summary. Raises SDiTError for what a user can fix.

    Without `config.init`, `make_run()` writes the untrained run folder at `config.out` (rank 0, and only for a
    new run): the CLI passes the init stage here, so this module never imports a teacher loader."""
    config.check()
    check_folder(config.out)
    if config.log == "tensorboard":
        summary_writer()  # a missing package fails before any work
    workers = Workers.from_env()
    device, _ = setup_worker(config.device, "fp32", config.threads or (torch.get_num_threads()))
    if device.type == "cuda":
        device = torch.device("cuda", workers.local_rank)
        torch.cuda.set_device(device)
    _start_workers(workers, device)
    data = LabelledStore(config.store, config.labels)
    if config.synthetic_weight != 1.0 and not data.synthetic_counts:
        raise SDiTError(f"--synthetic-weight: labels {config.labels!r} have no synthetic records (label them with "
                        "`sdit teacher-label --synthesize N`)")
    if workers.main:
        prepare_run(config, make_run)
    workers.barrier()
    out = Path(config.out)
    run = read_run(out)
    student = load_student(out)
    check_fit(data, student, run, size=True)
    check_targets(data, config)
    state = make_state(student, config, device, workers)
    if config.resume:
        resume(out, state)
    stream = DrawStream(data, config.batch_size, split=Split(config.holdout, config.seed), seed=config.seed,
                        buffer_records=config.buffer_records, rank=workers.rank, world=workers.world)
    trainer = Trainer(config, state, data, device, workers)
    if workers.main and config.eval_clip:
        trainer.clip()  # a wrong CLIP folder fails before the first step
    if workers.main and config.log == "tensorboard":
        trainer.board = open_board(out, purge_step=state.step + 1)
    started, first = time.perf_counter(), state.step
    try:
        trainer.fit(stream.batches(state.position), on_step)
        seconds = time.perf_counter() - started
        summary = {"steps": state.step, "seconds": seconds,
                   "steps_per_s": (state.step - first) / seconds if seconds else None,
                   "draws": stream.total, "run": str(out)}
        if workers.main:
            summary["samples"] = str(trainer.sample_grid()) if config.sample_prompts else None
            plot_losses(out / METRICS, out / "loss.png")
            update_run(out, train=read_run(out)["train"] | {"step": state.step, "status": "complete"})
    finally:
        if trainer.board is not None:
            trainer.board.close()
    workers.barrier()
    return summary


def resume(out: Path, state: TrainState) -> None:
    """Load the last checkpoint (none: killed before the first, so start again from the initial weights), and
    forget metrics logged after it: those steps will be run again, and each step is logged once."""
    checkpoints = checkpoint_dirs(out)
    if checkpoints:
        load_state(checkpoints[-1], state)
    metrics = out / METRICS
    if metrics.exists() and Workers.from_env().main:
        kept = [row for row in read_metrics(metrics) if row["step"] <= state.step]
        replace_text(metrics, "".join(json.dumps(row) + "\n" for row in kept))


def read_metrics(path: Path) -> list[dict]:
    """The steps logged so far; a last line cut short (the run was killed while writing it) is left out."""
    if not Path(path).exists():
        return []
    text = Path(path).read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]


def plot_losses(metrics: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, label in (("loss", "loss"), ("task_loss", "task: |ε_s − ε|²"), ("kd_loss", "distillation: |ε_s − ε_T|²")):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            steps, values = map(np.asarray, zip(*points))
            smooth = _smooth(values)
            ax.plot(steps[len(steps) - len(smooth):], smooth, label=label, linewidth=1)
    held_out = [(r["step"], r["eval_teacher_mse"]) for r in rows if r.get("eval_teacher_mse") is not None]
    if held_out:  # the EMA student on held-out draws: whether the run is still improving
        ax.plot(*zip(*held_out), "o-", label="held-out |ε_s − ε_T|² (EMA)", markersize=3, linewidth=1)
    clip = [(r["step"], r["eval_clip_score"]) for r in rows if r.get("eval_clip_score") is not None]
    if clip:
        right = ax.twinx()
        right.plot(*zip(*clip), "s--", color="tab:purple", label="CLIP score (EMA samples)", markersize=3)
        right.set_ylabel("CLIP score")
        right.legend(loc="upper right")
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with replacing(png) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def _smooth(values: np.ndarray, window: int = 0) -> np.ndarray:
    """A running mean over ~1% of the curve, so the trend shows through per-step noise."""
    window = window or max(1, len(values) // 100)
    return np.convolve(values, np.ones(window) / window, mode="valid") if len(values) > window else values
