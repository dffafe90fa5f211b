"""Files that are rewritten are replaced whole.

A reader, or a rerun after a kill, sees the old file or the new one, never part of one: the new content goes to
a hidden sibling first (same folder, same suffix, so PIL and matplotlib still know the format), which then
replaces the file in one rename. Stores on fsspec URLs have their own (`sdit.store.Store.write_json`).

A folder written whole (a checkpoint, a run folder's student, a teacher folder) goes the same way: written under a
hidden temporary name, then swapped in with two renames (the old folder aside, the new one in its place).
`recover_folder` undoes a kill between the two: it puts the old folder back.

A folder a stage writes into (`--out`) is checked before any work: a file in its place is refused in one line.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sdit.errors import SDiTError


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on leaving the block without an error it replaces `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def replace_text(path: str | Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def writing_folder(folder: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `folder` to write; on leaving the block without an error it replaces
    `folder` whole (`replace_folder`). On an error the temporary folder is removed and `folder` is untouched."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_folder(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(tmp: str | Path, folder: str | Path) -> Path:
    """Move the written folder `tmp` to `folder`: the old `folder` (if any) goes aside, `tmp` takes its place, then
    the old one is deleted. A kill between the two renames leaves no `folder`: `recover_folder` puts the old back."""
    folder, old = Path(folder), _aside(folder)
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def recover_folder(folder: str | Path) -> Path:
    """`folder` as the last whole write left it: where `replace_folder` was killed between its renames (the old
    folder aside, the new one not in place), the old one is put back."""
    folder, old = Path(folder), _aside(folder)
    if not folder.exists() and old.exists():
        os.replace(old, folder)
    return folder


def _aside(folder: str | Path) -> Path:
    return Path(folder).with_name(f".{Path(folder).name}.old")


def check_folder(path: str | Path, option: str = "--out") -> Path:
    """`path` as a folder to write into, refused in one line when it, or a folder above it, is a file."""
    path = Path(path)
    for place in (path, *path.parents):
        if place.exists():
            if not place.is_dir():
                where = "is a file" if place == path else f"is inside {place}, a file"
                raise SDiTError(f"{option} {path} {where}; give a folder")
            break
    return path
