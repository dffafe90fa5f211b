"""`sdit verify STORE`: read every manifest and every chunk of every finished shard; say what is wrong.

A store may hold days of teacher time. Every chunk carries a CRC32C checksum (sdit.store), so a flipped bit, a
truncated file or a lost array is found here before a student trains on it. Each problem is one line naming
the shard, the array, the records and what is wrong; unfinished shards (no completion record) are not read,
as no stage reads them either. JSON that does not parse (a manifest, a completion record, a zarr.json) is a
problem of the store like a failed checksum; only a folder with no manifest at all is refused as no store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from sdit.errors import SDiTError
from sdit.labels import LABELS_INDEX, read_index, read_labels
from sdit.progress import Progress, no_progress
from sdit.store import CHUNK_RECORDS, MANIFEST, Damaged, OtherVersion, Store, columns_of, json_problem, shard_name
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
        n = len(self.problems)
        verdict = "intact" if self.ok else f"{n} problem{'' if n == 1 else 's'}"
        return f"{self.store}: {self.shards} shards, {self.chunks} chunks read: {verdict}"


def groups(store: Store) -> list[str]:
    """Every group of shards the store has completion records for: records, prompts, synthetic, and each
    labelling's shards (of records and of synthetic records)."""
    candidates = ["records", "prompts", SYNTHETIC]
    for name in store.children("_done", "labels"):
        candidates += [f"labels/{name}", f"labels/{name}/{SYNTHETIC}"]
    return [g for g in candidates if store.children("_done", g)]


def verify(url: str, progress: Progress = no_progress) -> Report:
    store = Store(url)
    report = Report(store.url)
    if not store.exists(MANIFEST):
        raise SDiTError(f"cannot verify: {store.url} is not an SDiT store (no {MANIFEST})")
    _check_manifests(store, report)
    _check_null_embedding(store, report)
    for group in groups(store):
        damaged: list[Damaged] = []
        extra = _optional_columns(store, group)
        for index, record in store.finished(group, damaged).items():
            report.shards += 1
            _check_shard(store, group, index, record, report, extra)
            progress(1)
        report.problems += [_problem(err) for err in damaged]
    return report


def count_shards(url: str) -> int:
    store = Store(url)
    return sum(len(store.finished(g, damaged=[])) for g in groups(store))


def _problem(err: Damaged) -> str:
    return f"{err.name}: damaged ({err.reason})"


def _check_manifests(store: Store, report: Report) -> None:
    readers = [(MANIFEST, store.manifest), ("synthetic/manifest.json", lambda: read_synthetic(store))]
    for name in store.children("labels"):
        readers.append((f"labels/{name}/manifest.json", lambda name=name: read_labels(store, name)))
        readers.append((f"labels/{name}/{LABELS_INDEX}", lambda name=name: read_index(store, name)))
    for where, read in readers:
        try:
            read()
        except Damaged as err:
            report.problems.append(_problem(err))
        except OtherVersion as err:
            if where == MANIFEST:  # a store this SDiT does not read: no verdict on its data
                raise SDiTError(f"cannot verify: {err}") from None
            report.problems.append(f"{where}: unreadable ({err})")
        except (SDiTError, ValueError, KeyError, TypeError) as err:
            report.problems.append(f"{where}: unreadable ({err})")


def _check_null_embedding(store: Store, report: Report) -> None:
    try:
        store.null_embedding()
    except Damaged as err:
        report.problems.append(_problem(err))
    except Exception as err:  # zarr raises several kinds for a missing or damaged array
        report.problems.append(f"null_text_emb: unreadable ({type(err).__name__})")


def _optional_columns(store: Store, group: str) -> set[str]:
    """The optional columns every shard of `group` must have: a trajectory set's states, the unconditional ε of
    labels made with fresh guidance."""
    try:
        if group == SYNTHETIC:
            made = read_synthetic(store)
            return {"states"} if made is not None and made.config.get("trajectory") else set()
        if group.startswith("labels/"):
            meta = read_labels(store, group.split("/")[1])
            return {"eps_uncond"} if meta is not None and meta.guidance_fresh else set()
    except (SDiTError, ValueError, KeyError, TypeError):  # reported with the manifests
        pass
    return set()


def _check_shard(store: Store, group: str, index: int, record: dict, report: Report, extra: set[str]) -> None:
    """Every chunk of every column of the shard; `extra`: optional columns it must have."""
    where = f"{group}/{shard_name(index)}"
    try:
        shard = store.shard_group(group, index)
    except Exception as err:  # zarr raises several kinds for a missing or damaged group
        report.problems.append(f"{where}: the shard cannot be opened ({_why(err)})")
        return
    for name, column in columns_of(group).items():
        try:
            array = shard[name]
        except KeyError:
            if not column.optional or name in extra:
                report.problems.append(f"{where} {name}: missing")
            continue
        except Exception as err:  # its zarr.json does not parse, or describes no array zarr can open
            report.problems.append(f"{where} {name}: the array cannot be opened ({_why(err)})")
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


def _why(err: Exception) -> str:
    if isinstance(err, (json.JSONDecodeError, UnicodeDecodeError)):
        return f"its zarr.json is damaged: {json_problem(err)}"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
