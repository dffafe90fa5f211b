"""Teacher labels in a store: their manifest, and rebuilding the teacher's inputs (the one path stage one and
stage two share).

`LabelsManifest` is `labels/<name>/manifest.json`: what made the labels (teacher, scheduler, seed, draws,
perturbations, guidance, synthesis) and what they hold; `read_labels` is its one reader, and refuses another
schema version in one line. `teacher_inputs` turns a records shard's latents and embeddings plus its label
arrays into the noisy latents, text embeddings and timesteps the teacher saw. Stage one calls it right before
the teacher's forward; stage two calls it before the student's, so the student sees exactly what the teacher
saw (invariant 1).
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import zarr

from sdit.config import labels_group
from sdit.diffusion import NoiseSchedule, noisy_latents
from sdit.perturb import CaptionFrom, Kind, input_noise, perturbed_text
from sdit.store import CHECKSUM, Damaged, Store, from_versioned

LABELS_MANIFEST = "manifest.json"
# 2: labels with fresh guidance, whose eps_teacher is ε_c and no target by itself (an SDiT that reads only 1 must
# refuse them); other labels are still written as 1, which every SDiT since reads
LABELS_VERSION = 2
LABELS_INDEX = "index"  # labels/<name>/index: what a reader needs before its first read (`write_index`)


@dataclass(frozen=True)
class LabelsManifest:
    """labels/<name>/manifest.json."""

    name: str
    teacher: dict  # TeacherIdentity.to_json(), with the UNet's hash
    scheduler: dict  # the teacher's scheduler config: the noise schedule of every draw
    prediction_type: str
    seed: int
    draws: int  # K per record
    timesteps: str  # "uniform" | "stratified"
    perturb: dict  # PerturbConfig as a dict
    guidance: list[float] | None = None  # [w_min, w_max] of guided targets; None: unguided
    guidance_conditional: float = 0.0  # share of guided draws at w = 1 (the conditional ε)
    # eps_teacher holds ε_c and eps_uncond ε_u: a reader composes the guided target at a w of its own (training: a
    # fresh one each time it reads a draw; evaluation: the draw's `guidance`)
    guidance_fresh: bool = False
    synthesis: dict | None = None  # SynthesisConfig as a dict, when synthetic records are labelled too
    synthetic_set: str | None = None  # set_id of the synthetic records they label
    status: str = "in_progress"  # "complete" once every shard is labelled
    counts: dict = field(default_factory=dict)  # draws, kinds, dropped, teacher_forwards, ...
    schema_version: int = LABELS_VERSION

    @property
    def guided(self) -> bool:
        """Targets are ε_u + w(ε_c − ε_u): the true noise is no target, and the student takes w."""
        return self.guidance is not None

    @property
    def group(self) -> str:
        return labels_group(self.name)

    def to_json(self) -> dict:
        return asdict(self)


def read_labels(store: Store, name: str) -> LabelsManifest | None:
    """The manifest of labels `name`, or None when the store has none of that name."""
    if not store.exists(labels_group(name), LABELS_MANIFEST):
        return None
    data = store.read_json(labels_group(name), LABELS_MANIFEST)
    return from_versioned(LabelsManifest, data, LABELS_VERSION, f"labels {name!r} of {store.url}: labels manifest",
                          older=(1,))


def guidance_scale(gen: np.random.Generator, window: tuple[float, float], conditional: float = 0.0) -> float:
    """A guided draw's w: 1 (the conditional ε) for a share `conditional` of draws, else uniform in `window`."""
    if conditional and gen.random() < conditional:
        return 1.0
    return gen.uniform(*window)


def write_labels(store: Store, manifest: LabelsManifest) -> None:
    store.write_json(manifest.to_json(), manifest.group, LABELS_MANIFEST)


@dataclass(frozen=True)
class ShardIndex:
    """The finished shards of one group: their numbers and record counts, and (for labels) each record's valid
    draws, all shards' records in a row."""

    shards: np.ndarray  # (S,) int
    counts: np.ndarray  # (S,) int
    valid: np.ndarray | None = None  # (Σ counts,) int: draws of each record whose teacher output is finite

    def as_dict(self) -> dict[int, int]:
        return dict(zip(self.shards.tolist(), self.counts.tolist()))

    def valid_by_shard(self) -> dict[int, np.ndarray]:
        starts = np.concatenate([[0], np.cumsum(self.counts)])
        return {int(k): self.valid[starts[i]:starts[i + 1]] for i, k in enumerate(self.shards)}


def write_index(store: Store, name: str, done: dict[str, dict[int, dict]], draws: int) -> None:
    """labels/<name>/index, written when labelling finishes: for each labelled group ("records", "synthetic") its
    shards, record counts and each record's valid draws (from the completion records' `invalid_rows`), and the
    prompt bank's shards and counts. A reader then starts from one small group instead of every shard's completion
    record and `valid` array (a few ms each: minutes at 100k shards). Labels whose completion records predate
    `invalid_rows` get no index; readers fall back to reading the shards."""
    if any("invalid_rows" not in r for records in done.values() for r in records.values()):
        return
    path = f"{labels_group(name)}/{LABELS_INDEX}"
    store.remove(path)
    group = store.root_group(mode="a").require_group(path)
    columns = {}
    for kind, records in done.items():
        columns[f"{kind}_shard"] = np.array(list(records), np.int64)
        columns[f"{kind}_count"] = np.array([r["count"] for r in records.values()], np.int64)
        valid = [np.full(r["count"], draws, np.int32) for r in records.values()]
        for v, r in zip(valid, records.values()):
            for row, invalid in r["invalid_rows"].items():
                v[int(row)] -= invalid
        columns[f"{kind}_valid"] = np.concatenate(valid) if valid else np.zeros(0, np.int32)
    prompts = store.finished("prompts")
    columns |= {"prompts_shard": np.array(list(prompts), np.int64),
                "prompts_count": np.array([r["count"] for r in prompts.values()], np.int64)}
    for key, values in columns.items():
        group.create_array(key, shape=values.shape, dtype=values.dtype, chunks=(max(1, len(values)),),
                           compressors=CHECKSUM, fill_value=0)[:] = values


def read_index(store: Store, name: str) -> dict[str, ShardIndex] | None:
    """The index of labels `name` by group ("records", "synthetic", "prompts"), or None when they have none."""
    path = f"{labels_group(name)}/{LABELS_INDEX}"
    if not store.exists(path, "zarr.json"):
        return None
    with store.parsing(f"{path}/zarr.json"):
        group = zarr.open_group(store.zarr_reader(), path=path, mode="r", zarr_format=3)
        try:
            arrays = {key: array[:] for key, array in group.arrays()}
        except ValueError as err:
            if "checksum" not in str(err):
                raise
            raise Damaged(store.url, path, "a chunk fails its checksum") from None
    return {kind: ShardIndex(arrays[f"{kind}_shard"], arrays[f"{kind}_count"], arrays.get(f"{kind}_valid"))
            for kind in ("records", "synthetic", "prompts") if f"{kind}_shard" in arrays}


# Caption rows a read of the bank takes: each row is a chunk of its own, read one after another within a read (zarr
# 3.1 reads a shard's chunks in turn), so reads of a few rows in flight at once overlap their requests.
READ_ROWS = 8


class CaptionBank:
    """Text embeddings of any record or prompt, by (CaptionFrom, index): read by the row (stores chunk `text_emb`
    by the row), the last `cache_bytes` of them kept (1,138 rows at SD 1.5's 77x768; a small store's whole bank).
    `fetches` and `bytes_read` say what the reads cost."""

    def __init__(self, store: Store, cache_bytes: int = 128 << 20, counts: dict[str, dict[int, int]] | None = None):
        """`counts`: records per finished shard of "records" and "prompts", when known (a labels index); else
        read from the completion records."""
        self.store, self.cache_bytes, self.cached_bytes = store, cache_bytes, 0
        self.cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.arrays: dict[tuple, object] = {}  # (group, shard): its text_emb array, opened once
        counts = counts or {group: {k: r["count"] for k, r in store.finished(group).items()}
                            for group in ("records", "prompts")}
        self.offsets = {group: self._offsets(counts[group]) for group in ("records", "prompts")}
        self.fetches = self.bytes_read = 0
        self.lock = threading.Lock()  # a prefetching reader and an evaluation may share the bank

    @staticmethod
    def _offsets(counts: dict[int, int]) -> tuple[list[int], list[int]]:
        shards = sorted(counts)
        return shards, np.concatenate([[0], np.cumsum([counts[k] for k in shards], dtype=np.int64)]).tolist()

    def size(self, group: str) -> int:
        return self.offsets[group][1][-1]

    def _key(self, source: int, index: int) -> tuple[str, int, int]:
        """(group, shard, row) of caption `index` of `source`."""
        group = "records" if source == CaptionFrom.RECORD else "prompts"
        shards, starts = self.offsets[group]
        if not 0 <= index < starts[-1]:
            raise IndexError(f"{group} caption {index} out of range (0..{starts[-1] - 1})")
        k = int(np.searchsorted(starts, index, side="right")) - 1
        return group, shards[k], index - starts[k]

    def get(self, source: int, index: int) -> np.ndarray:
        key = self._key(source, index)
        with self.lock:
            if key not in self.cache:
                self._read(key[0], key[1], [key[2]])
            self.cache.move_to_end(key)
            return self.cache[key]

    def fetch(self, captions: list[tuple[int, int]]) -> None:
        """Read the embeddings of `captions` ((source, index) pairs) not cached yet: one read a shard on a local
        filesystem (each read is a call into zarr's event loop); on object storage, where each row is a request,
        READ_ROWS rows a read and the reads at once (`Store.concurrently`)."""
        wanted: dict[tuple[str, int], set[int]] = {}
        with self.lock:
            for source, index in captions:
                group, shard, row = self._key(source, index)
                if (group, shard, row) not in self.cache:
                    wanted.setdefault((group, shard), set()).add(row)
            reads = []
            for (group, shard), rows in wanted.items():
                rows = sorted(rows)
                step = len(rows) if self.store.local else READ_ROWS  # a local read costs a call, not a request
                reads += [(group, shard, rows[i:i + step]) for i in range(0, len(rows), step)]
            before = self.store.bytes_read
            values = self.store.concurrently([functools.partial(self._rows, *read) for read in reads])
            self.bytes_read += self.store.bytes_read - before
            for (group, shard, rows), rows_values in zip(reads, values):
                self._keep(group, shard, rows, rows_values)

    def _rows(self, group: str, shard: int, rows: list[int]) -> np.ndarray:
        with self.store.checked(group, shard, f"text_emb rows {rows[0]}..{rows[-1]}"):
            if (group, shard) not in self.arrays:
                self.arrays[group, shard] = self.store.shard_group(group, shard)["text_emb"]
            return self.arrays[group, shard].get_orthogonal_selection(np.array(rows))

    def _read(self, group: str, shard: int, rows: list[int]) -> None:
        before = self.store.bytes_read
        values = self._rows(group, shard, rows)
        self.bytes_read += self.store.bytes_read - before
        self._keep(group, shard, rows, values)

    def _keep(self, group: str, shard: int, rows: list[int], values: np.ndarray) -> None:
        """Rows of one shard into the cache (the oldest beyond `cache_bytes` leave it)."""
        self.fetches += len(rows)
        for row, value in zip(rows, values):
            self.cache[group, shard, row] = value
            self.cached_bytes += value.nbytes
        while self.cached_bytes > self.cache_bytes and len(self.cache) > 1:
            self.cached_bytes -= self.cache.popitem(last=False)[1].nbytes


@dataclass(frozen=True)
class TeacherInputs:
    x_t: torch.Tensor  # (B, C, h, w) float32
    text: torch.Tensor  # (B, L, D) float16
    timesteps: torch.Tensor  # (B,) long


def teacher_inputs(schedule: NoiseSchedule, latents: np.ndarray, text_emb: np.ndarray, labels: dict,
                   rows: np.ndarray, draws: np.ndarray, bank: CaptionBank, null: np.ndarray,
                   input_gamma: float) -> TeacherInputs:
    """Inputs for the draws (rows[i], draws[i]) of one shard.

    latents (n, C, h, w) and text_emb (n, L, D): the records shard; labels: its label arrays ((n, K, ...)
    plus the `xi` side table); rows, draws: (B,) which draws to rebuild.
    """
    kinds = labels["kind"][rows, draws]
    noise = labels["noise"][rows, draws]  # (B, C, h, w) fp16
    is_input = kinds == Kind.INPUT
    if is_input.any():
        noise = noise.copy()
        xi = labels["xi"][labels["xi_index"][rows[is_input], draws[is_input]]]
        noise[is_input] = input_noise(noise[is_input], xi, input_gamma).numpy()
    t = torch.as_tensor(labels["timesteps"][rows, draws], dtype=torch.long)
    x_t = noisy_latents(schedule, latents[rows], noise, t)
    refs = [_caption_refs(labels, r, d, int(kind)) for kind, r, d in zip(kinds, rows, draws)]
    bank.fetch([ref for draw in refs for ref in draw])  # one read a shard for the whole batch
    text = torch.stack([
        perturbed_text(int(kind), text_emb[r], *_captions(bank, ref), float(labels["weight"][r, d]), null)
        for kind, r, d, ref in zip(kinds, rows, draws, refs)])
    return TeacherInputs(x_t, text, t)


def _caption_refs(labels: dict, r: int, d: int, kind: int) -> list[tuple[int, int]]:
    """(CaptionFrom, index) of each caption draw (r, d) takes: a for a swap, a and b for a mix, none otherwise."""
    takes = {Kind.SWAP: 1, Kind.MIX: 2}.get(kind, 0)
    return [(int(labels["caption_from"][r, d, i]), int(labels["caption_index"][r, d, i])) for i in range(takes)]


def _captions(bank: CaptionBank, refs: list[tuple[int, int]]) -> tuple:
    """Captions a and b of a draw (None where it takes none)."""
    a, b = [bank.get(*ref) for ref in refs] + [None] * (2 - len(refs))
    return a, b
