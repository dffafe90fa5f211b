"""Stage two: train the SDiT student from a labelled store, without the teacher.

    prepare (rank 0)   the run folder (pipeline/train_run.py): `--init DIR` copied, or made by the caller's
                       `make_run` (the CLI's `--student PRESET` runs the init stage, pipeline/init.py); checked
                       against the store
    stream             shuffled batches of draws, inputs rebuilt exactly as the teacher saw them (sdit.loader)
    step               AdamW on task_weight·|ε_s − ε|² + kd_weight·|ε_s − ε_T|² (sdit.losses); EMA of weights
    every N steps      an atomic checkpoint (weights, EMA, optimiser, step, data position, RNG states) and the
                       EMA weights into RUN/transformer
    monitoring         metrics, held-out agreement, sample grids, TensorBoard (pipeline/train_monitor.py)
    finish             RUN/transformer (EMA), metrics.jsonl, loss.png, sdit_run.json "complete"

Nothing imported here can load a teacher (invariant 8): the store holds everything training needs.

Data-parallel: launched by torchrun (WORLD_SIZE > 1), each worker keeps its share of every global batch
(gloo on CPU, NCCL on GPUs); rank 0 writes. `--resume` continues from the last checkpoint with the same
loss curve as an uninterrupted run.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import TrainConfig
from pipeline.train_monitor import LOSS_PLOT, METRICS, Monitor, plot_losses, summary_writer, trim_metrics
from pipeline.train_run import TrainState, plain, prepare_run, resume, save_state
from sdit.agreement import agreement, check_fit
from sdit.devices import setup_worker
from sdit.diffusion import NoiseSchedule
from sdit.dit import SDiT
from sdit.errors import SDiTError
from sdit.files import check_folder
from sdit.loader import Batch, DrawStream, LabelledStore, Split, read_ahead
from sdit.losses import Losses, distillation_loss, draw_weight, timestep_weight, true_noise_mask
from sdit.run import load_student, read_run, save_student, update_run
from sdit.training import ema_decay, lr_factor, update_ema

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

    def gather(self, value) -> list:
        """Every worker's `value` (picklable), in rank order."""
        if self.world == 1:
            return [value]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out


def _start_workers(workers: Workers, device: torch.device) -> None:
    if workers.world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")


# --- the training state and step ---------------------------------------------------------------------------------


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
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, config.warmup, config.steps, config.lr_schedule))
    return TrainState(model, ema, optimizer, scheduler)


class Trainer:
    """One training step at a time; `fit` runs the loop with checkpoints, and a `Monitor` on the main worker.
    `schedule` is the teacher's noise schedule (for timestep weights); `guided`: the labels are guided, and the
    student takes their scale w; `data`: the labels, for --eval-every's held-out figures."""

    def __init__(self, config: TrainConfig, state: TrainState, device: torch.device, *, schedule: NoiseSchedule,
                 guided: bool, workers: Workers = Workers(), window_blocks: int = 0,
                 data: LabelledStore | None = None):
        self.config, self.state, self.device, self.workers, self.data = config, state, device, workers, data
        self.window_blocks = window_blocks  # the stream's window, in blocks (checkpoints record it)
        self.schedule, self.guided = schedule, guided
        self.autocast = autocast(config.precision, device)

    def step(self, batch: Batch) -> dict:
        """Forward and backward of each of the `grad_accum` parts of the batch, then clip, AdamW, EMA. Returns this
        step's metrics (over all workers)."""
        s, c, dev = self.state, self.config, self.device
        s.optimizer.zero_grad(set_to_none=True)
        parts = batch.split(c.grad_accum)
        sums = torch.zeros(5, device=dev)
        for i, part in enumerate(parts):
            last = i == len(parts) - 1  # data-parallel workers average their gradients after the last part only
            with nullcontext() if last else getattr(s.model, "no_sync", nullcontext)():
                losses = self.losses(part)
                (losses.loss * (len(part) / len(batch))).backward()
            sums += torch.stack([losses.loss.detach() * len(part), losses.task_sum, losses.task_count,
                                 losses.kd_sum, torch.tensor(float(len(part)), device=dev)]).float()
        loss, task_sum, task_count, kd_sum, n = self.workers.sum(sums).tolist()
        if not math.isfinite(loss):
            raise NonFinite(s.step + 1, "loss")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(s.model.parameters(), c.grad_clip))
        if not math.isfinite(grad_norm):
            raise NonFinite(s.step + 1, "gradient norm")
        lr = s.scheduler.get_last_lr()[0]
        s.optimizer.step()
        s.scheduler.step()
        s.step += 1
        s.position = batch.position
        update_ema(s.ema, plain(s.model), ema_decay(s.step, c.ema_decay))
        return {"step": s.step, "loss": loss / n, "task_loss": task_sum / task_count if task_count else None,
                "kd_loss": kd_sum / n, "lr": lr, "grad_norm": grad_norm}

    def losses(self, batch: Batch) -> Losses:
        """The loss of one part of a step's batch: Σ over its draws / its size (sdit.losses)."""
        c, dev = self.config, self.device
        x, text, t = batch.x_t.to(dev), batch.text.to(dev).float(), batch.timesteps.to(dev)
        with self.autocast:
            eps = self.state.model(x, t, text, guidance=batch.guidance.to(dev) if self.guided else None)
        weight = timestep_weight(self.schedule, batch.timesteps, c.min_snr, c.high_noise_weight)
        weight = draw_weight(batch.synthetic.to(dev), c.synthetic_weight, None if weight is None else weight.to(dev))
        mask = true_noise_mask(batch.kind, batch.guidance, self.guided).to(dev)
        return distillation_loss(eps, batch.noise.to(dev), batch.eps_teacher.to(dev), mask, c.task_weight,
                                 c.kd_weight, weight)

    def fit(self, batches: Iterable[Batch], monitor: Monitor | None = None,
            on_step: Callable[[dict], None] | None = None) -> None:
        """Steps until `config.steps`, with checkpoints; `monitor` (the main worker's) logs and measures."""
        c, s = self.config, self.state
        last = time.perf_counter()
        for batch in batches:
            if s.step >= c.steps:
                break
            metrics = self.step(batch)
            now = time.perf_counter()
            metrics["samples_per_s"] = c.batch_size / (now - last)
            if self.data is not None:  # this worker's reads of the store so far (with those read ahead)
                metrics["read_mb"] = self.data.store.bytes_read / 1e6
            if c.eval_every and s.step % c.eval_every == 0:
                metrics |= self.held_out(s.ema)
                metrics |= monitor.clip_score(s.ema) if monitor else {}
            if monitor:
                monitor.log(metrics)
            if s.step % c.checkpoint_every == 0 or s.step == c.steps:
                self.save()
            if monitor and c.sample_every and c.sample_prompts and s.step % c.sample_every == 0:
                monitor.sample_grid(s.ema, s.step)
            if on_step:
                on_step(metrics)
            last = time.perf_counter()  # checkpoints, samples and evaluations do not count against samples/s

    @torch.no_grad()
    def held_out(self, ema: SDiT) -> dict:
        """The EMA student on the first `eval_draws` held-out draws (the same every time): MSE to the teacher's ε
        and to the true noise, `sdit eval`'s overall figures on fewer draws. Every worker measures its share, so
        none waits for the main one."""
        c = self.config
        result = agreement(ema, self.data, Split(c.holdout, c.seed), self.device, batch_size=c.batch_size,
                           limit=c.eval_draws, autocast=self.autocast, rank=self.workers.rank,
                           world=self.workers.world, reduce=self._sum)
        return {"eval_teacher_mse": result["mse"], "eval_true_noise_mse": result["true_noise"]["student_mse"],
                "eval_draws": result["draws"]}

    def _sum(self, values: np.ndarray) -> np.ndarray:
        return self.workers.sum(torch.as_tensor(values, device=self.device)).cpu().numpy()

    def save(self) -> None:
        positions = self.workers.gather(self.state.position)
        if self.workers.main:
            out = Path(self.config.out)
            save_state(out, self.state, self.config.keep_checkpoints, positions, self.window_blocks)
            save_student(out, self.state.ema)  # the run folder always holds the latest EMA weights
            update_run(out, train=read_run(out)["train"] | {"step": self.state.step})
        self.workers.barrier()


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """bf16 autocast for --dtype bf16, and for auto on a GPU; else none (fp32)."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


class NonFinite(SDiTError):
    def __init__(self, step: int, what: str):
        super().__init__(f"the {what} became NaN or inf at step {step}; stopped. The last checkpoint is intact: "
                         "lower --lr, raise --warmup or use --dtype fp32, then --resume")


def check_targets(data: LabelledStore, config: TrainConfig) -> None:
    """Guided labels are no task target (but for their draws at w = 1): a one-line refusal of --task-weight for
    labels with none of those; a window of w only for labels that keep both ε."""
    if config.fresh_guidance_range is not None and not data.labels.guidance_fresh:
        raise SDiTError(f"--fresh-guidance-range: labels {config.labels!r} hold each target at its own w; label them "
                        "with --fresh-guidance to draw w in training")
    if data.labels.guided and not data.labels.guidance_conditional and config.task_weight > 0:
        raise SDiTError(f"labels {config.labels!r} are guided (ε_T = ε_u + w·(ε_c − ε_u)), so the true noise is "
                        "no target for them: pass --task-weight 0, or label with --guidance-conditional")


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
    student = load_student(out)
    check_fit(data, student, read_run(out), size=True)
    check_targets(data, config)
    state = make_state(student, config, device, workers)
    if config.resume:
        resume(out, state)
    stream = DrawStream(data, config.batch_size, split=Split(config.holdout, config.seed), seed=config.seed,
                        buffer_records=config.buffer_records, rank=workers.rank, world=workers.world,
                        guidance_range=config.fresh_guidance_range)
    if state.saved_positions:
        state.position, reset = stream.resumed(state.saved_positions, state.saved_window_blocks)
        state.reset += [reset] if reset else []
    trainer = Trainer(config, state, device, schedule=data.schedule, guided=data.labels.guided, workers=workers,
                      window_blocks=stream.blocks_per_window, data=data)
    monitor = Monitor(config, data, device, trainer.autocast) if workers.main else None
    if monitor:
        if config.resume:
            trim_metrics(out, state.step)
        if config.eval_clip:
            monitor.clip()  # a wrong CLIP folder fails before the first step
        if config.log == "tensorboard":
            monitor.open_board(purge_step=state.step + 1)
    started, first = time.perf_counter(), state.step
    try:
        batches = stream.batches(state.position)
        trainer.fit(read_ahead(batches, device), monitor, on_step)
        seconds = time.perf_counter() - started
        summary = {"steps": state.step, "seconds": seconds,
                   "steps_per_s": (state.step - first) / seconds if seconds else None,
                   "draws": stream.total, "run": str(out), "reset": state.reset}
        if monitor:
            summary["samples"] = str(monitor.sample_grid(state.ema, state.step)) if config.sample_prompts else None
            plot_losses(out / METRICS, out / LOSS_PLOT)
            update_run(out, train=read_run(out)["train"] | {"step": state.step, "status": "complete"})
    finally:
        if monitor:
            monitor.close()
    workers.barrier()
    return summary
