"""Stage one, part 1: image-caption pairs -> scaled VAE latents and CLIP text embeddings in a store.

    plan (driver, sequential)        caption checks, duplicate ids, shard boundaries by source position
    encode_shard (worker)            read and decode images, VAE + text encoder in batches, write the shard whole
    finish (driver)                  duplicates across tar shards, rejects file, counts, manifest "complete"

Shard k holds the accepted items among source positions [k*shard_size, (k+1)*shard_size), so a
rerun after a crash plans the same shards, skips the finished ones and redoes the rest. The driver reads
ids and captions, never an image: a folder's items name their files, a Parquet source's their file and row.
Webdataset tar files hold their captions beside the images, so there shard k is tar file k, read whole by
the worker that encodes it (which checks its captions and ids); a duplicate id across tar files is
dropped from the later shard when all are done. (With --limit, the driver reads the tar files in order.)
"""

import dataclasses
import functools
import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

import sdit
from pipeline.config import EncodeConfig
from pipeline.executors import LocalExecutor, RayExecutor, ray_session, worker_device
from sdit.config import vae_scale_factor
from sdit.decode import load_image
from sdit.devices import setup_worker
from sdit.errors import RejectedInput, SDiTError
from sdit.files import check_folder
from sdit.latents import to_latent_space
from sdit.progress import Progress, no_progress
from sdit.prompts import PromptSource, open_prompts
from sdit.run import location
from sdit.sources import SourceItem, TarSource, open_source, parquet_images, tar_items
from sdit.store import (
    MANIFEST,
    RECORD_COLUMNS,
    WRITER_LOCK,
    Manifest,
    Store,
    shard_name,
    write_shard,
)
from sdit.teacher import Teacher, load_teacher
from sdit.text import tokenize


@dataclass
class ShardTask:
    group: str  # "records" or "prompts"
    index: int
    items: list[SourceItem]  # passed the driver's checks; images not decoded yet
    rejects: list[dict] = field(default_factory=list)
    size: int = 0  # source items this shard covers, for progress
    tar: str | None = None  # a webdataset tar file whose items the worker reads and checks itself (items empty)


@dataclass
class EncodeSummary:
    store: str
    records: int
    rejects: int
    truncated: int
    prompts: int
    shards: int
    skipped_shards: int  # finished by an earlier run

    def line(self) -> str:
        return (f"encoded {self.records} records into {self.shards} shards at {self.store} "
                f"({self.rejects} rejected, {self.truncated} captions truncated to 77 tokens, "
                f"{self.prompts} prompts; {self.skipped_shards} shards already done)")


# --- the worker ---------------------------------------------------------------------------------------
class ShardEncoder:
    """Holds the VAE and text encoder; turns one ShardTask into one finished shard."""

    def __init__(self, config: EncodeConfig, teacher: Teacher, device: torch.device, dtype: torch.dtype):
        self.config, self.teacher, self.device, self.dtype = config, teacher, device, dtype
        self.store = Store(config.out)
        # Images decode on several threads (Pillow releases the GIL), so that one GPU is fed by more than one core.
        self.decoders = ThreadPoolExecutor(max_workers=config.threads or os.cpu_count() or 1,
                                           thread_name_prefix="sdit-decode")

    @torch.inference_mode()
    def encode_text(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
        """(N, 77, D) fp16 last hidden states, (N,) token counts, and how many were truncated."""
        ids, lengths = tokenize(self.teacher.tokenizer, captions)
        emb = self.teacher.text_encoder(ids.to(self.device)).last_hidden_state
        limit = self.teacher.tokenizer.model_max_length
        counts = np.minimum(lengths, limit).astype(np.int16)
        return emb.float().cpu().numpy().astype(np.float16), counts, int((lengths > limit).sum())

    @torch.inference_mode()
    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) in [-1, 1] -> (N, C, H/8, W/8) fp16 scaled posterior means.

        The posterior mean, not a sample: it is deterministic (so a store is reproducible byte for byte)
        and SD's posterior std is small next to the diffusion noise that stage one adds anyway."""
        x = torch.from_numpy(pixels).to(self.device, self.dtype)
        mean = self.teacher.vae.encode(x).latent_dist.mean
        return to_latent_space(self.teacher.vae, mean.float()).cpu().numpy().astype(np.float16)

    def __call__(self, task: ShardTask) -> dict:
        if task.group == "prompts":
            return self._prompt_shard(task)
        rejects, kept, latents = list(task.rejects), [], []
        items = self._tar_items(task, rejects) if task.tar else iter(task.items)
        batches = iter(lambda: list(itertools.islice(items, self.config.batch_size)), [])
        # Read and decode batch i+1 while the VAE runs on batch i: Pillow releases the GIL while it decodes.
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self._decode_next, batches)
            while (decoded := pending.result()) is not None:
                pending = pool.submit(self._decode_next, batches)
                batch, pixels, batch_rejects = decoded
                rejects.extend(batch_rejects)
                if batch:
                    latents.append(self.encode_images(pixels))
                    kept.extend(batch)
        if self.config.strict and rejects:
            raise SDiTError(f"--strict: {describe_reject(rejects[0])}")
        text, counts, truncated = self._encode_captions([item.caption for item in kept])
        columns = {
            "latents": np.concatenate(latents) if latents
            else np.zeros((0, *latent_shape(self.teacher, self.config.resolution)), np.float16),
            "text_emb": text, "token_count": counts,
            "ids": np.array([i.id for i in kept], dtype=str),
            "captions": np.array([i.caption for i in kept], dtype=str),
            "positions": np.array([i.position for i in kept], dtype=np.int64),
        }
        record = {"rejects": sorted(rejects, key=lambda r: r["position"]), "truncated": truncated, "size": task.size}
        write_shard(self.store, "records", task.index, columns, record)
        return {"group": "records", "index": task.index, "count": len(kept), **record}

    def _tar_items(self, task: ShardTask, rejects: list[dict]) -> Iterator[SourceItem]:
        """The items of a tar file that pass the checks the driver makes of other sources (captions, ids within
        the file); the others go to `rejects`. Counts the file's items into task.size."""
        seen: set[str] = set()
        for item in tar_items(task.tar, self.config.caption_key):
            task.size += 1
            if reason := _driver_reject(item, seen):
                rejects.append(reject_entry("records", item, reason))
            else:
                yield item

    def _decode_next(self, batches: Iterator[list[SourceItem]]):
        """The next batch decoded (`_decode`), or None after the last."""
        batch = next(batches, None)
        return None if batch is None else self._decode(batch)

    def _decode(self, items: list[SourceItem]) -> tuple[list[SourceItem], np.ndarray, list[dict]]:
        """Images of one batch as one (N, 3, H, W) array; the ones that fail become rejects. Images left in their
        Parquet files are read here, by the worker."""
        items = parquet_images(items)
        kept, pixels, rejects = [], [], []
        for item, image in zip(items, self.decoders.map(self._load, items)):
            if isinstance(image, RejectedInput):
                rejects.append(reject_entry("records", item, image.reason, image.detail))
            else:
                pixels.append(image)
                kept.append(item)
        return kept, np.stack(pixels) if pixels else np.zeros((0,)), rejects

    def _load(self, item: SourceItem) -> np.ndarray | RejectedInput:
        try:
            return load_image(item.read(), self.config.resolution, min_size=self.config.min_short_side)
        except RejectedInput as err:
            return err

    def _prompt_shard(self, task: ShardTask) -> dict:
        text, counts, truncated = self._encode_captions([item.caption for item in task.items])
        columns = {"text_emb": text, "token_count": counts,
                   "captions": np.array([i.caption for i in task.items], dtype=str),
                   "positions": np.array([i.position for i in task.items], dtype=np.int64)}
        record = {"rejects": task.rejects, "truncated": truncated, "size": task.size}
        write_shard(self.store, "prompts", task.index, columns, record)
        return {"group": "prompts", "index": task.index, "count": len(task.items), **record}

    def _encode_captions(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
        L, D = text_shape(self.teacher)
        parts = [self.encode_text(captions[i:i + self.config.batch_size])
                 for i in range(0, len(captions), self.config.batch_size)]
        if not parts:
            return np.zeros((0, L, D), np.float16), np.zeros((0,), np.int16), 0
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), sum(p[2] for p in parts)


@dataclass(frozen=True)
class EncoderFactory:
    """Picklable: builds a ShardEncoder inside a Ray actor (each actor loads its own teacher)."""

    config: EncodeConfig

    def __call__(self) -> ShardEncoder:
        device, dtype = setup_worker(self.config.device, self.config.dtype, self.config.threads)
        teacher = load_teacher(self.config.teacher, components=("vae", "text_encoder"),
                               config_dir=self.config.teacher_config, device=device, dtype=dtype)
        return ShardEncoder(self.config, teacher, device, dtype)


# --- the driver ---------------------------------------------------------------------------------------
def encode(config: EncodeConfig, progress: Progress = no_progress,
           on_total: Callable[[int | None], None] | None = None) -> EncodeSummary:
    """Run stage one, part 1. Resumes a store left unfinished by the same configuration."""
    config.check()
    config = dataclasses.replace(config, threads=config.threads or torch.get_num_threads())
    store = Store(config.out)
    check_out(store)
    source = open_source(config.source, image_column=config.image_column, caption_column=config.caption_column,
                         id_column=config.id_column, caption_key=config.caption_key)
    if source.format == "parquet":  # the driver reads ids and captions; each worker reads its shard's images
        source = dataclasses.replace(source, images=False)
    prompts = open_prompts(config.prompts, config.prompt_column) if config.prompts else None
    # The driver's copy: identity, shapes, the null embedding; the local worker. On Ray the workers' devices come
    # from the cluster, and the driver (perhaps a CPU-only head) encodes on its CPU.
    encoder = EncoderFactory(dataclasses.replace(config, device="cpu") if config.ray_address else config)()
    config = encoder.config = config.with_resolution(encoder.teacher.vae.config.sample_size)
    factory = EncoderFactory(config)
    with store.writer("encode"):
        manifest = prepare_store(store, new_manifest(config, encoder, source.format), config.overwrite)
        _write_null_embedding(store, encoder)
        if on_total:
            on_total(_total(source, prompts, config.limit))
        done = {"records": store.finished("records"), "prompts": store.finished("prompts")}
        planned: dict[str, set[int]] = {"records": set(), "prompts": set()}
        tasks = _pending(plan(config, source, prompts), done, planned, progress)
        if config.ray_address:
            with ray_session(config.ray_address, config.out):
                device, gpus = worker_device(config.device)
                factory = EncoderFactory(dataclasses.replace(config, device=device))
                _run(RayExecutor(factory, num_workers=config.num_workers, gpus_per_worker=gpus), tasks, config,
                     progress)
        else:
            encoder.store = store
            _run(LocalExecutor(lambda: encoder), tasks, config, progress)
        if by_tar_file(source, config):
            drop_duplicates_across_shards(store, planned["records"])
        return finish(store, manifest, planned, skipped=sum(len(d) for d in done.values()),
                      min_size=config.min_short_side)


def plan(config: EncodeConfig, source: Iterable[SourceItem],
         prompts: Iterable[SourceItem] | None) -> Iterator[ShardTask]:
    """Shard tasks in order: driver-side checks (captions, ids, missing images) need no image decoding; a tar
    file is a task of its own, which its worker reads and checks."""
    if by_tar_file(source, config):
        yield from (ShardTask("records", index, [], tar=file) for index, file in enumerate(source.shards))
    else:
        yield from _plan_group("records", source, config)
    if prompts is not None:
        yield from _plan_group("prompts", prompts, config)


def _plan_group(group: str, items: Iterable[SourceItem], config: EncodeConfig) -> Iterator[ShardTask]:
    seen: set[str] = set()  # the one structure that grows with the dataset: ~100 bytes per record id
    task = ShardTask(group, 0, [])
    for item in items:
        if config.limit is not None and group == "records" and item.position >= config.limit:
            break
        index = item.position // config.shard_size
        if index != task.index:
            if task.size:
                yield task
            task = ShardTask(group, index, [])
        task.size += 1
        reason = _driver_reject(item, seen) if group == "records" else _caption_reject(item)
        if reason:
            entry = reject_entry(group, item, reason)
            if config.strict:
                raise SDiTError(f"--strict: {describe_reject(entry)}")
            task.rejects.append(entry)
        else:
            task.items.append(item)
    if task.size:
        yield task


def by_tar_file(source, config: EncodeConfig) -> bool:
    """Whether shard k is tar file k: a webdataset source without --limit (which counts items in order)."""
    return isinstance(source, TarSource) and config.limit is None


def _driver_reject(item: SourceItem, seen: set[str]) -> str | None:
    if item.data is None and item.path is None and item.image_at is None:
        return "missing_image"
    if reason := _caption_reject(item):
        return reason
    if item.id in seen:
        return "duplicate_id"
    seen.add(item.id)
    return None


def _caption_reject(item: SourceItem) -> str | None:
    if item.caption is None:
        return "missing_caption"
    if not item.caption.strip():
        return "empty_caption"
    if "\ufffd" in item.caption:  # sources decode bytes with errors="replace": the bytes were not UTF-8
        return "caption_not_utf8"
    return None


def _pending(tasks: Iterable[ShardTask], done: dict[str, dict], planned: dict[str, set[int]],
             progress: Progress) -> Iterator[ShardTask]:
    """The tasks not finished yet; `planned` collects every task's shard, finished or not."""
    for task in tasks:
        planned[task.group].add(task.index)
        if task.index in done[task.group]:
            progress(done[task.group][task.index].get("size", task.size))
            continue
        yield task


def _run(executor, tasks: Iterable[ShardTask], config: EncodeConfig, progress: Progress) -> None:
    for result in executor.map(tasks):
        if config.strict and result["rejects"]:
            raise SDiTError(f"--strict: {describe_reject(result['rejects'][0])}")
        progress(result["size"])


def drop_duplicates_across_shards(store: Store, shards: Iterable[int]) -> None:
    """Each id once: a record whose id an earlier shard holds leaves its shard, rewritten whole without it, and
    becomes a duplicate_id reject. Its completion record goes first, so a kill mid-rewrite leaves the shard to be
    encoded again and checked again."""
    seen: set[str] = set()
    for index, ids in _shard_ids(store, sorted(shards)):
        keep = np.ones(len(ids), bool)
        for row, record_id in enumerate(map(str, ids)):
            keep[row] = record_id not in seen
            seen.add(record_id)
        if keep.all():
            continue
        record = store.read_json("_done", "records", f"{shard_name(index)}.json")
        columns = store.read("records", index, tuple(RECORD_COLUMNS))
        positions = columns["positions"]
        dropped = [reject_entry("records", SourceItem(int(positions[row]), str(ids[row]), None), "duplicate_id",
                                "an earlier tar file holds this id") for row in np.flatnonzero(~keep)]
        store.remove("_done", "records", f"{shard_name(index)}.json")
        write_shard(store, "records", index, {name: values[keep] for name, values in columns.items()},
                    {"rejects": sorted(record["rejects"] + dropped, key=lambda r: r["position"]),
                     "truncated": record["truncated"], "size": record["size"]})


def _shard_ids(store: Store, shards: list[int], at_once: int = 256) -> Iterator[tuple[int, np.ndarray]]:
    """(shard, its ids) in order, `at_once` shards read at a time (on object storage each read is a request)."""
    for k in range(0, len(shards), at_once):
        part = shards[k:k + at_once]
        yield from zip(part, (r["ids"] for r in store.concurrently(
            [functools.partial(store.read, "records", index, ("ids",)) for index in part])))


def finish(store: Store, manifest: Manifest, planned: dict[str, set[int]], skipped: int,
           min_size: int) -> EncodeSummary:
    """Count what the shards hold and mark the store complete. The store stays unfinished, refused in one line,
    when a planned shard is not there as the driver sees it (the workers wrote where the driver cannot read), and
    when it holds no records (the line tallies why every item was rejected)."""
    records, prompts = (store.all_finished(group, planned[group]) for group in ("records", "prompts"))
    rejects = [r for d in (records, prompts) for index in sorted(d) for r in d[index]["rejects"]]  # source order
    store.write_lines(iter(rejects), "rejects.jsonl")
    counts = {
        "records": sum(r["count"] for r in records.values()),
        "rejects": sum(1 for r in rejects if r["group"] == "records"),
        "truncated": sum(r["truncated"] for r in records.values()),
        "shards": len(records),
        "prompts": sum(r["count"] for r in prompts.values()),
        "prompt_rejects": sum(1 for r in rejects if r["group"] == "prompts"),
        "prompts_truncated": sum(r["truncated"] for r in prompts.values()),
        "reject_reasons": _tally(r["reason"] for r in rejects if r["group"] == "records"),
    }
    if not counts["records"]:
        store.write_manifest(dataclasses.replace(manifest, counts=counts))
        raise SDiTError(nothing_encoded(counts["rejects"], counts["reject_reasons"], min_size, store.url))
    store.write_manifest(dataclasses.replace(manifest, counts=counts, status="complete"))
    return EncodeSummary(store.url, counts["records"], counts["rejects"], counts["truncated"], counts["prompts"],
                         counts["shards"], skipped)


# --- the store's set-up -------------------------------------------------------------------------------
def check_out(store: Store) -> None:
    """--out must be a store, or a folder that is new or empty: anything else is refused (`--overwrite` or not)
    before any work, so that files which are not a store's are never written into, nor deleted."""
    if store.local:
        check_folder(store.root)
    if store.exists(MANIFEST):
        return
    others = [name for name in store.children() if not name.startswith((WRITER_LOCK, MANIFEST))]
    if others:
        listed = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise SDiTError(f"--out {store.url} holds files but no SDiT store ({listed}); give a new or empty folder")


def latent_shape(teacher: Teacher, resolution: int) -> tuple[int, int, int]:
    factor = vae_scale_factor(teacher.vae.config.block_out_channels)
    return (teacher.vae.config.latent_channels, resolution // factor, resolution // factor)


def text_shape(teacher: Teacher) -> tuple[int, int]:
    return (teacher.tokenizer.model_max_length, teacher.text_encoder.config.hidden_size)


def new_manifest(config: EncodeConfig, encoder: ShardEncoder, source_format: str) -> Manifest:
    teacher = encoder.teacher
    source = {"location": config.source, "format": source_format, "image_column": config.image_column,
              "caption_column": config.caption_column, "id_column": config.id_column,
              "caption_key": config.caption_key, "limit": config.limit, "min_size": config.min_short_side}
    return Manifest(
        source=source, teacher=teacher.identity.to_json() | {"scheduler": teacher.scheduler_config},
        resolution=config.resolution, latent_scale=teacher.vae.config.scaling_factor,
        latent_shape=latent_shape(teacher, config.resolution),
        text_shape=text_shape(teacher), shard_size=config.shard_size,
        prompts={"location": config.prompts, "column": config.prompt_column} if config.prompts else None,
        sdit_version=sdit.__version__)


# What must match for a rerun to resume a store rather than refuse it.
_RESUME_KEYS = ("resolution", "shard_size", "source", "latent_shape", "text_shape", "prompts")


def prepare_store(store: Store, manifest: Manifest, overwrite: bool) -> Manifest:
    """Check a rerun against the existing manifest (or wipe it with `overwrite`), create the groups,
    delete unfinished shards, and write the manifest with status "in_progress"."""
    if overwrite:
        # Labels describe the old records: they go too.
        for name in ("records", "prompts", "labels", "_done", "null_text_emb", "rejects.jsonl", "manifest.json",
                     "zarr.json"):
            store.remove(name)
    elif store.exists("manifest.json"):
        old = store.manifest()
        for key in _RESUME_KEYS:
            if _normal(getattr(old, key)) != _normal(getattr(manifest, key)):
                raise SDiTError(f"{store.url} was encoded with another {key} "
                                f"({_difference(getattr(old, key), getattr(manifest, key))}); "
                                "pass --overwrite to start again, or choose another --out")
        for part in ("vae", "text_encoder"):
            if old.teacher["hashes"].get(part) != manifest.teacher["hashes"].get(part):
                raise SDiTError(f"{store.url} was encoded with another teacher {part}; "
                                "pass --overwrite to start again, or choose another --out")
        manifest = dataclasses.replace(manifest, created=old.created)
    store.write_manifest(manifest)  # first: a kill from here on leaves a store that a rerun resumes
    root = store.root_group(mode="a")
    root.require_group("records")
    root.require_group("prompts")
    store.remove_unfinished("records")
    store.remove_unfinished("prompts")
    return manifest


def _write_null_embedding(store: Store, encoder: ShardEncoder) -> None:
    emb, _, _ = encoder.encode_text([""])
    root = store.root_group(mode="a")
    arr = root.require_array("null_text_emb", shape=emb.shape[1:], dtype="float16", compressors=None)
    arr[:] = emb[0]


def _total(source, prompts: PromptSource | None, limit: int | None) -> int | None:
    """Source items to process, for the progress bar's ETA; None where counting would mean reading it all."""
    count = getattr(source, "num_items", None)
    n = count() if callable(count) else None
    if n is None:
        return None
    if limit is not None:
        n = min(n, limit)
    return n + (prompts.num_items() if prompts else 0)


def reject_entry(group: str, item: SourceItem, reason: str, detail: str = "") -> dict:
    return {"group": group, "id": item.id, "position": item.position, "reason": reason, "detail": detail}


# How a reject reason reads in "all 16 images rejected: 11 smaller than --min-size 128, ...".
_REASONS = {"too_small": "smaller than --min-size {min_size}", "unreadable_image": "unreadable",
            "missing_image": "without an image", "missing_caption": "without a caption",
            "empty_caption": "with an empty caption", "caption_not_utf8": "with a caption that is not UTF-8",
            "duplicate_id": "with a duplicate id"}


def nothing_encoded(rejected: int, reasons: dict[str, int], min_size: int, url: str) -> str:
    """Why a store got no records, in one line: the rejects counted by reason, the most common first."""
    if not rejected:
        return "no source items to encode (the source is empty, or --limit is 0)"
    tally = ", ".join(f"{n} {_REASONS.get(reason, reason).format(min_size=min_size)}"
                      for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
    return f"all {rejected} images rejected: {tally} (each one in {url}/rejects.jsonl)"


def describe_reject(entry: dict) -> str:
    detail = f": {entry['detail']}" if entry.get("detail") else ""
    return f"{entry['group']} item {entry['id']!r} (position {entry['position']}) rejected: {entry['reason']}{detail}"


def _difference(old, new) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        return ", ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in sorted(old.keys() | new.keys())
                         if _normal(old.get(k)) != _normal(new.get(k)))
    return f"{old!r} then, {new!r} now"


def _normal(value):
    """A manifest field as a rerun compares it: tuples as lists, a location however it is written (a relative path
    or a symlink leading to the same folder is the same source)."""
    if isinstance(value, dict) and isinstance(value.get("location"), str):
        return value | {"location": location(value["location"])}
    return list(value) if isinstance(value, tuple) else value


def _tally(values: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))
