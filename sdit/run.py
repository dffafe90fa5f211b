"""The run folder: a trained (or untrained) student as a self-contained diffusers pipeline folder.

    model_index.json        SDiTPipeline and its components, as diffusers reads it
    pipeline_sdit.py ...    the pipeline's code: sdit/pipeline_sdit.py and the sdit modules it imports
    transformer/            the SDiT student (EMA weights once trained): config.json + safetensors, and its code
                            (modeling_sdit.py, a copy of sdit/dit.py, and the modules that imports)
    vae/ text_encoder/      the teacher's, saved in the diffusers layout (its UNet is never loaded)
    tokenizer/ scheduler/   the teacher's CLIP tokenizer, and its noise schedule as the sampler `sdit sample`
                            uses by default
    sdit_run.json           provenance: the teacher's identity, the student preset, the training config
                            and progress (what `sdit train` writes is in pipeline/train.py)

It is the counterpart of the seed's `sdit.ckpt` (an SD checkpoint with a DiT attached): sampling needs
nothing else. With sdit installed `SDiTPipeline.from_pretrained(run)` loads it with sdit's own classes; without,
`DiffusionPipeline.from_pretrained(run, trust_remote_code=True)` loads it with the code it carries (diffusers'
custom components). `write_run` writes one from its parts; the init stage (pipeline/init.py, `sdit init`) makes
the parts. Nothing here loads a teacher: stage two imports this module.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import diffusers

from sdit import dit, pipeline_sdit
from sdit.config import DEFAULT_SCHEDULER
from sdit.dit import SDiT
from sdit.errors import SDiTError, read_json_object
from sdit.files import recover_folder, replace_text, writing_folder
from sdit.pipeline_sdit import MODEL_INDEX, MODEL_MODULE, PIPELINE_MODULE, TRANSFORMER, SDiTPipeline, copy_code
from sdit.sampling import SCHEDULERS, make_scheduler

if TYPE_CHECKING:  # for annotations only: importing the teacher loader here would put it into stage two
    from sdit.teacher import Teacher

RUN_FILE = "sdit_run.json"
RUN_VERSION = 1


@dataclass(frozen=True)
class LatentSpace:
    """What a student must fit: the teacher's latent grid and channels, and its text width."""

    sample_size: int
    in_channels: int
    text_dim: int


def write_run(out: str | Path, student: SDiT, teacher: Teacher, provenance: dict) -> Path:
    """Every part of a run folder, written beside `out` and moved into place whole: the student, the teacher's
    VAE, text encoder and tokenizer (`teacher` needs no UNet), its noise schedule as `sdit sample`'s default
    sampler, and the code that loads them."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SDiTError(f"{out} exists and is not empty; choose another folder or remove it")
    with writing_folder(out) as tmp:
        _write_parts(tmp, student, teacher, provenance)
    return out


def _write_parts(folder: Path, student: SDiT, teacher: Teacher, provenance: dict) -> None:
    save_student_folder(folder / TRANSFORMER, student)
    teacher.vae.save_pretrained(folder / "vae", safe_serialization=True)
    teacher.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    teacher.tokenizer.save_pretrained(folder / "tokenizer")
    scheduler = make_scheduler(DEFAULT_SCHEDULER, teacher.scheduler_config)
    scheduler.save_pretrained(folder / "scheduler")
    copy_code(Path(pipeline_sdit.__file__), folder / f"{PIPELINE_MODULE}.py")
    index = {
        "_class_name": [PIPELINE_MODULE, SDiTPipeline.__name__],
        "_diffusers_version": diffusers.__version__,
        TRANSFORMER: [MODEL_MODULE, SDiT.__name__],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", SCHEDULERS[DEFAULT_SCHEDULER]],
    }
    (folder / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    run = {"schema_version": RUN_VERSION, "teacher": teacher.identity.to_json(),
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **provenance}
    (folder / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n")


def read_run(run: str | Path) -> dict:
    """The run's provenance; a one-line error if `run` is not a run folder."""
    run = Path(run)
    if not (run / MODEL_INDEX).exists() or not (run / RUN_FILE).exists():
        raise SDiTError(f"{run} is not an SDiT run folder (no {MODEL_INDEX} / {RUN_FILE}); make one with "
                        "`sdit init` or `sdit train`")
    data = read_json_object(run / RUN_FILE, "restore the run folder from a copy")
    if data.get("schema_version") != RUN_VERSION:
        raise SDiTError(f"{run}: run folder version {data.get('schema_version')}, this SDiT reads version "
                        f"{RUN_VERSION}")
    return data


def location(path: str | Path) -> str:
    """A path as a run records it: absolute, symlinks followed, on local disk; a URL (s3://...) as given."""
    path = str(path)
    return path if "://" in path else str(Path(path).expanduser().resolve())


def same_location(a: str | Path, b: str | Path) -> bool:
    """Whether two paths lead to the same folder or file, however they are written."""
    return location(a).rstrip("/") == location(b).rstrip("/")


def update_run(run: str | Path, **fields) -> None:
    """Merge `fields` into sdit_run.json, atomically."""
    run = Path(run)
    replace_text(run / RUN_FILE, json.dumps(read_run(run) | fields, indent=2, default=str) + "\n")


def student_folder(run: str | Path) -> Path:
    """The run folder's transformer/, refused in one line when the run is no run folder or has no student."""
    read_run(run)
    folder = recover_folder(Path(run) / TRANSFORMER)  # killed inside save_student: the last weights
    if not (folder / "config.json").exists():
        raise SDiTError(f"{run} has no student ({TRANSFORMER}/config.json and weights); make the run folder with "
                        "`sdit init`")
    return folder


def load_student(run: str | Path) -> SDiT:
    return SDiT.from_pretrained(student_folder(run))


def save_student(run: str | Path, student: SDiT) -> None:
    """Replace transformer/ whole: a reader sees the old weights or the new ones (`student_folder` puts the old
    ones back when a kill lands between the two renames)."""
    with writing_folder(student_folder(run)) as tmp:
        save_student_folder(tmp, student)


def save_student_folder(folder: Path, student: SDiT) -> None:
    """The student's config and weights, and its code (sdit/dit.py as MODEL_MODULE, with what that imports)."""
    student.save_pretrained(folder, safe_serialization=True)
    copy_code(Path(dit.__file__), folder / f"{MODEL_MODULE}.py")
