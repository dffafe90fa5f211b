"""The run folder: a trained (or untrained) student as a self-contained diffusers pipeline folder.

    model_index.json        SDiTPipeline and its components, as diffusers writes it
    transformer/            the SDiT student (EMA weights once trained): config.json + safetensors
    vae/ text_encoder/      the teacher's, saved in the diffusers layout (its UNet is never loaded)
    tokenizer/ scheduler/   the teacher's CLIP tokenizer and noise schedule
    sdit_run.json           provenance: the teacher's identity, the student preset, the training config
                            and progress (what `sdit train` writes is in pipeline/train.py)

It is the counterpart of the seed's `sdit.ckpt` (an SD checkpoint with a DiT attached): sampling needs
nothing else. `init_run` writes an untrained one (`sdit init`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch

from sdit.dit import SDiT, build_student
from sdit.errors import SDiTError
from sdit.teacher import SD15_CONFIG_DIR, Teacher, load_teacher

RUN_FILE = "sdit_run.json"
MODEL_INDEX = "model_index.json"
TRANSFORMER = "transformer"
PIPELINE_CLASS = "SDiTPipeline"


@dataclass(frozen=True)
class LatentSpace:
    """What a student must fit: the teacher's latent grid and channels, and its text width."""

    sample_size: int
    in_channels: int
    text_dim: int


def teacher_latent_space(teacher: str | Path, config_dir: str | Path | None = None) -> LatentSpace:
    """Read from the teacher's configs alone (no weights)."""
    path = Path(teacher)
    cfg = path if path.is_dir() else Path(config_dir) if config_dir else SD15_CONFIG_DIR
    try:
        unet = json.loads((cfg / "unet" / "config.json").read_text())
        text = json.loads((cfg / "text_encoder" / "config.json").read_text())
    except FileNotFoundError as err:
        raise SDiTError(f"{cfg} lacks {Path(err.filename).relative_to(cfg)}: cannot tell the teacher's latent "
                        "size and text width") from None
    return LatentSpace(int(unet["sample_size"]), int(unet["in_channels"]), int(text["hidden_size"]))


def init_run(out: str | Path, teacher: str | Path, preset: str, *, teacher_config: str | Path | None = None,
             space: LatentSpace | None = None, guidance_embed: bool = False, seed: int = 0) -> Path:
    """Write an untrained run folder: a fresh `preset` student (seeded) beside the teacher's VAE, text
    encoder, tokenizer and scheduler, sized for `space` (default: the teacher's, from its configs)."""
    space = space or teacher_latent_space(teacher, teacher_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = build_student(preset, sample_size=space.sample_size, in_channels=space.in_channels,
                                text_dim=space.text_dim, guidance_embed=guidance_embed)
    parts = load_teacher(teacher, components=("vae", "text_encoder"), config_dir=teacher_config)
    provenance = {"student": {"preset": preset, "seed": seed}}
    return write_run(out, student, parts, provenance)


def write_run(out: str | Path, student: SDiT, teacher: Teacher, provenance: dict) -> Path:
    """Every part of a run folder, written beside `out` and moved into place whole."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SDiTError(f"{out} exists and is not empty; choose another folder or remove it")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    student.save_pretrained(tmp / TRANSFORMER, safe_serialization=True)
    teacher.vae.save_pretrained(tmp / "vae", safe_serialization=True)
    teacher.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    teacher.tokenizer.save_pretrained(tmp / "tokenizer")
    config = teacher.scheduler_config
    scheduler_class = config.get("_class_name", "PNDMScheduler")
    getattr(diffusers, scheduler_class).from_config(config).save_pretrained(tmp / "scheduler")
    index = {
        "_class_name": PIPELINE_CLASS,
        "_diffusers_version": diffusers.__version__,
        TRANSFORMER: ["sdit", "SDiT"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", scheduler_class],
    }
    (tmp / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    run = {"teacher": teacher.identity.to_json(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           **provenance}
    (tmp / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n")
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out


def read_run(run: str | Path) -> dict:
    """The run's provenance; a one-line error if `run` is not a run folder."""
    run = Path(run)
    if not (run / MODEL_INDEX).exists() or not (run / RUN_FILE).exists():
        raise SDiTError(f"{run} is not an SDiT run folder (no {MODEL_INDEX} / {RUN_FILE}); make one with "
                        "`sdit init` or `sdit train`")
    return json.loads((run / RUN_FILE).read_text())


def update_run(run: str | Path, **fields) -> None:
    """Merge `fields` into sdit_run.json, atomically."""
    run = Path(run)
    data = read_run(run) | fields
    tmp = run / f"{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, run / RUN_FILE)


def load_student(run: str | Path) -> SDiT:
    read_run(run)
    return SDiT.from_pretrained(Path(run) / TRANSFORMER)


def save_student(run: str | Path, student: SDiT) -> None:
    """Replace transformer/ whole: a reader sees the old weights or the new ones."""
    run = Path(run)
    tmp, old = run / f".{TRANSFORMER}.tmp", run / f".{TRANSFORMER}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    student.save_pretrained(tmp, safe_serialization=True)
    os.replace(run / TRANSFORMER, old)
    os.replace(tmp, run / TRANSFORMER)
    shutil.rmtree(old)
