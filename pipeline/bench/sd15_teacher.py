"""The random SD 1.5-shaped teacher of `sdit bench sd15`, built once per user and kept.

`random_teacher` builds the UNet, VAE and text encoder from a config folder (data/sd15) with seeded random weights
and saves them, both as a diffusers folder and as one original-layout `.safetensors` file (fp16, as SD's `-fp16`
files), in the user's cache folder (`$XDG_CACHE_HOME/sdit`, else `~/.cache/sdit`) under a name made from what it is
built from (the configs, the seed, the dtype). It is built beside that name and renamed into place, so a build
killed half way is never read, and every later run, benchmark or test, reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

CACHE_DTYPE = "fp16"  # the cache's weights on disk: half the bytes of fp32; loaded in the stage's dtype
SINGLE_FILE = "sd15-random.safetensors"


@dataclass(frozen=True)
class TeacherCache:
    folder: Path  # diffusers layout
    single_file: Path  # original layout; its configs are the config folder's


def default_cache() -> Path:
    """The user's cache folder for sdit: `$XDG_CACHE_HOME/sdit`, else `~/.cache/sdit`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdit"


def random_teacher(config_dir: str | Path, cache: str | Path | None = None, seed: int = 0) -> TeacherCache:
    """An SD-shaped teacher with the architecture of `config_dir`'s configs and seeded random weights, in both
    layouts, under `cache` (default: `default_cache()`) in a folder named by its configs' hash, seed and dtype:
    built there once (beside it, then renamed into place), read back on every later call."""
    config_dir = Path(config_dir)
    identity = {"configs": _configs_hash(config_dir), "seed": seed, "dtype": CACHE_DTYPE}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache or default_cache()) / f"random-teacher-{key}"
    if _finished(folder, identity):
        return _layouts(folder)
    for left in folder.parent.glob(f"{folder.name}.building-*"):  # builds killed half way
        if not _alive(int(left.name.rsplit("-", 1)[1])):
            shutil.rmtree(left, ignore_errors=True)
    building = folder.with_name(f"{folder.name}.building-{os.getpid()}")
    build_and_save(config_dir, _layouts(building), seed)
    (building / "done.json").write_text(json.dumps(identity))
    if _finished(folder, identity):  # another process built it meanwhile
        shutil.rmtree(building)
    else:
        shutil.rmtree(folder, ignore_errors=True)  # an unfinished or foreign folder of this name
        os.replace(building, folder)
    return _layouts(folder)


def _finished(folder: Path, identity: dict) -> bool:
    done = folder / "done.json"
    return done.exists() and json.loads(done.read_text()) == identity


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _layouts(folder: Path) -> TeacherCache:
    return TeacherCache(folder / "diffusers", folder / SINGLE_FILE)


def build_and_save(config_dir: Path, made: TeacherCache, seed: int) -> None:
    """Build the three components with seeded random weights and save them in both layouts, fp16."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdit.convert import to_original_layout
    from sdit.tiny import save_configs

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        models = {
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder",
                                                                         local_files_only=True)),
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir / "unet")),
        }
    for model in models.values():
        model.half()
    save_configs(models, made.folder, source=config_dir)
    for name, model in models.items():
        model.save_pretrained(made.folder / name)
    save_file(to_original_layout(models["unet"], models["vae"], models["text_encoder"]), made.single_file)


def _configs_hash(config_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in ("unet", "vae", "text_encoder"):
        digest.update((config_dir / name / "config.json").read_bytes())
    return digest.hexdigest()[:16]
