"""`sdit bench`: what each stage costs where it runs (the shapes-world experiments are in pipeline/experiments).

    encode.py     `sdit bench encode`
    label.py      `sdit bench label`
    train.py      `sdit bench train`
    sample.py     `sdit bench sample`
    sd15.py       `sdit bench sd15` (every stage with SD 1.5's architecture at 512 px; the GPU check), with
                  sd15_teacher.py (the random teacher, kept per user), sd15_stages.py (each stage in a child
                  process), sd15_throughput.py and sd15_precision.py
    timing.py     the clock every benchmark times with: best of N, alternating, waiting for CUDA
    memory.py     `sdit bench memory` (peak memory of a training step at 512 px; per-GPU batches)
    startup.py    `sdit bench startup` (seconds from `sdit --help` to its answer)

What they share lives here: the default tiny teacher and generated store, the matmul ceiling, JSON output.
"""

import json
import time
from pathlib import Path

import numpy as np

from sdit.files import replace_text


def tiny_teacher(folder: Path) -> str:
    """The benchmarks' default teacher: a tiny random SD-shaped one, written to `folder`/teacher."""
    from sdit.tiny import save_tiny_teacher

    return str(save_tiny_teacher(folder / "teacher"))


def encoded_store(folder: Path, teacher: str, images: int, resolution: int, teacher_config: str | None = None,
                  device: str = "auto", dtype: str = "auto") -> str:
    """The benchmarks' default store: `images` generated images encoded with `teacher` into `folder`/store."""
    from pipeline.encode import EncodeConfig, encode

    store = str(folder / "store")
    encode(EncodeConfig(source=str(generate_images(folder / "images", images, resolution)), teacher=teacher, out=store,
                        teacher_config=teacher_config, resolution=resolution, device=device, dtype=dtype))
    return store


SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "prediction_type": "epsilon"}


def random_labelled_store(url: str, shards: int, records: int, draws: int = 2, latent_shape=(4, 8, 8),
                          text_shape=(77, 32), seed: int = 0) -> str:
    """A finished, labelled store of random arrays, written directly (no teacher, no images): `shards` shards of
    `records` records, `draws` draws each, every kind of draw but input perturbations (labels "default", indexed as
    `sdit teacher-label` indexes them). For what the loader costs at a size no test could label."""
    from sdit.labels import LabelsManifest, write_index, write_labels
    from sdit.perturb import Kind
    from sdit.store import LABEL_COLUMNS, Manifest, Store, write_shard

    rng = np.random.default_rng(seed)
    store = Store(url)
    root = store.root_group(mode="w")
    root.create_array("null_text_emb", shape=text_shape, dtype="float16", fill_value=0)[:] = 0
    done = {}
    for k in range(shards):
        n, base = records, k * records
        write_shard(store, "records", k, {
            "latents": rng.standard_normal((n, *latent_shape)).astype(np.float16),
            "text_emb": rng.standard_normal((n, *text_shape)).astype(np.float16),
            "token_count": np.full(n, 5, np.int16), "ids": np.array([str(base + i) for i in range(n)]),
            "captions": np.array([f"caption {base + i}" for i in range(n)]),
            "positions": np.arange(base, base + n, dtype=np.int64)}, {"rejects": [], "truncated": 0})
        kind = rng.choice([Kind.NONE, Kind.SWAP, Kind.MIX, Kind.NULL], size=(n, draws)).astype(np.uint8)
        labels = {name: np.zeros((n, draws, *((2,) if name.startswith("caption") else ())), col.dtype)
                  for name, col in LABEL_COLUMNS.items() if col.per_record and not col.optional}
        labels |= {"timesteps": rng.integers(0, 1000, (n, draws), dtype=np.int32), "kind": kind,
                   "caption_index": rng.integers(0, shards * records, (n, draws, 2)),
                   "xi_index": np.full((n, draws), -1, np.int32),
                   "weight": rng.random((n, draws), np.float32), "valid": np.ones((n, draws), bool),
                   "noise": rng.standard_normal((n, draws, *latent_shape)).astype(np.float16),
                   "eps_teacher": rng.standard_normal((n, draws, *latent_shape)).astype(np.float16),
                   "xi": np.zeros((0, *latent_shape), np.float16)}
        labels["caption_from"][:] = 1  # CaptionFrom.RECORD
        done[k] = {"draws": n * draws, "dropped": 0, "invalid_rows": {}, "count": n}
        write_shard(store, "labels/default", k, labels, done[k])
    manifest = Manifest(source={"location": "random", "format": "random"}, teacher={"scheduler": SD_SCHEDULER},
                        resolution=8 * latent_shape[-1], latent_scale=0.18215, latent_shape=tuple(latent_shape),
                        text_shape=tuple(text_shape), shard_size=records, status="complete",
                        counts={"records": shards * records, "shards": shards})
    store.write_manifest(manifest)
    write_index(store, "default", {"records": done}, draws)
    write_labels(store, LabelsManifest(name="default", teacher={}, scheduler=SD_SCHEDULER, prediction_type="epsilon",
                                       seed=seed, draws=draws, timesteps="uniform",
                                       perturb={"input_gamma": 0.1, "caption_min_t": 0}, status="complete"))
    return url


def write_json(result: dict, path: str | Path) -> None:
    """`--json PATH`: the figures, atomically, into PATH (its folder made when missing)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    replace_text(path, json.dumps(result, indent=2) + "\n")


def generate_images(folder: Path, n: int, resolution: int, seed: int = 0) -> Path:
    """n PNG images of coloured ellipses and boxes with captions: cheap to decode, like real thumbnails."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    colours = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
    names = list(colours)
    for i in range(n):
        colour = names[rng.integers(len(names))]
        shape = ("circle", "square")[rng.integers(2)]
        img = Image.new("RGB", (resolution, resolution), (245, 245, 245))
        x0, y0 = rng.integers(0, resolution // 2, size=2)
        box = (int(x0), int(y0), int(x0) + resolution // 3, int(y0) + resolution // 3)
        draw = ImageDraw.Draw(img)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colours[colour])
        img.save(folder / f"{i:06d}.png")
        (folder / f"{i:06d}.txt").write_text(f"a {colour} {shape} on a white background")
    return folder


def matmul_gflops(device, n: int = 2048, repeats: int = 5, dtype=None) -> float:
    """The machine's practical ceiling: a large matmul (fp32 unless `dtype` says otherwise; TF32 off on GPU),
    best of `repeats`."""
    import torch

    from pipeline.bench.timing import best_of

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / best_of({"matmul": lambda: a @ b}, repeats, device)["matmul"] / 1e9


def checksum_seconds(store_url: str, groups: list[str], repeats: int = 3) -> dict:
    """Seconds per record that the CRC32C of every chunk adds to writing and to reading the finished shards of
    `groups`: the same arrays written to a scratch store with and without the checksum, then read back whole,
    best of `repeats`, alternating. Returns `write_s_per_record`, `read_s_per_record` (with less without) and
    `records` (of the first group)."""
    import tempfile

    from sdit.store import Store, write_shard

    store = Store(store_url)
    shards = [(group, index, record, {name: arr[:] for name, arr in store.shard_group(group, index).arrays()})
              for group in groups for index, record in store.finished(group).items()]
    records = sum(record["count"] for group, _, record, _ in shards if group == groups[0])
    best = {}
    with tempfile.TemporaryDirectory(prefix="sdit-crc-") as tmp:
        for _ in range(repeats):
            for checksum in (True, False):
                target = Store(f"{tmp}/{checksum}")
                for group in groups:
                    target.remove(group)
                start = time.perf_counter()
                for group, index, record, columns in shards:
                    write_shard(target, group, index, columns, record, checksum=checksum)
                written = time.perf_counter()
                for group, index, _, _ in shards:
                    for _, arr in target.shard_group(group, index).arrays():
                        arr[:]
                read = time.perf_counter()
                for key, value in (("write", written - start), ("read", read - written)):
                    best[key, checksum] = min(best.get((key, checksum), float("inf")), value)
    return {"write_s_per_record": (best["write", True] - best["write", False]) / records,
            "read_s_per_record": (best["read", True] - best["read", False]) / records, "records": records}
