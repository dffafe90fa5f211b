"""What `sdit train` shows of a run as it trains, on the main worker.

    RUN/metrics.jsonl          one line per step: loss, its parts, lr, gradient norm, samples/s; every
                               `--eval-every` steps the EMA student's agreement with the teacher on held-out draws
                               (sdit.agreement) and, with --eval-clip, the CLIP score of its samples (sdit.clip)
    RUN/samples/               every `--sample-every` steps a grid of the EMA student's samples of fixed captions
    RUN/tensorboard/           with --log tensorboard: the same figures and grids as event files
    RUN/loss.png               the loss curves, drawn at the end
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.config import TrainConfig
from sdit.clip import clip_score
from sdit.dit import SDiT
from sdit.errors import SDiTError
from sdit.files import replace_text, replacing
from sdit.images import grid
from sdit.loader import LabelledStore
from sdit.sampling import decode, denoise, initial_noise, make_scheduler, student_eps

METRICS = "metrics.jsonl"
SAMPLES = "samples"
TENSORBOARD = "tensorboard"
LOSS_PLOT = "loss.png"


class Monitor:
    """Logs each step's metrics and, as the options say, measures the EMA student on the store's held-out draws
    and draws its samples of the store's first captions."""

    def __init__(self, config: TrainConfig, data: LabelledStore, device: torch.device,
                 autocast: AbstractContextManager):
        self.config, self.data, self.device, self.autocast = config, data, device, autocast
        self.out = Path(config.out)
        self.board = None  # a TensorBoard writer with --log tensorboard (`open_board`)
        self._clip = self._vae = None

    def open_board(self, purge_step: int) -> None:
        """TensorBoard's writer in RUN/tensorboard; on resume, events from `purge_step` on are dropped (they will be
        logged again), as metrics.jsonl forgets the steps after the last checkpoint."""
        self.board = summary_writer()(log_dir=str(self.out / TENSORBOARD), purge_step=purge_step)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()

    def log(self, metrics: dict) -> None:
        """One line of metrics.jsonl per step, and the same scalars to TensorBoard."""
        with open(self.out / METRICS, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.board is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.board.add_scalar(board_tag(key), value, metrics["step"])

    @torch.no_grad()
    def clip_score(self, ema: SDiT) -> dict:
        """With --eval-clip, the CLIP score of the EMA student's samples of the sample captions."""
        if not self.config.eval_clip:
            return {}
        images, captions = self.sample_images(ema)
        cosines = self.clip().cosines([Image.fromarray(im) for im in images], captions)
        return {"eval_clip_score": clip_score(cosines, "torchmetrics"), "eval_clip_convention": "torchmetrics"}

    def clip(self):
        """The --eval-clip model, loaded once (a wrong folder fails in one line)."""
        if self._clip is None:
            from sdit.clip import load_clip

            self._clip = load_clip(self.config.eval_clip, self.device)
        return self._clip

    def sample_grid(self, ema: SDiT, step: int) -> Path:
        """The EMA student's samples for fixed captions of the store, as the seed's "student samples_gs-N"."""
        images, captions = self.sample_images(ema)
        folder = self.out / SAMPLES
        folder.mkdir(exist_ok=True)
        replace_text(folder / "prompts.txt", "\n".join(captions) + "\n")
        path = folder / f"student_samples_gs-{step:08d}.png"
        picture = grid(images, columns=min(8, len(images)))
        with replacing(path) as tmp:
            picture.save(tmp)
        if self.board is not None:
            self.board.add_image("samples", np.asarray(picture), step, dataformats="HWC")
        return path

    def sample_images(self, ema: SDiT) -> tuple[np.ndarray, list[str]]:
        """(n, H, W, 3) uint8 samples of the EMA student for the store's first `sample_prompts` captions, from
        fixed noise, and the captions."""
        c, guided = self.config, self.data.labels.guided
        text, null, captions = sample_captions(self.data, c.sample_prompts)
        scheduler = make_scheduler(c.sample_scheduler, self.data.labels.scheduler)
        generators = [torch.Generator().manual_seed(c.seed * 1_000_003 + i) for i in range(len(text))]
        noise = initial_noise(tuple(self.data.manifest.latent_shape), generators, self.device)
        eps = student_eps(ema, c.sample_guidance if guided else None, self.autocast)
        latents = denoise(eps, scheduler, noise, text.to(self.device), None if guided else null.to(self.device),
                          c.sample_steps, 1.0 if guided else c.sample_guidance)
        return decode(self.vae(), latents), captions

    def vae(self):
        if self._vae is None:
            from diffusers import AutoencoderKL

            self._vae = AutoencoderKL.from_pretrained(self.out / "vae").to(self.device).eval()
        return self._vae


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


def summary_writer():
    """torch's TensorBoard writer class; a one-line error where the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise SDiTError("--log tensorboard needs the tensorboard package: pip install tensorboard "
                        "(or this project's [tensorboard] extra)") from err
    return SummaryWriter


def board_tag(key: str) -> str:
    """metrics.jsonl's keys as TensorBoard tags: eval_teacher_mse -> eval/teacher_mse, loss -> train/loss."""
    return f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"


def trim_metrics(out: Path, step: int) -> None:
    """Forget the metrics logged after `step` (the last checkpoint's): a resumed run logs those steps again, and
    each step is logged once."""
    metrics = Path(out) / METRICS
    if metrics.exists():
        kept = [row for row in read_metrics(metrics) if row["step"] <= step]
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
