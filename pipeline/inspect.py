"""`sdit inspect`: decode records or synthetic records of a store to PNGs and a captioned grid, to look at what the
student will learn from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import sdit
from pipeline.config import InspectConfig
from sdit import sampling
from sdit.errors import SDiTError
from sdit.files import check_folder, replacing
from sdit.progress import Progress, no_progress
from sdit.store import Manifest, Store
from sdit.synthesize import SYNTHETIC, SyntheticManifest, read_synthetic


def inspect_store(config: InspectConfig, progress: Progress = no_progress) -> dict:
    """Decode the first `limit` records (or synthetic records) of a store: OUT/NNNN.png, each with its caption and
    provenance in the PNG text chunk, and OUT/grid.png with captions. Returns {"images", "out", "grid"}."""
    from sdit.devices import resolve_device
    from sdit.images import captioned_grid, save_png

    config.check()
    check_folder(config.out)
    store = Store(config.store)
    manifest = store.manifest()
    group = SYNTHETIC if config.synthetic else "records"
    rows = _first_rows(store, group, config.limit)
    if not rows:
        make = "`sdit teacher-label STORE --teacher T --synthesize N`" if config.synthetic else "`sdit encode`"
        raise SDiTError(f"{store.url} has no finished {group} shards; make them with {make}")
    device = resolve_device(config.device)
    vae = load_vae(config, manifest).to(device)
    provenance = read_synthetic(store) if config.synthetic else None
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    images, captions = [], []
    for start in range(0, len(rows["latents"]), config.batch_size):
        pixels = sampling.decode(vae, torch.as_tensor(rows["latents"][start:start + config.batch_size]).float())
        for i, image in enumerate(pixels, start):
            save_png(image, out / f"{i:04d}.png", _png_text(config, rows, i, provenance))
            images.append(image)
            captions.append(str(rows["captions"][i]) + (f" (sample {rows['sample'][i]})" if config.synthetic else ""))
        progress(len(pixels))
    grid = out / "grid.png"
    with replacing(grid) as tmp:
        captioned_grid({group: images}, captions, config.columns).save(tmp)
    return {"images": len(images), "out": str(out), "grid": str(grid)}


def _first_rows(store: Store, group: str, limit: int) -> dict[str, np.ndarray]:
    names = ["latents", "captions", "ids"] + (["prompt_index", "sample"] if group == SYNTHETIC else [])
    parts, want = [], limit
    for _, shard in store.iter_shards(group):
        if want <= 0:
            break
        take = min(want, shard["latents"].shape[0])
        if take:
            parts.append({name: shard[name][:take] for name in names})
        want -= take
    return {name: np.concatenate([p[name] for p in parts]) for name in names} if parts else {}


def load_vae(config: InspectConfig, manifest: Manifest):
    """The VAE of `config.vae` (a run folder or a teacher; default the store's teacher), refused in one line if it
    is not the one the store's latents were encoded with."""
    from diffusers import AutoencoderKL

    from sdit.run import RUN_FILE, read_run
    from sdit.teacher import load_teacher

    path = Path(config.vae or manifest.teacher["path"])
    if not path.exists():
        raise SDiTError(f"the store's teacher {path} is not on this machine; pass --vae with a teacher or run folder")
    if (path / RUN_FILE).exists():
        vae, vae_hash = AutoencoderKL.from_pretrained(path / "vae"), read_run(path)["teacher"]["hashes"].get("vae")
    else:
        teacher = load_teacher(path, components=("vae",), config_dir=config.teacher_config)
        vae, vae_hash = teacher.vae, teacher.identity.hashes["vae"]
    if vae_hash != manifest.teacher["hashes"].get("vae"):
        raise SDiTError(f"the VAE of {path} is not the one the store was encoded with ({manifest.teacher['path']}); "
                        "pass --vae with that teacher or a run folder made from it")
    return vae.eval().requires_grad_(False)


def _png_text(config: InspectConfig, rows: dict, i: int, provenance: SyntheticManifest | None) -> dict[str, str]:
    text = {"caption": str(rows["captions"][i]), "id": str(rows["ids"][i]), "store": str(config.store),
            "group": SYNTHETIC if config.synthetic else "records", "software": f"sdit {sdit.__version__}"}
    if provenance is not None:
        c = provenance.config
        text |= {"prompt_index": str(rows["prompt_index"][i]), "sample": str(rows["sample"][i]),
                 "seed": str(c["seed"]), "steps": str(c["steps"]), "guidance": str(c["guidance"]),
                 "scheduler": provenance.scheduler["class"], "teacher": provenance.teacher["path"]}
    return text
