"""Stage two's reader: labelled draws from a store, in shuffled batches, with the teacher's exact inputs.

zarr-python pays about 0.4 ms per chunk read, so single-draw random reads would cap training near 1,000
draws/s. The reader instead loads whole blocks (one Zarr chunk of CHUNK_RECORDS records and their K draws
each), a window of `buffer_records` records at a time, and shuffles the draws inside the window:

    epoch e:   blocks in an order drawn from (seed, e), cut into windows of `buffer_records` records
    window w:  its blocks' arrays in memory; its draws in an order drawn from (seed, e, w)
    batches:   cut from that stream; a batch may span two windows (or epochs)

So the stream is a pure function of the seed: a `Position` (epoch, window, offset) says where it stands, and
a resumed run reads on exactly where it stopped. Data-parallel workers split each window's blocks between them
(`DrawStream`), so each reads only its share of the store and has a position of its own. Inputs are rebuilt
with `sdit.labels.teacher_inputs`, the function stage one fed the teacher with (invariant 1).

A `Split` holds some records out of training, chosen per record from (seed, shard, row), so a held-out
evaluation sees images and draws the student never trained on.

Labels made with `--synthesize` also describe synthetic records (the teacher's samples for the prompt bank,
`synthetic/NNNNN`, labelled in `labels/<name>/synthetic/NNNNN`): their blocks join the records' blocks in the
same stream, each batch says which draws are synthetic, and they are never held out (the held-out split
measures real images the student never saw).

Guided labels made with fresh guidance keep ε_c and ε_u of each draw: a training stream composes the target
ε_u + w(ε_c − ε_u) at a w drawn afresh for each draw in each window (from the seed, epoch and window, so a resumed
run draws the same w), a stream read once at the draw's own w.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sdit.diffusion import NoiseSchedule
from sdit.errors import SDiTError
from sdit.labels import CaptionBank, LabelsManifest, guidance_scale, read_index, read_labels, teacher_inputs
from sdit.store import CHUNK_RECORDS, Manifest, Store
from sdit.synthesize import SYNTHETIC, read_synthetic

LABEL_ARRAYS = ("timesteps", "kind", "caption_from", "caption_index", "weight", "guidance", "noise", "xi_index",
                "eps_teacher", "valid")


@dataclass(frozen=True)
class Split:
    """Records held out of training: each with probability `holdout`, drawn from (seed, shard)."""

    holdout: float = 0.0
    seed: int = 0

    def held_out(self, shard: int, n: int) -> np.ndarray:
        """(n,) bool for the records of one shard (read-only: drawn once a shard, not once a block)."""
        return _held_out(self.holdout, self.seed, shard, n)


@functools.lru_cache(maxsize=4096)
def _held_out(holdout: float, seed: int, shard: int, n: int) -> np.ndarray:
    keep = np.zeros(n, bool) if holdout <= 0 else np.random.default_rng([seed, shard, 0x5EED]).random(n) < holdout
    keep.flags.writeable = False
    return keep


@dataclass(frozen=True, order=True)
class Position:
    """Where the stream stands: the next draw is `offset` of window `window` of epoch `epoch`."""

    epoch: int = 0
    window: int = 0
    offset: int = 0


@dataclass(frozen=True)
class Block:
    shard: int
    start: int  # records [start, stop) of the shard
    stop: int
    synthetic: bool = False  # a block of synthetic shard `shard`, not of records shard `shard`


BATCH_TENSORS = ("x_t", "text", "timesteps", "guidance", "kind", "noise", "eps_teacher", "synthetic")


@dataclass
class Batch:
    """One batch of draws, everything on the CPU. B = draws in the batch (this worker's share of it)."""

    x_t: torch.Tensor  # (B, C, h, w) float32: exactly the teacher's input
    text: torch.Tensor  # (B, L, D) float16: exactly the teacher's text input
    timesteps: torch.Tensor  # (B,) long
    guidance: torch.Tensor  # (B,) float32: w of a guided target, 0 for unguided labels
    kind: torch.Tensor  # (B,) long: sdit.perturb.Kind
    noise: torch.Tensor  # (B, C, h, w) float16: the true noise ε
    eps_teacher: torch.Tensor  # (B, C, h, w) float16: ε_T
    synthetic: torch.Tensor  # (B,) bool: the draw is of a synthetic record (a teacher sample)
    position: Position = field(default_factory=Position)  # the stream's position after this batch

    def __len__(self) -> int:
        return len(self.timesteps)

    def head(self, n: int) -> Batch:
        """The first `n` draws."""
        return Batch(**{name: getattr(self, name)[:n] for name in BATCH_TENSORS}, position=self.position)

    def split(self, n: int) -> list[Batch]:
        """`n` consecutive parts of near-equal size (the empty ones left out), each with this batch's position."""
        parts = {name: torch.tensor_split(getattr(self, name), n) for name in BATCH_TENSORS}
        return [Batch(**{name: parts[name][i] for name in BATCH_TENSORS}, position=self.position)
                for i in range(n) if len(parts["timesteps"][i])]

    @staticmethod
    def cat(parts: list[Batch], position: Position) -> Batch:
        return Batch(**{n: torch.cat([getattr(p, n) for p in parts]) for n in BATCH_TENSORS}, position=position)


class LabelledStore:
    """A finished store and one finished set of its labels, checked, with what rebuilding inputs needs."""

    def __init__(self, url: str, labels: str = "default"):
        self.store = Store(url)
        self.manifest: Manifest = self.store.encoded()
        meta = read_labels(self.store, labels)
        if meta is None:
            raise SDiTError(f"{self.store.url} has no labels {labels!r}; run `sdit teacher-label` on it first")
        if meta.status != "complete":
            raise SDiTError(f"labels {labels!r} of {self.store.url} are unfinished; rerun `sdit teacher-label` to "
                            "finish them")
        self.labels: LabelsManifest = meta
        self.group = meta.group
        self.schedule = NoiseSchedule.from_config(meta.scheduler)
        self.input_gamma = float(meta.perturb["input_gamma"])
        self.draws = meta.draws
        self.index = read_index(self.store, labels)  # None: labels made before indexes; read the shards instead
        self.counts = self.index["records"].as_dict() if self.index else \
            {i: r["count"] for i, r in self.store.finished(self.group).items()}
        self.synthetic_counts = self._synthetic_counts(labels)
        self.valid = None  # (synthetic, shard): each record's valid draws, from the index
        if self.index:
            self.valid = {(kind == SYNTHETIC, shard): valid for kind in ("records", SYNTHETIC) if kind in self.index
                          for shard, valid in self.index[kind].valid_by_shard().items()}
        self.bank = CaptionBank(self.store, counts={"records": self.counts, "prompts": self.index["prompts"].as_dict()}
                                if self.index else None)
        self.null = self.store.null_embedding()

    def _synthetic_counts(self, labels: str) -> dict[int, int]:
        """Synthetic records per labelled synthetic shard; refuses labels of a synthetic set since replaced."""
        if not self.labels.synthesis:
            return {}
        made = read_synthetic(self.store)
        if made is None or made.set_id != self.labels.synthetic_set:
            raise SDiTError(f"labels {labels!r} of {self.store.url} describe synthetic records the store no longer "
                            "holds; relabel with `sdit teacher-label --synthesize ... --overwrite`")
        if self.index:
            return self.index[SYNTHETIC].as_dict()
        return {i: r["count"] for i, r in self.store.finished(f"{self.group}/{SYNTHETIC}").items()}

    def blocks(self) -> list[Block]:
        """Every block of the records' labels, then of the synthetic records' labels."""
        return [Block(shard, start, min(start + CHUNK_RECORDS, n), synthetic)
                for synthetic, counts in ((False, self.counts), (True, self.synthetic_counts))
                for shard, n in counts.items() for start in range(0, n, CHUNK_RECORDS)]

    def records_group(self, block: Block) -> str:
        return SYNTHETIC if block.synthetic else "records"

    def labels_group(self, block: Block) -> str:
        return f"{self.group}/{SYNTHETIC}" if block.synthetic else self.group

    def read(self, blocks: list[Block]) -> dict:
        """The blocks' records and labels, concatenated as if they were one shard (each block's rows of the
        `xi` side table are gathered and re-indexed). Every array of every block is read at once
        (`concurrently`): on object storage each is a request."""
        arrays = LABEL_ARRAYS + (("eps_uncond",) if self.labels.guidance_fresh else ())
        columns = [(self.labels_group, name) for name in arrays] + \
            [(self.records_group, name) for name in ("latents", "text_emb")]
        reads = [functools.partial(self.store.read, group(b), b.shard, (name,), b.start, b.stop)
                 for b in blocks for group, name in columns]
        values = iter(self.store.concurrently(reads))
        parts = [{name: next(values)[name] for _, name in columns} for _ in blocks]
        wanted = [np.sort(part["xi_index"][part["xi_index"] >= 0]) for part in parts]  # each block's xi rows
        xi = self.store.concurrently([functools.partial(self._xi, b, rows) for b, rows in zip(blocks, wanted)])
        for b, part, rows, values in zip(blocks, parts, wanted, xi):
            part["synthetic"] = np.full(b.stop - b.start, b.synthetic)
            part["xi"] = values
            used = part["xi_index"] >= 0
            xi_index = np.full_like(part["xi_index"], -1)
            xi_index[used] = np.searchsorted(rows, part["xi_index"][used])
            part["xi_index"] = xi_index
        out = {}
        for name in parts[0]:
            out[name] = np.concatenate([p[name] for p in parts])
        offsets = np.cumsum([0] + [len(p["xi"]) for p in parts[:-1]])
        out["xi_index"] = np.concatenate([np.where(p["xi_index"] >= 0, p["xi_index"] + o, -1)
                                          for p, o in zip(parts, offsets)])
        return out

    def _xi(self, block: Block, rows: np.ndarray) -> np.ndarray:
        """Rows of a block's shard's `xi` side table (the input perturbations its draws use)."""
        if not len(rows):
            return np.zeros((0, *self.manifest.latent_shape), np.float16)
        with self.store.checked(self.labels_group(block), block.shard, "xi"):
            return self.store.shard_group(self.labels_group(block), block.shard)["xi"].get_orthogonal_selection(rows)

    def batch(self, data: dict, rows: np.ndarray, draws: np.ndarray, guidance: np.ndarray | None = None) -> Batch:
        """Rebuild the draws (rows[i], draws[i]) of data read by `read`. Labels made with fresh guidance compose
        their target at `guidance` (the draws' own w when not given)."""
        if guidance is not None and not self.labels.guidance_fresh:
            raise ValueError(f"labels {self.labels.name!r} hold targets at their own w only (no --fresh-guidance)")
        inputs = teacher_inputs(self.schedule, data["latents"], data["text_emb"], data, rows, draws, self.bank,
                                self.null, self.input_gamma)
        w = data["guidance"][rows, draws] if guidance is None else guidance.astype(np.float32)
        eps_teacher = data["eps_teacher"][rows, draws]
        if self.labels.guidance_fresh:  # ε_u + w(ε_c − ε_u), in float32, stored as the other targets are
            eps_u = data["eps_uncond"][rows, draws].astype(np.float32)
            eps_teacher = (eps_u + w[:, None, None, None] * (eps_teacher - eps_u)).astype(np.float16)
        return Batch(inputs.x_t, inputs.text, inputs.timesteps, torch.as_tensor(w),
                     torch.as_tensor(data["kind"][rows, draws]).long(), torch.as_tensor(data["noise"][rows, draws]),
                     torch.as_tensor(eps_teacher), torch.as_tensor(data["synthetic"][rows]))

    def fresh_guidance(self, seed: Sequence[int], n: int, window: Sequence[float] | None = None) -> np.ndarray | None:
        """(n,) w drawn afresh from `window` (default: the labels' own), from generator `seed`; None unless the labels
        keep both ε."""
        if not self.labels.guidance_fresh:
            return None
        gen = np.random.default_rng(seed)
        window = self.labels.guidance if window is None else window
        return np.array([guidance_scale(gen, window, self.labels.guidance_conditional) for _ in range(n)], np.float32)


class DrawStream:
    """Batches of `batch_size` draws of one split, shuffled through a window of `buffer_records` records.

    With `world` > 1 the workers split the blocks between them, so that each reads only its share of the store:
    each window holds `world` x `buffer_records` records, and worker `rank` reads blocks rank, rank + world, ...
    of it, shuffles their draws and takes batch_size / world of them a step. Each worker's stream is its own and
    so is its `Position`; together the workers see every draw of the split once an epoch. `repeat=False,
    shuffle=False` reads the split once in store order (evaluation). `guidance_range`: for labels with fresh
    guidance, the window a training stream draws w from (default: the labels' own).
    """

    def __init__(self, data: LabelledStore, batch_size: int, *, split: Split = Split(), train: bool = True,
                 seed: int = 0, buffer_records: int = 1024, shuffle: bool = True, repeat: bool = True,
                 rank: int = 0, world: int = 1, guidance_range: Sequence[float] | None = None):
        if batch_size % world:
            raise SDiTError(f"batch size {batch_size} is not divisible by the {world} workers")
        self.data, self.batch_size, self.split, self.train = data, batch_size, split, train
        self.seed, self.shuffle, self.repeat, self.rank, self.world = seed, shuffle, repeat, rank, world
        self.guidance_range = guidance_range
        self.blocks_per_window = max(1, buffer_records // CHUNK_RECORDS) * world
        self.blocks = _at_least(data.blocks(), world)
        self.total = self._count(self.blocks)
        if self.total == 0:
            which = "training" if train else "held-out"
            raise SDiTError(f"no {which} draws in {data.store.url} (labels {data.group}); check --holdout")

    @property
    def own_total(self) -> int:
        """Draws this worker reads in an epoch (all of them, for one worker)."""
        return self.total if self.world == 1 else self._count([b for window in self.windows(0) for b in window])

    def _count(self, blocks: list[Block]) -> int:
        """Draws of `blocks` in this split: from the labels' index, else from each block's `valid` array."""
        if self.data.valid is None:
            return sum(len(self._selected(b)[0]) for b in blocks)
        return int(sum(self.data.valid[b.synthetic, b.shard][b.start:b.stop][self._keep(b)].sum() for b in blocks))

    def _keep(self, block: Block) -> np.ndarray:
        """(rows,) bool: the block's records in this split. Synthetic records are never held out."""
        if block.synthetic:
            return np.full(block.stop - block.start, self.train)
        keep = self.split.held_out(block.shard, self.data.counts[block.shard])[block.start:block.stop]
        return keep if not self.train else ~keep

    def _selected(self, block: Block, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(rows, draws) of a block's draws in this split whose teacher output is finite (`valid`: the block's
        (rows, K) flags, read here when not given)."""
        if valid is None:
            valid = self.data.store.read(self.data.labels_group(block), block.shard, ("valid",), block.start,
                                         block.stop)["valid"]
        return np.nonzero(valid & self._keep(block)[:, None])

    def windows(self, epoch: int) -> list[list[Block]]:
        """This worker's blocks of each window of epoch `epoch`."""
        order = np.arange(len(self.blocks))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks))
        w = self.blocks_per_window
        windows = [[self.blocks[i] for i in order[k:k + w]][self.rank::self.world] for k in range(0, len(order), w)]
        return [blocks for blocks in windows if blocks]

    def _window(self, epoch: int, index: int, blocks: list[Block]) -> tuple[dict, np.ndarray, np.ndarray,
                                                                             np.ndarray | None]:
        """The window's data, its draws (rows, draws) in the order they are read, and for training (a stream that
        repeats) on labels with fresh guidance each draw's w this epoch."""
        data = self.data.read(blocks)
        rows, draws, base = [], [], 0
        for b in blocks:
            r, d = self._selected(b, data["valid"][base:base + b.stop - b.start])
            rows.append(r + base)
            draws.append(d)
            base += b.stop - b.start
        rows, draws = np.concatenate(rows), np.concatenate(draws)
        seed = [self.seed, epoch, index, *([self.rank] if self.world > 1 else [])]
        if self.shuffle:
            order = np.random.default_rng(seed).permutation(len(rows))
            rows, draws = rows[order], draws[order]
        guidance = self.data.fresh_guidance([*seed, 0x6D1], len(rows), self.guidance_range) \
            if self.train and self.repeat else None
        return data, rows, draws, guidance

    def __iter__(self) -> Iterator[Batch]:
        return self.batches(Position())

    def resumed(self, saved: list[Position], window_blocks: int | None) -> tuple[Position, str | None]:
        """Where this worker goes on from a checkpoint whose workers stood at `saved` with windows of
        `window_blocks` blocks (None: a checkpoint that did not say; one worker's window), and what could not be
        kept as it was. The same workers: each exactly where it stood. Another number: every worker from the
        window that all of them had reached (at most a window of draws is read again)."""
        window_blocks = window_blocks or self.blocks_per_window // self.world
        if len(saved) == self.world and window_blocks == self.blocks_per_window:
            return saved[self.rank], None
        epoch, window = min((p.epoch, p.window) for p in saved)
        position = Position(epoch, window * window_blocks // self.blocks_per_window, 0)
        return position, (f"the data position: saved by {len(saved)} workers, resumed by {self.world}; every "
                          f"worker goes on from block {window * window_blocks:,} of epoch {epoch}, where all had "
                          "reached (a window of draws may be seen again)")

    def batches(self, start: Position) -> Iterator[Batch]:
        """This worker's batches (batch_size / world draws each) from `start` on."""
        size = self.batch_size // self.world
        parts, filled = [], 0
        epoch, window, offset = start.epoch, start.window, start.offset
        while True:
            windows = self.windows(epoch)
            for index in range(window, len(windows)):
                data, rows, draws, guidance = self._window(epoch, index, windows[index])
                while offset < len(rows):
                    take = min(size - filled, len(rows) - offset)
                    part = slice(offset, offset + take)
                    parts.append(self.data.batch(data, rows[part], draws[part],
                                                 None if guidance is None else guidance[part]))
                    filled, offset = filled + take, offset + take
                    if filled == size:
                        yield Batch.cat(parts, Position(epoch, index, offset))
                        parts, filled = [], 0
                offset = 0
            window = 0
            epoch += 1
            if not self.repeat:
                if parts:
                    yield Batch.cat(parts, Position(epoch, 0, 0))
                return


def read_ahead(batches: Iterator, device: torch.device) -> Iterator:
    """`batches` prefetched on a GPU, where reading overlaps the device's work; as they are on the CPU."""
    return prefetch(batches) if device.type == "cuda" else batches


def prefetch(batches: Iterator[Batch], depth: int = 2) -> Iterator[Batch]:
    """`batches` read ahead by a background thread, at most `depth` batches ahead, so that reading the store and
    rebuilding inputs overlap a training step on a GPU (zarr's reads and numpy's work release the GIL). Not for a
    step on the CPU, whose threads already take every core: a reader beside them slows the step more than it saves.
    An error of the reader is raised here, at the batch it stopped; closing this generator stops the thread."""
    ahead: queue.Queue = queue.Queue(maxsize=depth)
    stop, end = threading.Event(), object()

    def read() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        ahead.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ahead.put(end)
        except BaseException as err:  # handed to the consumer, which raises it
            ahead.put(err)

    thread = threading.Thread(target=read, name="sdit-prefetch", daemon=True)
    thread.start()
    try:
        while (item := ahead.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _at_least(blocks: list[Block], n: int) -> list[Block]:
    """`blocks`, the largest cut in two until there are `n` (a store of fewer blocks than workers)."""
    blocks = list(blocks)
    while len(blocks) < n:
        b = max(blocks, key=lambda b: b.stop - b.start)
        if b.stop - b.start < 2:
            raise SDiTError(f"{len(blocks)} records cannot be shared between {n} workers")
        middle = (b.start + b.stop) // 2
        i = blocks.index(b)
        blocks[i:i + 1] = [Block(b.shard, b.start, middle, b.synthetic), Block(b.shard, middle, b.stop, b.synthetic)]
    return blocks
