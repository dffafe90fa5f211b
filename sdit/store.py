"""The SDiT store: Zarr v3 groups of shards, a versioned manifest, and completion records.

Layout (a local folder or an fsspec URL):

    manifest.json                   what the store is (see `Manifest`); rewritten when a stage finishes
    zarr.json                       the root Zarr group
    null_text_emb   (77, D) f16     the empty caption's embedding, for classifier-free guidance
    records/NNNNN/                  one Zarr group per shard of image-caption records
        latents     (n, C, h, w) f16   VAE posterior mean x scaling factor
        text_emb    (n, 77, D) f16     CLIP last hidden state
        token_count (n,) int16         real tokens incl. start and end (the end token's index + 1)
        ids, captions (n,) str
        positions   (n,) int64         each record's position in the source stream
    prompts/NNNNN/                  text-only prompt bank shards: text_emb, token_count, captions, positions
    synthetic/NNNNN/                the teacher's samples for the prompt bank (sdit.synthesize): the records'
                                    columns plus prompt_index and sample; synthetic/manifest.json: provenance
    _done/{records,prompts,synthetic}/NNNNN.json   completion records: a shard is finished iff its record exists
    rejects.jsonl                   one line per skipped input: id, position, reason, detail

Bytes a `Store` reads through Zarr are counted (`Store.bytes_read`): the benchmarks report them per draw.

Every shard is written whole by one writer (arrays first, completion record last), so a crash leaves at
most unfinished shards, which a rerun deletes and redoes. Readers trust only shards with a record.

Every chunk of every array carries a CRC32C checksum (Zarr v3's `crc32c` codec; the shard index has one too),
so a flipped bit is found when the chunk is read: readers go through `Store.checked`, which turns it into a
one-line error naming the shard, and `sdit verify` reads every chunk of a store. JSON (manifests, completion
records, Zarr metadata) that does not parse raises `Damaged`, one line naming the file.
"""

import contextlib
import functools
import json
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import PurePath, PurePosixPath
from typing import TypeVar

import fsspec
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.abc.store import SuffixByteRequest
from zarr.codecs import Crc32cCodec
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from sdit.errors import SDiTError

SCHEMA_VERSION = 2  # 2: every chunk carries a CRC32C checksum
MANIFEST = "manifest.json"
WRITER_LOCK = "writer.lock"  # who is writing the store: {"pid", "host", "stage", "since"}
STORAGE_DTYPE = np.float16  # latents and embeddings: fp16 barely compresses, so no compressor is used
# Records per Zarr chunk inside a shard: the unit a reader decodes (zarr pays ~0.4 ms per chunk).
CHUNK_RECORDS = 64
CHECKSUM = (Crc32cCodec(),)  # every chunk's bytes-to-bytes codecs: a checksum, no compression


class OtherVersion(SDiTError):
    """A record written with another schema version than this SDiT reads: not damage, but not readable here."""


class Damaged(SDiTError):
    """A file of a store that does not read (cut short, or bytes changed on disk): `name` says which, relative to
    the store, and `reason` what is wrong; `sdit verify` reports it as a problem of the store."""

    def __init__(self, url: str, name: str, reason: str):
        self.name, self.reason = name, reason
        super().__init__(f"{url}: {name} is damaged ({reason}); `sdit verify {url}` lists every damaged part")


def json_problem(err: ValueError) -> str:
    """What is wrong with bytes that do not parse as JSON, in a few words."""
    if isinstance(err, UnicodeDecodeError):
        return "not JSON: bytes that are not UTF-8 text"
    if isinstance(err, json.JSONDecodeError):
        return f"not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})"
    return f"not valid JSON: {err}"


@dataclass(frozen=True)
class Column:
    dtype: str  # numpy dtype name, or "str"
    per_record_shape: tuple[str, ...]  # symbolic, filled from the manifest (e.g. ("C", "h", "w"))
    per_record: bool = True  # False: a side table with its own row count (indexed from a per-record column)
    optional: bool = False  # only some shards of its group have it (say which in the column's comment)
    chunk: int = CHUNK_RECORDS  # rows per Zarr chunk: the least a read of one row costs


# Text embeddings are chunked by the row: a caption swap reads one other record's or prompt's embedding (118 KB at
# SD 1.5's 77x768), never its 63 neighbours. A block read of 64 rows costs about 3x a single-chunk read (zarr reads
# the rows' chunks one by one), a few ms a block.
TEXT_CHUNK = 1


RECORD_COLUMNS = {
    "latents": Column("float16", ("C", "h", "w")),
    "text_emb": Column("float16", ("L", "D"), chunk=TEXT_CHUNK),
    "token_count": Column("int16", ()),
    "ids": Column("str", ()),
    "captions": Column("str", ()),
    "positions": Column("int64", ()),
}
PROMPT_COLUMNS = {name: RECORD_COLUMNS[name] for name in ("text_emb", "token_count", "captions", "positions")}
# Synthetic records: a teacher sample (latents) for a prompt of the bank (text_emb, token_count, captions); positions
# number them prompt_index * samples + sample.
SYNTHETIC_COLUMNS = RECORD_COLUMNS | {"prompt_index": Column("int64", ()), "sample": Column("int32", ()),
                                     # trajectory sets only: the K states of each sample, as ε with x̂_0 as latents
                                     "states": Column("float16", ("K", "C", "h", "w"), optional=True)}
# Teacher labels: K draws per record, in `labels/<name>/NNNNN`, one label shard per records shard (and in
# `labels/<name>/synthetic/NNNNN`, one per synthetic shard).
LABEL_COLUMNS = {
    "timesteps": Column("int32", ("K",)),
    "kind": Column("uint8", ("K",)),  # sdit.perturb.Kind
    "caption_from": Column("uint8", ("K", 2)),  # sdit.perturb.CaptionFrom of captions a and b
    "caption_index": Column("int64", ("K", 2)),
    "weight": Column("float32", ("K",)),  # mix weight of caption b
    "guidance": Column("float32", ("K",)),  # w of a guidance target; 0 without guidance
    "noise": Column("float16", ("K", "C", "h", "w")),  # ε: the true-noise target
    "xi_index": Column("int32", ("K",)),  # row of `xi` for input-perturbation draws, -1 elsewhere
    "xi": Column("float16", ("C", "h", "w"), per_record=False),
    "eps_teacher": Column("float16", ("K", "C", "h", "w")),  # ε_T; with fresh guidance the conditional ε_c
    # labels made with fresh guidance only (every shard of them): the unconditional ε_u, so that a reader composes
    # ε_u + w(ε_c − ε_u) at a w of its own
    "eps_uncond": Column("float16", ("K", "C", "h", "w"), optional=True),
    "valid": Column("bool", ("K",)),  # False: the teacher's output was not finite; the draw is dropped
}
GROUP_COLUMNS = {"records": RECORD_COLUMNS, "prompts": PROMPT_COLUMNS, "synthetic": SYNTHETIC_COLUMNS}


def columns_of(group: str) -> dict[str, Column]:
    return LABEL_COLUMNS if group.startswith("labels/") else GROUP_COLUMNS[group]


@dataclass(frozen=True)
class Manifest:
    """What a store is: enough to refuse a store a stage does not understand, in one line."""

    source: dict  # location, format, column options
    teacher: dict  # TeacherIdentity.to_json()
    resolution: int
    latent_scale: float
    latent_shape: tuple[int, int, int]  # (C, h, w)
    text_shape: tuple[int, int]  # (77, D)
    shard_size: int  # source items per shard; shard k holds items [k*shard_size, (k+1)*shard_size)
    latent_kind: str = "posterior_mean"
    text_layer: str = "last_hidden_state"
    dtypes: dict = field(default_factory=lambda: {"latents": "float16", "text_emb": "float16"})
    counts: dict = field(default_factory=dict)  # records, rejects, truncated, shards, prompts
    prompts: dict | None = None  # location of the prompt bank, when there is one
    status: str = "in_progress"  # "complete" once every shard is finished
    schema_version: int = SCHEMA_VERSION
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    sdit_version: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, where: str = "") -> "Manifest":
        if data.get("schema_version") == 1:
            raise OtherVersion(f"{where}: store schema version 1 (written before chunks carried checksums), this "
                               f"SDiT reads version {SCHEMA_VERSION}; encode it again with "
                               "`sdit encode ... --overwrite`")
        manifest = from_versioned(cls, data, SCHEMA_VERSION, f"{where}: store schema")
        return replace(manifest, latent_shape=tuple(manifest.latent_shape), text_shape=tuple(manifest.text_shape))


def from_versioned(cls, data: dict, version: int, what: str, older: tuple[int, ...] = ()):
    """A stage-owned JSON record as the frozen dataclass `cls`, refused in one line when it was written with
    another `schema_version` than this SDiT reads (`version`, or one of the `older` ones it still reads), or lacks
    a field (`what` names it: "STORE: store schema")."""
    found = data.get("schema_version")
    if found != version and found not in older:
        raise OtherVersion(f"{what} version {found}, this SDiT reads version {version}")
    missing = [f.name for f in fields(cls)
               if f.default is MISSING and f.default_factory is MISSING and f.name not in data]
    if missing:
        raise SDiTError(f"{what} version {version}: the file lacks {', '.join(missing)} (damaged or edited)")
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


def resume_value(record, key: str):
    """Field `key` of a stage-owned record (labels, synthetic records) as a rerun compares it to resume: of the
    teacher, its weights' hashes alone, so that the same weights resume wherever their files sit and in either
    layout."""
    return record.teacher["hashes"] if key == "teacher" else getattr(record, key)


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec's filesystem and path for a local path or URL; a URL whose filesystem package is not installed
    (s3fs for s3://, gcsfs for gs://) is refused in one line."""
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as err:
        raise SDiTError(f"{url}: {err} (`pip install 'sdit[s3]'` for s3://, 'sdit[gcs]' for gs://)") from None


def shard_name(index: int) -> str:
    return f"{index:05d}"


# Reads in flight at once (`concurrently`): each read of a few rows is a request or two on object storage, which
# waits on the network, not the CPU.
READ_THREADS = 16
T = TypeVar("T")


@functools.cache
def _readers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="sdit-read")


def concurrently(reads: list[Callable[[], T]]) -> list[T]:
    """The results of `reads`, in order, run on the reader threads (zarr's reads release the GIL while they wait).
    Not to be called from a read itself: the threads would wait on each other."""
    if len(reads) <= 1:
        return [read() for read in reads]
    return list(_readers().map(lambda read: read(), reads))


class Store:
    """A store at a local path or fsspec URL: its manifest, its finished shards, and side files."""

    def __init__(self, url: str):
        self.url = str(url).rstrip("/")
        self.fs, self.root = filesystem(self.url)
        self.local = isinstance(self.fs, LocalFileSystem)
        self._reads = [0]  # bytes read through Zarr, shared with the reader below
        self._reader: "Reader | None" = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reader": None}  # a Zarr store holds an event loop's state: made anew where used

    @property
    def bytes_read(self) -> int:
        """Bytes this object has read through Zarr (chunks, shard indexes, zarr.json), since it was made."""
        return self._reads[0]

    def zarr_reader(self) -> "Reader":
        """The store read-only as Zarr sees it, counting the bytes it reads (see `Reader`)."""
        if self._reader is None:
            base = LocalStore(self.root, read_only=True) if self.local \
                else FsspecStore.from_url(self.url, read_only=True)
            self._reader = Reader(base, self._reads)
        return self._reader

    # --- side files -------------------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return str(PurePosixPath(self.root, *parts))

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self._path(*parts))

    def read_json(self, *parts: str) -> dict:
        """A JSON object the stages wrote; one that does not parse raises `Damaged`."""
        try:
            data = json.loads(self.fs.cat_file(self._path(*parts)))
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
            raise Damaged(self.url, "/".join(parts), json_problem(err)) from None
        if not isinstance(data, dict):
            raise Damaged(self.url, "/".join(parts), f"a JSON {type(data).__name__}, not an object")
        return data

    def write_json(self, obj: dict, *parts: str) -> None:
        """Atomic: a reader sees the old file or the new one, never half of one."""
        data = json.dumps(obj, indent=1, default=_json_default).encode()
        path = self._path(*parts)
        self.fs.makedirs(str(PurePosixPath(path).parent), exist_ok=True)
        if self.local:
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:  # one PUT is atomic on object stores
            self.fs.pipe_file(path, data)

    def write_lines(self, lines: Iterator[dict], *parts: str) -> None:
        path = self._path(*parts)
        with self.fs.open(path + ".tmp", "w") as f:
            for line in lines:
                f.write(json.dumps(line, default=_json_default) + "\n")
        self.fs.mv(path + ".tmp", path)

    def children(self, *parts: str) -> list[str]:
        """Names inside the folder `parts` (none when it does not exist), sorted."""
        path = self._path(*parts)
        if not self.fs.exists(path):
            return []
        return sorted(PurePosixPath(p).name for p in self.fs.ls(path, detail=False))

    def remove(self, *parts: str) -> None:
        if self.exists(*parts):
            self.fs.rm(self._path(*parts), recursive=True)

    @contextmanager
    def writer(self, stage: str):
        """Hold the store's writer lock for the block: a second stage writing the same store (another `sdit
        encode` or `sdit teacher-label`) is refused in one line naming the process that holds it. A lock left by
        a killed process (its pid gone on this host) is taken over. Local stores only: object stores have no
        atomic create, so on them one writer at a time is the user's to keep."""
        if not self.local:
            yield
            return
        os.makedirs(self.root, exist_ok=True)
        path = self._path(WRITER_LOCK)
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        # The lock appears whole or not at all: written aside, then hard-linked into place (fails if it exists).
        mine_path = f"{path}.{os.getpid()}"
        with open(mine_path, "w") as f:
            json.dump(mine, f)
        try:
            while True:
                try:
                    os.link(mine_path, path)
                    break
                except FileExistsError:
                    other = _read_lock(path)
                    if other is not None and _alive(other):
                        raise SDiTError(f"{self.url} is being written by `sdit {other['stage']}` (pid {other['pid']} "
                                        f"on {other['host']}, since {other['since']}); wait for it to finish or stop "
                                        f"it (a lock left on another machine: delete {path})") from None
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)  # stale: its process is gone
        finally:
            os.remove(mine_path)
        try:
            yield
        finally:
            if _read_lock(path) == mine:
                os.remove(path)

    # --- manifest ---------------------------------------------------------------------------------------
    def manifest(self) -> Manifest:
        if not self.exists(MANIFEST):
            raise SDiTError(f"{self.url} is not an SDiT store (no {MANIFEST}); create one with `sdit encode`")
        return Manifest.from_json(self.read_json(MANIFEST), self.url)

    def encoded(self) -> Manifest:
        """The manifest of a store `sdit encode` finished, refused in one line when it is unfinished or holds no
        records (every image was rejected)."""
        manifest = self.manifest()
        if manifest.status != "complete":
            if manifest.counts and not manifest.counts.get("records"):
                raise SDiTError(f"{self.url} holds no records: `sdit encode` rejected every image (see "
                                f"{self.url}/rejects.jsonl); encode images it accepts with --overwrite")
            raise SDiTError(f"{self.url} is not finished encoding; rerun `sdit encode` on it first")
        if not manifest.counts.get("records"):
            raise SDiTError(f"{self.url} holds no records; encode images into it with `sdit encode --overwrite`")
        return manifest

    def write_manifest(self, manifest: Manifest) -> None:
        self.write_json(manifest.to_json(), MANIFEST)

    # --- shards -----------------------------------------------------------------------------------------
    def root_group(self, mode: str = "r") -> zarr.Group:
        return zarr.open_group(self.url, mode=mode, zarr_format=3)

    def finished(self, group: str, damaged: list[Damaged] | None = None) -> dict[int, dict]:
        """Completion records of the finished shards of `group`, by shard index. A record that does not read
        raises `Damaged`; given a `damaged` list, it goes there instead and its shard is left out."""
        folder = self._path("_done", group)
        if not self.fs.exists(folder):
            return {}
        out = {}
        for path in self.fs.ls(folder, detail=False):
            name = PurePosixPath(path).name
            if name.endswith(".json") and name[:-5].isdigit():
                try:
                    out[int(name[:-5])] = self.read_json("_done", group, name)
                except Damaged as err:
                    if damaged is None:
                        raise
                    damaged.append(err)
        return dict(sorted(out.items()))

    def concurrently(self, reads: list[Callable[[], T]]) -> list[T]:
        """The results of reads of this store, in order: at once on object storage, where each waits on a request
        (`concurrently`); one after another on a local filesystem, where threads only cost (measured: 7% of the
        loader's supply)."""
        return [read() for read in reads] if self.local else concurrently(reads)

    def shard_group(self, group: str, index: int) -> zarr.Group:
        return zarr.open_group(self.zarr_reader(), path=f"{group}/{shard_name(index)}", mode="r", zarr_format=3)

    @contextmanager
    def checked(self, group: str, index: int, what: str = ""):
        """Reads inside this block that meet a chunk failing its checksum, or Zarr metadata (zarr.json) that
        does not parse, stop with a one-line error naming the shard (`what` may add the array and rows)."""
        where = f"{group}/{shard_name(index)}" + (f" {what}" if what else "")
        try:
            with self.parsing(f"{where}: a zarr.json"):
                yield
        except ValueError as err:
            if "checksum" not in str(err):
                raise
            raise SDiTError(f"{self.url}: {where}: a chunk fails its checksum (corrupted on disk); `sdit verify "
                            f"{self.url}` lists every damaged shard; re-make them (delete the shard's _done record "
                            "and rerun the stage that wrote it)") from None

    def read(self, group: str, index: int, names: tuple[str, ...], start: int = 0,
             stop: int | None = None) -> dict[str, np.ndarray]:
        """Rows [start, stop) of the named arrays of one shard, checksums checked."""
        with self.checked(group, index, f"records {start}..{'' if stop is None else stop}"):
            shard = self.shard_group(group, index)
            return {name: shard[name][start:stop] for name in names}

    def null_embedding(self) -> np.ndarray:
        """(L, D) the empty caption's text embedding; a damaged array raises `Damaged` naming its file."""
        with self.parsing("zarr.json"):
            root = self.root_group()
        with self.parsing("null_text_emb/zarr.json"):
            array = root["null_text_emb"]
        try:
            return array[:]
        except ValueError as err:
            if "checksum" not in str(err):
                raise
            raise Damaged(self.url, "null_text_emb", "a chunk fails its checksum") from None

    @contextmanager
    def parsing(self, name: str):
        """Zarr metadata read inside this block that does not parse raises `Damaged` naming the file `name`."""
        try:
            yield
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise Damaged(self.url, name, json_problem(err)) from None

    def all_finished(self, group: str, expected: Iterable[int]) -> dict[int, dict]:
        """`finished(group)`, refused in one line when a shard of `expected` is not among them: its worker wrote
        it where this machine cannot read (a relative or node-local path on a cluster)."""
        done = self.finished(group)
        expected = set(expected)
        if missing := sorted(expected - set(done)):
            shown = ", ".join(f"{group}/{k:05d}" for k in missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise SDiTError(f"{len(missing)} of {len(expected)} shards are not in {self.url} as this machine sees it "
                            f"({shown}), though the workers finished them: give an --out that the workers and this "
                            "machine share (a shared filesystem or object storage), then run again")
        return done

    def longest_caption(self) -> int:
        """The most tokens (start and end included) of any caption in the store: its records, prompt bank and
        synthetic records; one small read of each finished shard."""
        groups = [group for group in ("records", "prompts", "synthetic") if self.exists(group)]
        reads = [functools.partial(self.read, group, index, ("token_count",)) for group in groups
                 for index in self.finished(group)]
        return max((int(part["token_count"].max(initial=0)) for part in self.concurrently(reads)), default=0)

    def iter_shards(self, group: str = "records") -> Iterator[tuple[int, zarr.Group]]:
        for index in self.finished(group):
            yield index, self.shard_group(group, index)

    def remove_unfinished(self, group: str) -> list[int]:
        """Delete shard folders that have no completion record (left by a crash); return their indices."""
        folder = self._path(group)
        if not self.fs.exists(folder):
            return []
        done = self.finished(group)
        removed = []
        for path in self.fs.ls(folder, detail=False):
            name = PurePosixPath(path).name
            if name.isdigit() and int(name) not in done:
                self.fs.rm(path, recursive=True)
                removed.append(int(name))
        return removed


class Reader(WrapperStore):
    """A read-only Zarr store that adds the bytes it reads to `counter[0]` and keeps the last `indexes` shard
    indexes it read: a finished shard never changes, and a read of a few rows of a Zarr shard file would otherwise
    read its chunk index again each time (16 bytes a chunk: as much as a text embedding at 1,024 rows a shard)."""

    def __init__(self, store, counter: list[int], indexes: int = 1024):
        super().__init__(store)
        self.counter, self.indexes = counter, indexes
        self.cache: OrderedDict[tuple, object] = OrderedDict()

    def _with_store(self, store) -> "Reader":
        return type(self)(store, self.counter, self.indexes)

    async def get(self, key, prototype, byte_range=None):
        index = (key, byte_range.suffix) if isinstance(byte_range, SuffixByteRequest) else None  # a shard index
        if index in self.cache:
            self.cache.move_to_end(index)
            return self.cache[index]
        buffer = await self._store.get(key, prototype, byte_range)
        self.counter[0] += 0 if buffer is None else len(buffer)
        if index and buffer is not None:
            self.cache[index] = buffer
            if len(self.cache) > self.indexes:
                self.cache.popitem(last=False)
        return buffer

    async def get_partial_values(self, prototype, key_ranges):
        buffers = await self._store.get_partial_values(prototype, key_ranges)
        self.counter[0] += sum(len(b) for b in buffers if b is not None)
        return buffers


def write_shard(store: Store, group: str, index: int, columns: dict[str, np.ndarray], record: dict,
                checksum: bool = True) -> None:
    """Write one shard's arrays whole, then its completion record.

    Each column is one Zarr array with the sharding codec (one file per column), inner chunks of
    CHUNK_RECORDS records, each with a CRC32C checksum and no compression (fp16 compresses 1.0 to 1.15x, not
    worth the CPU). `checksum=False` is for measuring what the checksum costs: stages never write without it.
    """
    compressors = CHECKSUM if checksum else None
    spec = columns_of(group)
    required = {name for name, col in spec.items() if not col.optional}
    if not required <= set(columns) <= set(spec):
        raise ValueError(f"shard columns {sorted(columns)}: need {sorted(required)}, may add "
                         f"{sorted(set(spec) - required)}")
    n = len(next(columns[name] for name, col in spec.items() if col.per_record))
    url = f"{store.url}/{group}/{shard_name(index)}"
    shard = zarr.open_group(url, mode="w", zarr_format=3)
    for name, values in columns.items():
        if spec[name].per_record and len(values) != n:
            raise ValueError(f"column {name} has {len(values)} rows, expected {n}")
        rest = values.shape[1:]
        rows = len(values)
        chunk = max(1, min(spec[name].chunk, rows))
        capacity = max(chunk, -(-rows // chunk) * chunk)  # the sharding codec wants whole inner chunks
        if spec[name].dtype == "str":
            arr = shard.create_array(name, shape=(n,), dtype=str, chunks=(chunk,), shards=(capacity,),
                                     compressors=compressors)
        else:
            arr = shard.create_array(name, shape=values.shape, dtype=spec[name].dtype, chunks=(chunk, *rest),
                                     shards=(capacity, *rest), compressors=compressors, fill_value=0)
        if rows:
            arr[:] = values
    store.write_json({**record, "count": n, "index": index}, "_done", group, f"{shard_name(index)}.json")


def _read_lock(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None  # gone, or unreadable: stale


def _alive(lock: dict) -> bool:
    """Whether the lock's process still runs (on another host we cannot tell: it counts as running)."""
    if lock.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(lock["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, PurePath):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
