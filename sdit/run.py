"""The run folder: a trained (or untrained) student as a self-contained diffusers pipeline folder.

    model_index.json        SDiTPipeline and its components, as diffusers writes it
    transformer/            the SDiT student (EMA weights once trained): config.json + safetensors
    vae/ text_encoder/      the teacher's, saved in the diffusers layout (its UNet is never loaded)
    tokenizer/ scheduler/   the teacher's CLIP tokenizer and noise schedule
    sdit_run.json           provenance: the teacher's identity, the student preset, the training config
                            and progress (what `sdit train` writes is in pipeline/train.py)

It is the counterpart of the seed's `sdit.ckpt` (an SD checkpoint with a DiT attached): sampling needs
nothing else. `write_run` writes one from its parts; the init stage (pipeline/init.py, `sdit init`) makes the
parts. Nothing here loads a teacher: stage two imports this module.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import diffusers

from sdit.dit import SDiT
from sdit.errors import SDiTError
from sdit.files import replace_text

if TYPE_CHECKING:  # for annotations only: importing the teacher loader here would put it into stage two
    from sdit.teacher import Teacher

RUN_FILE = "sdit_run.json"
RUN_VERSION = 1
MODEL_INDEX = "model_index.json"
TRANSFORMER = "transformer"
PIPELINE_CLASS = "SDiTPipeline"


@dataclass(frozen=True)
class LatentSpace:
    """What a student must fit: the teacher's latent grid and channels, and its text width."""

    sample_size: int
    in_channels: int
    text_dim: int


def write_run(out: str | Path, student: SDiT, teacher: Teacher, provenance: dict) -> Path:
    """Every part of a run folder, written beside `out` and moved into place whole: the student, and the
    teacher's VAE, text encoder, tokenizer and scheduler (`teacher` needs no UNet)."""
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
    run = {"schema_version": RUN_VERSION, "teacher": teacher.identity.to_json(),
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **provenance}
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
    data = json.loads((run / RUN_FILE).read_text())
    if data.get("schema_version") != RUN_VERSION:
        raise SDiTError(f"{run}: run folder version {data.get('schema_version')}, this SDiT reads version "
                        f"{RUN_VERSION}")
    return data


def update_run(run: str | Path, **fields) -> None:
    """Merge `fields` into sdit_run.json, atomically."""
    run = Path(run)
    replace_text(run / RUN_FILE, json.dumps(read_run(run) | fields, indent=2, default=str) + "\n")


def student_folder(run: str | Path) -> Path:
    """The run folder's transformer/, refused in one line when the run is no run folder or has no student."""
    read_run(run)
    folder = Path(run) / TRANSFORMER
    old = folder.with_name(f".{TRANSFORMER}.old")
    if not folder.exists() and (old / "config.json").exists():  # killed inside save_student: the last weights
        os.replace(old, folder)
    if not (folder / "config.json").exists():
        raise SDiTError(f"{run} has no student ({TRANSFORMER}/config.json and weights); make the run folder with "
                        "`sdit init`")
    return folder


def load_student(run: str | Path) -> SDiT:
    return SDiT.from_pretrained(student_folder(run))


def save_student(run: str | Path, student: SDiT) -> None:
    """Replace transformer/ whole: a reader sees the old weights or the new ones (`student_folder` puts the old
    ones back when a kill lands between the two renames)."""
    run = Path(run)
    student_folder(run)
    tmp, old = run / f".{TRANSFORMER}.tmp", run / f".{TRANSFORMER}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    student.save_pretrained(tmp, safe_serialization=True)
    if (run / TRANSFORMER).exists():
        os.replace(run / TRANSFORMER, old)
    os.replace(tmp, run / TRANSFORMER)
    shutil.rmtree(old, ignore_errors=True)
