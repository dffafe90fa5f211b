"""Files that are rewritten are replaced whole.

A reader, or a rerun after a kill, sees the old file or the new one, never part of one: the new content goes to
a hidden sibling first (same folder, same suffix, so PIL and matplotlib still know the format), which then
replaces the file in one rename. Stores on fsspec URLs have their own (`sdit.store.Store.write_json`).

A folder a stage writes into (`--out`) is checked before any work: a file in its place is refused in one line.
"""

from __future__ import annotations

import os
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
