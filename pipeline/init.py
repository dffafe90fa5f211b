"""The init stage: a fresh, untrained student beside its teacher's VAE, text encoder, tokenizer and scheduler.

    sdit init --teacher T --student PRESET --out RUN      sized from the teacher's configs
    sdit train STORE --student PRESET --out RUN           sized from the store (`init_for_store`), then trained

It is the only part of stage two that reads a teacher, and it reads only the VAE and the text encoder: of a
single `.safetensors` file the UNet's tensors are never read (sdit.teacher.read_state_dict). The train stage
itself imports nothing that can load a teacher (invariant 8); the CLI composes the two.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pipeline.config import InitConfig
from sdit.dit import build_student, count_parameters
from sdit.errors import SDiTError
from sdit.files import check_folder
from sdit.labels import read_labels
from sdit.run import LatentSpace, write_run
from sdit.store import Store
from sdit.teacher import SD15_CONFIG_DIR, load_teacher


@dataclass(frozen=True)
class InitSummary:
    run: Path
    preset: str
    parameters: int
    space: LatentSpace
    text_positions: int | None = None

    def line(self) -> str:
        s = self.space
        positions = f", cross-attending to {self.text_positions} of its positions" if self.text_positions else ""
        return (f"wrote {self.run}: {self.preset}, {self.parameters / 1e6:.1f}M parameters, latents {s.in_channels}x"
                f"{s.sample_size}x{s.sample_size}, text width {s.text_dim}{positions}")


def teacher_latent_space(teacher: str | Path, config_dir: str | Path | None = None) -> LatentSpace:
    """The teacher's latent grid and channels and its text width, from its configs alone (no weights)."""
    path = Path(teacher)
    cfg = path if path.is_dir() else Path(config_dir) if config_dir else SD15_CONFIG_DIR
    try:
        unet = json.loads((cfg / "unet" / "config.json").read_text())
        text = json.loads((cfg / "text_encoder" / "config.json").read_text())
    except FileNotFoundError as err:
        raise SDiTError(f"{cfg} lacks {Path(err.filename).relative_to(cfg)}: cannot tell the teacher's latent "
                        "size and text width") from None
    return LatentSpace(int(unet["sample_size"]), int(unet["in_channels"]), int(text["hidden_size"]))


def init(config: InitConfig, space: LatentSpace | None = None) -> InitSummary:
    """Write an untrained run folder: a fresh `config.student` (seeded) sized for `space` (default: the
    teacher's, from its configs), beside the teacher's VAE, text encoder, tokenizer and scheduler."""
    config.check()
    check_folder(config.out)
    space = space or teacher_latent_space(config.teacher, config.teacher_config)
    if config.sample_size is not None:
        space = replace(space, sample_size=config.sample_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        student = build_student(config.student, sample_size=space.sample_size, in_channels=space.in_channels,
                                text_dim=space.text_dim, guidance_embed=config.guidance_embed,
                                guidance_linear=config.guidance_linear, text_positions=config.text_positions)
    parts = load_teacher(config.teacher, components=("vae", "text_encoder"), config_dir=config.teacher_config)
    made = {"preset": config.student, "seed": config.seed} | (
        {"text_positions": config.text_positions} if config.text_positions else {})
    run = write_run(config.out, student, parts, {"student": made})
    return InitSummary(run, config.student, count_parameters(student)["total"], space, config.text_positions)


def init_for_store(store: str, labels: str, out: str, student: str, *, teacher: str | None = None,
                   teacher_config: str | None = None, seed: int = 0, guidance_linear: bool = False,
                   text_positions: int | None = None) -> InitSummary:
    """A fresh student for training on `store`'s labels: sized from the store's latents and text width, taking
    the guidance scale when the labels are guided (at the output with `guidance_linear`), cross-attending to the
    first `text_positions` of the text (None: all), beside the VAE and text encoder of the store's teacher (or of
    `teacher`, when that one's files are elsewhere)."""
    s = Store(store)
    manifest = s.manifest()
    meta = read_labels(s, labels)
    path = teacher or manifest.teacher["path"]
    if not Path(path).exists():
        raise SDiTError(f"the store's teacher {path} is not on this machine; pass --teacher (its VAE and text "
                        "encoder go into the run folder)")
    c, h, _ = manifest.latent_shape
    config = InitConfig(teacher=path, student=student, out=out, teacher_config=teacher_config,
                        guidance_embed=meta is not None and meta.guided,
                        guidance_linear=guidance_linear and meta is not None and meta.guided,
                        text_positions=text_positions, seed=seed)
    return init(config, LatentSpace(h, c, manifest.text_shape[1]))
