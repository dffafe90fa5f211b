"""Files that are rewritten are replaced whole.

A reader, or a rerun after a kill, sees the old file or the new one, never part of one: the new content goes to
a hidden sibling first (same folder, same suffix, so PIL and matplotlib still know the format), which then
replaces the file in one rename. Stores on fsspec URLs have their own (`sdit.store.Store.write_json`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
