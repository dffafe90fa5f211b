"""`sdit bench ray-encode`: stage one's encode on Ray two ways, on the same Parquet source and the same Ray.

    pool       `sdit encode --ray-address local`: actors that each hold the VAE and text encoder, read and decode
               their shards' images on threads of their own and write each shard whole (what SDiT runs)
    ray-data   Ray Data's batch-inference pipeline: read_parquet -> decode tasks on the CPUs -> an actor pool of
               encoders -> the driver, which writes each shard in order as its rows arrive

Both write the same store (shard k = rows [k*shard_size, (k+1)*shard_size)); each is timed from its first read to
its last shard, twice, alternately, keeping the best. Records/s, and the bytes that pass through the driver.
"""

import dataclasses
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.bench import generate_images, tiny_teacher
from pipeline.bench.config import BenchRayEncodeConfig


def bench_ray_encode(config: BenchRayEncodeConfig) -> dict:
    from pipeline.config import EncodeConfig
    from pipeline.executors import ray_session

    with tempfile.TemporaryDirectory(prefix="sdit-bench-") as tmp:
        tmp = Path(tmp)
        source = _parquet(generate_images(tmp / "images", config.images, config.resolution), tmp / "source.parquet")
        encode = EncodeConfig(source=str(source), teacher=tiny_teacher(tmp), out="", resolution=config.resolution,
                              batch_size=config.batch_size, shard_size=config.shard_size, device="cpu", threads=1,
                              ray_address="local", num_workers=config.workers, overwrite=True)
        times: dict[str, list[float]] = {"pool": [], "ray_data": []}
        with ray_session("local", tmp, num_cpus=config.cpus):
            for repeat in range(config.repeats):
                out = str(tmp / f"pool-{repeat}")
                times["pool"].append(_pool(dataclasses.replace(encode, out=out)))
                data_out = str(tmp / f"ray-data-{repeat}")
                seconds, driver_bytes = _ray_data(dataclasses.replace(encode, out=data_out), config.workers)
                times["ray_data"].append(seconds)
        same = _same_records(tmp / "pool-0", tmp / "ray-data-0")
    pool, data = (config.images / min(times[k]) for k in ("pool", "ray_data"))
    return {"pool_records_per_s": pool, "ray_data_records_per_s": data, "ratio": pool / data,
            "ray_data_driver_bytes_per_record": driver_bytes / config.images, "same_records": same,
            "config": asdict(config)}


def format_table(result: dict) -> str:
    return "\n".join([
        f"{'actor pool (sdit encode)':<44}{result['pool_records_per_s']:>10.1f} records/s",
        f"{'Ray Data pipeline':<44}{result['ray_data_records_per_s']:>10.1f} records/s",
        f"{'pool / Ray Data':<44}{result['ratio']:>10.3f}",
        f"{'Ray Data: bytes through the driver':<44}{result['ray_data_driver_bytes_per_record']:>10,.0f} a record",
        f"{'the same records (latents, text)':<44}{str(result['same_records']):>10}",
    ])


def _parquet(images: Path, path: Path) -> Path:
    """The generated images as one Parquet file in the Hugging Face layout."""
    pngs = sorted(images.glob("*.png"))
    table = pa.table({"image": [{"bytes": p.read_bytes(), "path": p.name} for p in pngs],
                      "text": [p.with_suffix(".txt").read_text() for p in pngs],
                      "position": np.arange(len(pngs))})  # Ray Data's rows say where they come from
    pq.write_table(table, path, row_group_size=64)
    return path


def _pool(config) -> float:
    from pipeline.encode import encode

    started = []
    encode(config, on_total=lambda _: started.append(time.perf_counter()))
    return time.perf_counter() - started[0]


class _Encoder:
    """Ray Data's callable class: the VAE and text encoder of one actor, a batch of decoded pixels in, latents and
    text embeddings out."""

    def __init__(self, config):
        from pipeline.encode import EncoderFactory

        self.encoder = EncoderFactory(config)()

    def __call__(self, batch: dict) -> dict:
        text, counts, _ = self.encoder.encode_text(list(batch["text"]))
        return {"latents": self.encoder.encode_images(batch["pixels"]), "text_emb": text, "token_count": counts,
                "captions": batch["text"], "positions": batch["positions"]}


def _decode(batch: dict, resolution: int) -> dict:
    from sdit.decode import load_image

    pixels = np.stack([load_image(image["bytes"], resolution) for image in batch["image"]])
    return {"pixels": pixels, "text": batch["text"], "positions": batch["position"]}


def _ray_data(config, workers: int) -> tuple[float, int]:
    """Seconds from the first read to the last shard written, and the bytes the driver took in."""
    import ray.data

    from pipeline.encode import EncoderFactory, finish, new_manifest, prepare_store
    from sdit.store import Store, write_shard

    store = Store(config.out)
    local = EncoderFactory(config)()
    manifest = prepare_store(store, new_manifest(config, local, "parquet"), overwrite=True)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # shard k = rows [k*S, (k+1)*S), as the pool writes
    context.enable_progress_bars = False
    started = time.perf_counter()
    ds = ray.data.read_parquet(config.source, columns=["image", "text", "position"])
    # Decoding asks for less than a CPU so that Ray Data runs it as tasks of its own rather than inside the encoder
    # actors (it fuses operators that ask for the same resources), as CPU decoding beside GPU actors would run.
    ds = ds.map_batches(_decode, fn_kwargs={"resolution": config.resolution}, batch_size=config.batch_size,
                        num_cpus=0.5)
    ds = ds.map_batches(_Encoder, fn_constructor_kwargs={"config": config}, batch_size=config.batch_size,
                        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1)
    driver_bytes, index = 0, 0
    for batch in ds.iter_batches(batch_size=config.shard_size, batch_format="numpy"):
        driver_bytes += sum(v.nbytes for v in batch.values())
        n = len(batch["positions"])
        columns = {"latents": batch["latents"], "text_emb": batch["text_emb"], "token_count": batch["token_count"],
                   "ids": np.array([f"source.parquet:{p}" for p in batch["positions"]], dtype=str),
                   "captions": batch["captions"].astype(str), "positions": batch["positions"].astype(np.int64)}
        write_shard(store, "records", index, columns, {"rejects": [], "truncated": 0, "size": n})
        index += 1
    seconds = time.perf_counter() - started
    finish(store, manifest, {"records": set(range(index)), "prompts": set()}, skipped=0, min_size=0)
    return seconds, driver_bytes


def _same_records(a: Path, b: Path) -> bool:
    """The same shards with the same ids, captions and positions, and latents and embeddings within fp16 rounding."""
    import zarr

    stores = [zarr.open_group(str(path), mode="r")["records"] for path in (a, b)]
    names = sorted(name for name, _ in stores[0].groups())
    if names != sorted(name for name, _ in stores[1].groups()):
        return False
    exact = all(np.array_equal(stores[0][f"{n}/{c}"][:], stores[1][f"{n}/{c}"][:])
                for n in names for c in ("ids", "captions", "positions", "token_count"))
    return exact and all(np.allclose(stores[0][f"{n}/{c}"][:], stores[1][f"{n}/{c}"][:], atol=1e-3)
                         for n in names for c in ("latents", "text_emb"))
