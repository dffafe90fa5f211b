"""Teacher agreement: how close a student's ε is to the teacher's on a store's held-out draws.

The held-out draws are the records a `Split` keeps out of training (sdit.loader), with inputs rebuilt exactly as
the teacher saw them: no teacher is loaded. Per draw, the MSE over the latent's elements of ε_s − ε_T (and of
ε_s − ε where the true noise is a target), summed overall, per timestep bucket and per perturbation kind.
`sdit eval` reports all of it; `sdit train --eval-every` logs the overall figures as it trains.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from sdit.errors import SDiTError
from sdit.loader import DrawStream, LabelledStore, Split
from sdit.losses import draw_errors
from sdit.perturb import Kind
from sdit.progress import Progress, no_progress


@dataclass
class Agreement:
    """Running sums of per-draw squared errors, by timestep bucket and by perturbation kind."""

    buckets: int
    timesteps: int  # T: the teacher's training steps
    sums: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n_kinds = len(Kind)
        self.sums = {"bucket": np.zeros(self.buckets), "bucket_n": np.zeros(self.buckets, np.int64),
                     "kind": np.zeros(n_kinds), "kind_n": np.zeros(n_kinds, np.int64),
                     "task": np.zeros(2), "task_n": np.zeros(1, np.int64)}

    def add(self, mse: np.ndarray, timesteps: np.ndarray, kind: np.ndarray, task: np.ndarray | None = None,
            task_teacher: np.ndarray | None = None) -> None:
        """mse, timesteps, kind: (B,); task, task_teacher: the student's and the teacher's MSE to the true
        noise on the draws where it is a target."""
        s = self.sums
        bucket = np.minimum(timesteps * self.buckets // self.timesteps, self.buckets - 1)
        np.add.at(s["bucket"], bucket, mse)
        np.add.at(s["bucket_n"], bucket, 1)
        np.add.at(s["kind"], kind, mse)
        np.add.at(s["kind_n"], kind, 1)
        if task is not None and len(task):
            s["task"] += [task.sum(), task_teacher.sum()]
            s["task_n"] += len(task)

    def result(self) -> dict:
        s, width = self.sums, self.timesteps / self.buckets
        draws = int(s["bucket_n"].sum())
        by_t = [{"from": int(round(i * width)), "to": int(round((i + 1) * width)) - 1, "draws": int(n),
                 "mse": float(v / n) if n else None} for i, (v, n) in enumerate(zip(s["bucket"], s["bucket_n"]))]
        by_kind = {k.name.lower(): {"draws": int(s["kind_n"][k]), "mse": float(s["kind"][k] / s["kind_n"][k])}
                   for k in Kind if s["kind_n"][k]}
        n_task = int(s["task_n"][0])
        task = {"draws": n_task, "student_mse": float(s["task"][0] / n_task) if n_task else None,
                "teacher_mse": float(s["task"][1] / n_task) if n_task else None}
        return {"draws": draws, "mse": float(s["bucket"].sum() / draws) if draws else None,
                "by_timestep": by_t, "by_kind": by_kind, "true_noise": task}


def check_fit(data: LabelledStore, student: torch.nn.Module, run: dict, *, size: bool = False) -> None:
    """One-line refusals where the student's ε cannot be set against these labels: latent channels and text width
    (with `size`, the latent grid too, as training needs), the VAE and text encoder the store was encoded with,
    guided labels for a guidance-distilled student only, and no caption longer than the student's text positions."""
    cfg = student.config
    c, h, w = data.manifest.latent_shape
    width = data.manifest.text_shape[1]
    if c != cfg.in_channels or width != cfg.text_dim or (size and (h, w) != (cfg.sample_size, cfg.sample_size)):
        s = cfg.sample_size
        raise SDiTError(f"the store's latents are {c}x{h}x{w} with text {width} wide; the student takes "
                        f"{cfg.in_channels}x{s}x{s} with text {cfg.text_dim} wide (make the run with `sdit init` "
                        "from this store)")
    for part in ("vae", "text_encoder"):
        if run["teacher"]["hashes"].get(part) != data.manifest.teacher["hashes"].get(part):
            raise SDiTError(f"the run folder's {part.replace('_', ' ')} is not the one the store was encoded with "
                            f"({data.manifest.teacher['path']}); init the run from that teacher")
    if data.labels.guided != bool(cfg.guidance_embed):
        raise SDiTError("guided labels need a guidance-distilled student (init with --guidance-embed), and only "
                        f"they do: this run and labels {data.group.split('/')[-1]!r} do not belong together")
    if cfg.get("text_positions") and cfg.text_positions < data.manifest.text_shape[0]:
        longest = data.store.longest_caption()
        if longest > cfg.text_positions:
            raise SDiTError(f"the store's captions run to {longest} tokens (start and end included) and this student "
                            f"reads the first {cfg.text_positions} text positions: init it with --text-positions "
                            f"{longest} or more")


@torch.no_grad()
def agreement(student: torch.nn.Module, data: LabelledStore, split: Split, device: torch.device, *,
              batch_size: int, limit: int | None = None, buckets: int = 10, dtype: torch.dtype = torch.float32,
              autocast: AbstractContextManager | None = None, progress: Progress = no_progress,
              on_total: Callable[[int], None] | None = None, rank: int = 0, world: int = 1,
              reduce: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
    """The student's agreement with the teacher on the first `limit` (default: all) held-out draws of `split`, in
    a fixed order: `Agreement.result()`. `on_total(n)` is told how many draws there are, `progress(n)` counts
    them. With `world` workers each measures its share (its blocks of the store, limit / world draws) and
    `reduce` sums an array over the workers."""
    stream = DrawStream(data, batch_size * world, split=split, train=False, shuffle=False, repeat=False, rank=rank,
                        world=world)
    total = stream.own_total if not limit or limit >= stream.total else min(stream.own_total, -(-limit // world))
    if on_total:
        on_total(total)
    sums = Agreement(buckets, len(data.schedule.alphas_cumprod))
    seen = 0
    for batch in stream:
        if seen >= total:
            break
        batch = batch.head(min(len(batch), total - seen))
        with autocast or nullcontext():
            errors = draw_errors(student, batch, device, dtype)
        sums.add(errors.teacher.double().numpy(), batch.timesteps.numpy(), batch.kind.numpy(),
                 errors.task.double().numpy(), errors.task_teacher.double().numpy())
        seen += len(batch)
        progress(len(batch))
    if reduce:
        sums.sums = {key: reduce(value) for key, value in sums.sums.items()}
    return sums.result()
