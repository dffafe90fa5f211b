"""Image-caption sources read as streams.

`open_source` detects the format of what the user passed (a folder of images, Parquet in the
Hugging Face layout, or webdataset tar shards) and returns a `Source`: an iterable of
`SourceItem`s in a stable order, so a position names the same record on every run and an
interrupted encode can resume with `iter_from`. Sources never hold the dataset: memory is
bounded by one Parquet batch, one tar key, or one directory listing (invariant 5).

Images are not decoded here; the pipeline calls `SourceItem.read` and `sdit.decode.load_image` per
record and turns a `RejectedInput` into a line of the rejects file (invariant 6).
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import itertools
import json
import os
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import Any, Protocol

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from braceexpand import braceexpand

from sdit.errors import RejectedInput, SDiTError
from sdit.store import filesystem

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")  # tar preference order
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
PARQUET_BATCH_ROWS = 64  # a batch of encoded images is a few MB: small enough to bound memory
_TAR_MEMBER = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")  # webdataset: key = path up to the basename's first dot


@dataclass(frozen=True)
class SourceItem:
    """One record of a source. The image stays undecoded (bytes or a path) until the pipeline asks."""

    position: int
    id: str
    caption: str | None
    data: bytes | None = field(default=None, repr=False)
    path: str | None = None
    # An image left in its Parquet file (`ParquetSource.images`): (file, image column, row).
    image_at: tuple[str, str, int] | None = None

    def read(self) -> bytes:
        """The image bytes; a missing or unreadable file becomes a reject, not a crash."""
        if self.data is not None:
            return self.data
        if self.image_at is not None:
            return parquet_images([self])[0].read()  # one image alone: an encode worker reads its shard's at once
        if self.path is None:
            raise RejectedInput("missing_image", "no image file for this record")
        try:
            with _open_binary(self.path) as f:
                return f.read()
        except FileNotFoundError:
            raise RejectedInput("missing_image", f"{self.path} does not exist") from None
        except OSError as e:
            raise RejectedInput("unreadable_image", f"{self.path}: {e}") from None


class Source(Protocol):
    format: str  # "folder" | "parquet" | "webdataset"
    location: str  # what the user passed

    def __iter__(self) -> Iterator[SourceItem]: ...

    def iter_from(self, start: int) -> Iterator[SourceItem]: ...


# ---------------------------------------------------------------------------------------------
# Opening a source
# ---------------------------------------------------------------------------------------------


def open_source(
    location: str,
    *,
    image_column: str = "image",
    caption_column: str = "text",
    id_column: str | None = None,
    caption_key: str | None = None,
) -> Source:
    """Detect the format of `location` and check its columns; fails in one line before any work.

    A folder holding metadata.{jsonl,csv,parquet} is an imagefolder; one with top-level .parquet
    or tar files is a Parquet or webdataset source; otherwise it is a folder of images with .txt
    captions. A file or a glob is Parquet or tar by its suffix. A brace list ('shards/{00000..00099}.tar', as
    webdataset writes them) names several files or globs; a URL (s3://, gs://, ...: fsspec, with its filesystem
    package installed, e.g. `pip install 'sdit[s3]'`) names Parquet or tar files on object storage.
    """
    listed = list(braceexpand(location)) if "{" in location and not os.path.exists(location) else [location]
    if len(listed) > 1 or remote(location):
        files = [f for item in listed for f in _listed_files(item)]
        return _open_files(location, files, image_column, caption_column, id_column, caption_key)
    if re.search(r"[*?\[]", location) and not os.path.exists(location):  # "photos [2019]" is a folder
        files = sorted(f for f in glob(location, recursive=True) if os.path.isfile(f))
        if not files:
            raise SDiTError(f"no files match {location!r}; check the pattern (quote it so the shell leaves it alone)")
        return _open_files(location, files, image_column, caption_column, id_column, caption_key)
    path = Path(location)
    if not path.exists():
        raise SDiTError(
            f"{location} does not exist; pass a folder of images, a .parquet file or folder, or .tar shards"
        )
    if path.is_file():
        return _open_files(location, [str(path)], image_column, caption_column, id_column, caption_key)
    metadata = [path / name for name in METADATA_FILES if (path / name).is_file()]
    if len(metadata) > 1:
        raise SDiTError(f"{location} has several metadata files ({', '.join(m.name for m in metadata)}); keep one")
    if metadata:
        return MetadataFolderSource(location, path, metadata[0], caption_column)
    files = sorted(str(p) for p in path.iterdir() if p.is_file() and _kind(p.name) != "unknown")
    if files:
        return _open_files(location, files, image_column, caption_column, id_column, caption_key)
    if next(_walk_folder(path), None) is None:
        raise SDiTError(
            f"{location} has no images, .parquet or .tar files; for a Hugging Face dataset repo pass "
            "its parquet files as a glob, e.g. 'repo/data/train-*.parquet'"
        )
    return FolderSource(location, path)


def remote(location: str) -> bool:
    """A URL of a filesystem other than the local one (s3://, gs://, memory://, ...)."""
    return "://" in location and not location.startswith("file://")


def _listed_files(item: str) -> list[str]:
    """The Parquet or tar files one item of a list (or a URL) names: the file itself, a glob's matches, or the
    Parquet and tar files at the top of a folder."""
    if not remote(item):
        files = sorted(f for f in glob(item, recursive=True) if os.path.isfile(f))
        if not files:
            raise SDiTError(f"{item} does not exist" if not re.search(r"[*?\[]", item) else f"no files match {item!r}")
        return files
    fs, path = filesystem(item)
    protocol = item.split("://", 1)[0]
    if re.search(r"[*?\[]", path):
        files = sorted(fs.glob(path))
    elif fs.isfile(path):
        files = [path]
    elif fs.isdir(path):
        files = sorted(f for f in fs.ls(path, detail=False) if _kind(f) != "unknown")
        if not files:
            raise SDiTError(f"{item} holds no .parquet or .tar files: on object storage SDiT reads Parquet or "
                            "webdataset tar shards (a folder of images: pack it with img2dataset first)")
    else:
        raise SDiTError(f"{item} does not exist (or these credentials cannot see it)")
    if not files:
        raise SDiTError(f"no files match {item!r}")
    return [f"{protocol}://{f}" for f in files]


def _open_binary(file: str):
    """A file to read: a local path as it is, a URL opened through fsspec."""
    return fsspec.open(file, "rb") if remote(file) else open(file, "rb")


def _kind(name: str) -> str:
    lower = name.lower()
    if lower.endswith(".parquet"):
        return "parquet"
    return "webdataset" if lower.endswith(TAR_SUFFIXES) else "unknown"


def _open_files(
    location: str,
    files: list[str],
    image_column: str,
    caption_column: str,
    id_column: str | None,
    caption_key: str | None,
) -> Source:
    kinds = {_kind(f) for f in files}
    if kinds == {"parquet"}:
        base = posixpath.commonpath([posixpath.dirname(_absolute(f)) for f in files])
        for f in files:
            _check_parquet(f, image_column, caption_column, id_column)
        return ParquetSource(location, tuple(files), base, image_column, caption_column, id_column)
    if kinds == {"webdataset"}:
        return TarSource(location, tuple(files), caption_key)
    raise SDiTError(
        f"cannot tell the format of {location} ({', '.join(sorted({Path(f).suffix or f for f in files}))}); "
        "pass a folder of images, .parquet files, or .tar/.tar.gz shards"
    )


def _absolute(file: str) -> str:
    """A local path made absolute; a URL without its protocol."""
    return file.split("://", 1)[1] if remote(file) else os.path.abspath(file)


class _Stream:
    def __iter__(self) -> Iterator[SourceItem]:
        return self.iter_from(0)

    def num_items(self) -> int | None:
        """How many items the source holds, where that is cheap to know (for progress and ETA)."""
        return None

    def iter_from(self, start: int) -> Iterator[SourceItem]:
        raise NotImplementedError


def _clean_caption(value: Any) -> str | None:
    """Strip, nothing more: the caption is the teacher's text input and must reach CLIP as written."""
    if value is None:
        return None
    text = value.decode("utf-8-sig", errors="replace") if isinstance(value, bytes) else str(value)
    return text.strip()


# ---------------------------------------------------------------------------------------------
# Folder of images
# ---------------------------------------------------------------------------------------------


@dataclass
class FolderSource(_Stream):
    """Images with same-name .txt captions, recursive, in sorted order."""

    location: str
    root: Path
    format: str = field(default="folder", init=False)

    def num_items(self) -> int:
        return sum(1 for _ in _walk_folder(self.root))  # directory listings only

    def iter_from(self, start: int) -> Iterator[SourceItem]:
        for position, (id_, image, caption_file) in enumerate(_walk_folder(self.root)):
            if position >= start:  # skipped records cost a directory entry, never a file read
                caption = _clean_caption(caption_file.read_bytes()) if caption_file else None
                yield SourceItem(position, id_, caption, path=str(image) if image else None)


def _walk_folder(root: Path, prefix: str = "") -> Iterator[tuple[str, Path | None, Path | None]]:
    """(id, image, caption file) in sorted order: files of a directory by stem, then its subfolders.

    One directory is listed at a time, so memory grows with the largest directory, not the
    dataset. Two images sharing a stem (a.jpg, a.png) both get a.txt and keep their extension in
    the id, so ids stay unique.
    """
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    groups: dict[str, tuple[list[Path], list[Path]]] = {}
    for entry in entries:
        stem, _, ext = entry.name.rpartition(".")
        ext = ext.lower()
        if entry.name.startswith(".") or not stem or not entry.is_file():
            continue
        if ext in IMAGE_EXTENSIONS or ext == "txt":
            images, texts = groups.setdefault(stem, ([], []))
            (images if ext in IMAGE_EXTENSIONS else texts).append(Path(entry.path))
    for stem, (images, texts) in sorted(groups.items()):
        caption_file = texts[0] if texts else None
        if not images:
            yield prefix + stem, None, caption_file
        for image in images:
            yield prefix + (stem if len(images) == 1 else image.name), image, caption_file
    for entry in entries:
        if entry.is_dir() and not entry.name.startswith("."):
            yield from _walk_folder(Path(entry.path), f"{prefix}{entry.name}/")


@dataclass
class MetadataFolderSource(_Stream):
    """A Hugging Face imagefolder: the metadata file lists the records (`file_name` + caption), in its order."""

    location: str
    root: Path
    metadata: Path
    caption_column: str
    format: str = field(default="folder", init=False)

    def __post_init__(self) -> None:
        columns = _metadata_columns(self.metadata)
        for column, option in (("file_name", None), (self.caption_column, "--caption-column")):
            if column not in columns:
                _missing_column(column, columns, str(self.metadata), option)

    def num_items(self) -> int:
        return sum(1 for _ in _metadata_rows(self.metadata, ["file_name"], 0))

    def iter_from(self, start: int) -> Iterator[SourceItem]:
        for position, row in _metadata_rows(self.metadata, ["file_name", self.caption_column], start):
            file_name = str(row.get("file_name") or "")
            caption = _clean_caption(row.get(self.caption_column))
            if not file_name:  # a row naming no image: rejected downstream as missing_image
                yield SourceItem(position, f"{self.metadata.name}:{position}", caption)
                continue
            id_ = Path(file_name).with_suffix("").as_posix()
            yield SourceItem(position, id_, caption, path=str(self.root / file_name))


def _metadata_columns(path: Path) -> list[str]:
    try:
        if path.suffix == ".parquet":
            return pq.ParquetFile(path).schema_arrow.names
        with path.open(encoding="utf-8-sig", newline="") as f:
            if path.suffix == ".csv":
                return next(csv.reader(f), [])
            return list(json.loads(next((line for line in f if line.strip()), "{}")))
    except (ValueError, TypeError, OSError, pa.ArrowException) as e:  # UnicodeDecodeError is a ValueError
        raise SDiTError(f"{path} is not a readable metadata file ({e}); fix or remove it") from None


def _metadata_rows(path: Path, columns: list[str], start: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """(position, row) for rows at or after `start`, streamed; skipped lines are counted, not parsed."""
    if path.suffix == ".parquet":
        yield from _parquet_rows(pq.ParquetFile(path), columns, start)
        return
    with path.open(encoding="utf-8-sig", newline="") as f:
        if path.suffix == ".csv":
            yield from ((i, row) for i, row in enumerate(csv.DictReader(f)) if i >= start)
            return
        lines = (line for line in f if line.strip())
        for i, line in enumerate(lines):
            if i >= start:
                try:
                    yield i, json.loads(line)
                except ValueError:
                    raise SDiTError(f"{path}: record {i} is not valid JSON; fix the line and rerun") from None


# ---------------------------------------------------------------------------------------------
# Parquet (Hugging Face datasets layout)
# ---------------------------------------------------------------------------------------------


@dataclass
class ParquetSource(_Stream):
    """Parquet files with an image column (struct of bytes and path, or plain binary) and a caption column."""

    location: str
    files: tuple[str, ...]
    base: str  # ids are "<file relative to base>:<row>"
    image_column: str
    caption_column: str
    id_column: str | None
    # False: items name their (file, row) and carry no image; `parquet_images` reads a batch of them where the image
    # is needed (an encode worker), so that whoever plans the work reads ids and captions alone.
    images: bool = True
    format: str = field(default="parquet", init=False)

    def num_items(self) -> int:
        total = 0
        for file in self.files:  # footers only
            with _open_binary(file) as f:
                total += pq.ParquetFile(f).metadata.num_rows
        return total

    def iter_from(self, start: int) -> Iterator[SourceItem]:
        columns = [self.image_column] if self.images else []
        columns += [self.caption_column] + ([self.id_column] if self.id_column else [])
        offset = 0  # position of the file's first row
        for file in self.files:
            with _open_binary(file) as f:
                parquet = pq.ParquetFile(f)
                rows = parquet.metadata.num_rows
                if offset + rows > start:  # whole files before `start` cost one footer read
                    for row, record in _parquet_rows(parquet, columns, max(0, start - offset)):
                        yield self._item(offset + row, file, row, record)
            offset += rows

    def _item(self, position: int, file: str, row: int, record: dict[str, Any]) -> SourceItem:
        raw_id = record.get(self.id_column) if self.id_column else None
        id_ = str(raw_id) if raw_id is not None else f"{posixpath.relpath(_absolute(file), self.base)}:{row}"
        caption = _clean_caption(record[self.caption_column])
        if not self.images:
            return SourceItem(position, id_, caption, image_at=(file, self.image_column, row))
        data, path = _parquet_image(file, record[self.image_column])
        return SourceItem(position, id_, caption, data=data, path=path)


def _parquet_image(file: str, image: Any) -> tuple[bytes | None, str | None]:
    """(bytes, path) of an image cell: a struct of bytes and path, or plain binary; an image stored by reference
    (no bytes) is a path relative to the Parquet file."""
    data, path = (image.get("bytes"), image.get("path")) if isinstance(image, dict) else (image, None)
    if data is None and path:
        folder = posixpath.dirname(file) if remote(file) else os.path.dirname(os.path.abspath(file))
        path = posixpath.join(folder, path) if remote(file) else os.path.join(folder, path)
    return data, path


def parquet_images(items: list[SourceItem]) -> list[SourceItem]:
    """`items` with the images their `image_at` names read in: per file, each row group that holds some of them
    read once, image column alone. Items that carry their image already pass unchanged."""
    wanted: dict[tuple[str, str], set[int]] = {}
    for item in items:
        if item.image_at is not None:
            file, column, row = item.image_at
            wanted.setdefault((file, column), set()).add(row)
    cells: dict[tuple[str, str, int], Any] = {}
    for (file, image_column), rows in wanted.items():
        with _open_binary(file) as f:
            parquet = pq.ParquetFile(f)
            sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
            firsts = list(itertools.accumulate(sizes, initial=0))
            by_group: dict[int, list[int]] = {}
            for r in rows:
                by_group.setdefault(bisect.bisect_right(firsts, r) - 1, []).append(r)
            for g, group_rows in sorted(by_group.items()):
                column = parquet.read_row_group(g, columns=[image_column]).column(image_column)
                for r in group_rows:
                    cells[file, image_column, r] = column[r - firsts[g]].as_py()
    out = []
    for item in items:
        if item.image_at is not None:
            data, path = _parquet_image(item.image_at[0], cells[item.image_at])
            item = dataclasses.replace(item, data=data, path=path, image_at=None)
        out.append(item)
    return out


def _check_parquet(file: str, image_column: str, caption_column: str, id_column: str | None) -> None:
    try:
        with _open_binary(file) as f:
            schema = pq.ParquetFile(f).schema_arrow
    except (pa.ArrowException, OSError) as e:
        raise SDiTError(f"{file} is not a readable Parquet file ({e}); remove or replace it") from None
    options = {image_column: "--image-column", caption_column: "--caption-column", id_column: "--id-column"}
    for column, option in options.items():
        if column is not None and column not in schema.names:
            _missing_column(column, schema.names, file, option)
    image_type = schema.field(image_column).type
    is_struct = pa.types.is_struct(image_type) and image_type.get_field_index("bytes") >= 0
    if not (is_struct or pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)):
        raise SDiTError(
            f"column {image_column!r} of {file} is {image_type}, not image bytes (a struct with 'bytes', "
            "or binary); pick the image column with --image-column"
        )


def _parquet_rows(parquet: pq.ParquetFile, columns: list[str], start: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row, record) for rows >= start, one small batch in memory at a time.

    Row groups wholly before `start` are skipped from the footer's metadata without reading
    them; within the first group read, earlier rows are sliced off before conversion.
    """
    first_row, groups = 0, []
    for g in range(parquet.num_row_groups):
        n = parquet.metadata.row_group(g).num_rows
        if groups or first_row + n > start:
            groups.append(g)
        else:
            first_row += n
    row = first_row
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=groups, columns=columns):
        skip = min(max(0, start - row), batch.num_rows)
        values = {name: batch.column(name).slice(skip).to_pylist() for name in columns}
        for i in range(batch.num_rows - skip):
            yield row + skip + i, {name: values[name][i] for name in columns}
        row += batch.num_rows


def _missing_column(column: str, existing: list[str], where: str, option: str | None) -> None:
    hint = f"; choose one with {option}" if option else ""
    raise SDiTError(f"no column {column!r} in {where} (columns: {', '.join(existing)}){hint}")


# ---------------------------------------------------------------------------------------------
# Webdataset / img2dataset tar shards
# ---------------------------------------------------------------------------------------------


@dataclass
class TarSource(_Stream):
    """Tar shards of KEY.jpg|png|webp with KEY.txt or KEY.json, streamed one key at a time."""

    location: str
    shards: tuple[str, ...]
    caption_key: str | None
    format: str = field(default="webdataset", init=False)

    def iter_from(self, start: int) -> Iterator[SourceItem]:
        position = 0
        for shard in self.shards:
            for item in tar_items(shard, self.caption_key, first=position, start=start):
                position = item.position + 1
                if item.position >= start:
                    yield item


def tar_items(shard: str, caption_key: str | None, first: int = 0, start: int = 0) -> Iterator[SourceItem]:
    """The items of one tar shard, at positions from `first`; those before `start` come without image or caption,
    unread."""
    for position, (key, files) in enumerate(_tar_records(shard, read_from=start - first), start=first):
        image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
        yield SourceItem(position, key, _tar_caption(files, caption_key), data=image)


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile ends an archive quietly at a cut or garbled header; a shard cut short must fail instead."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EmptyHeaderError:
            raise tarfile.ReadError(f"ends at byte {tar.offset} without an end-of-archive marker") from None
        except (tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as e:
            raise tarfile.ReadError(f"{e} at byte {tar.offset}") from None


def _tar_records(shard: str, read_from: int) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per key in shard order; keys before `read_from` are yielded empty, unread.

    Members of one key are adjacent in webdataset shards, so a key is complete when the next one
    starts; only that key's wanted members are ever held.
    """
    wanted = {*IMAGE_EXTENSIONS, "txt", "json"}
    key: str | None = None
    files: dict[str, bytes] = {}
    count = 0
    try:
        with _open_binary(shard) as f, tarfile.open(fileobj=f, mode="r|*", tarinfo=_StrictTarInfo) as tar:
            for member in tar:
                tar.members = []  # TarFile keeps every header it has read; a stream needs none of them
                match = _TAR_MEMBER.match(member.name.removeprefix("./"))
                if not member.isfile() or not match:
                    continue
                if match[1] != key:
                    if key is not None:
                        yield key, files
                        count += 1
                    key, files = match[1], {}
                ext = match[2].lower()
                if count >= read_from and ext in wanted and (extracted := tar.extractfile(member)):
                    files[ext] = extracted.read()
            if key is not None:
                yield key, files
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise SDiTError(f"{shard} is not a readable tar shard ({e}); re-create or remove it, then rerun") from None


def _tar_caption(files: dict[str, bytes], caption_key: str | None) -> str | None:
    """KEY.txt, or the caption field of KEY.json (caption_key, else "caption" then "text")."""
    if "txt" in files and not (caption_key and "json" in files):
        return _clean_caption(files["txt"])
    if "json" not in files:
        return None
    try:
        meta = json.loads(files["json"])
    except ValueError:
        return None
    keys = [caption_key] if caption_key else ["caption", "text"]
    values = [meta.get(k) for k in keys] if isinstance(meta, dict) else []
    return _clean_caption(next((v for v in values if v is not None), None))
