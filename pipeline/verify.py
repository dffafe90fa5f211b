"""`sdit verify STORE`: read every manifest and every chunk of every finished shard; say what is wrong.

A store may hold days of teacher time. Every chunk carries a CRC32C checksum (sdit.store), so a flipped bit, a
truncated file or a lost array is found here before a student trains on it. Each problem is one line naming
the shard, the array, the records and what is wrong; unfinished shards (no completion record) are not read,
as no stage reads them either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sdit.errors import SDiTError
from sdit.labels import read_labels
from sdit.store import CHUNK_RECORDS, Store, columns_of, shard_name
from sdit.synthesize import SYNTHETIC, read_synthetic


@dataclass
class Report:
    store: str
    shards: int = 0
    chunks: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        verdict = "intact" if self.ok else f"{len(self.problems)} problems"
        return f"{self.store}: {self.shards} shards, {self.chunks} chunks read: {verdict}"


def groups(store: Store) -> list[str]:
    """Every group of shards the store has completion records for: records, prompts, synthetic, and each
    labelling's shards (of records and of synthetic records)."""
    found = [g for g in ("records", "prompts", SYNTHETIC) if store.finished(g)]
    for name in store.children("_done", "labels"):
        found += [g for g in (f"labels/{name}", f"labels/{name}/{SYNTHETIC}") if store.finished(g)]
    return found


def verify(url: str, progress: Callable[[int], None] | None = None) -> Report:
    store = Store(url)
    report = Report(store.url)
    try:
        store.manifest()
    except SDiTError as err:
        raise SDiTError(f"cannot verify: {err}") from None
    _check_manifests(store, report)
    for group in groups(store):
        for index, record in store.finished(group).items():
            report.shards += 1
            _check_shard(store, group, index, record, report)
            if progress:
                progress(1)
    return report


def count_shards(url: str) -> int:
    store = Store(url)
    return sum(len(store.finished(g)) for g in groups(store))


def _check_manifests(store: Store, report: Report) -> None:
    readers = [("synthetic/manifest.json", lambda: read_synthetic(store))]
    for name in store.children("labels"):
        readers.append((f"labels/{name}/manifest.json", lambda name=name: read_labels(store, name)))
    for where, read in readers:
        try:
            read()
        except (SDiTError, ValueError, KeyError, TypeError) as err:
            report.problems.append(f"{where}: unreadable ({err})")


def _check_shard(store: Store, group: str, index: int, record: dict, report: Report) -> None:
    where = f"{group}/{shard_name(index)}"
    try:
        shard = store.shard_group(group, index)
    except Exception as err:  # zarr raises several kinds for a missing or damaged group
        report.problems.append(f"{where}: the shard cannot be opened ({type(err).__name__}: {err})")
        return
    for name, column in columns_of(group).items():
        try:
            array = shard[name]
        except KeyError:
            report.problems.append(f"{where} {name}: missing")
            continue
        rows = array.shape[0]
        if column.per_record and rows != record["count"]:
            report.problems.append(f"{where} {name}: {rows} rows, the completion record says {record['count']}")
        for start in range(0, rows, CHUNK_RECORDS):
            stop = min(start + CHUNK_RECORDS, rows)
            report.chunks += 1
            try:
                array[start:stop]
            except Exception as err:  # a failed checksum (ValueError), a truncated or missing chunk file, ...
                what = "fails its checksum" if "checksum" in str(err) else f"unreadable ({type(err).__name__})"
                report.problems.append(f"{where} {name} records {start}..{stop}: {what}")
