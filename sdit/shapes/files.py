"""The shapes world on disk: a split as image and caption pairs, and a prompt list, the files `sdit encode` reads."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

from sdit.errors import SDiTError
from sdit.shapes.world import Prompt, Record

ATTRIBUTES_FILE = "attributes.jsonl"  # not metadata.jsonl: that name would make the folder an imagefolder


def write_split(records: Iterable[Record], folder: str | Path, with_attributes: bool = False) -> int:
    """Write records as `folder/000000.png` + `000000.txt`, ... (the layout `sdit encode` reads).

    The folder must be new or empty: a stale record from an earlier, longer split would otherwise
    be encoded with the new ones. With `with_attributes`, also `attributes.jsonl`, one
    {"name": ..., **attributes} line a record. Returns the number of records written.
    """
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise SDiTError(f"{folder} is not empty; write a split to a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    count = 0
    for count, record in enumerate(records, start=1):
        name = f"{count - 1:06d}"
        record.image.save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(record.caption + "\n", encoding="utf-8")
        if with_attributes:
            lines.append(json.dumps({"name": name, **asdict(record.attrs)}))
    if with_attributes:
        (folder / ATTRIBUTES_FILE).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return count


def write_prompts(prompts: Iterable[Prompt | str], path: str | Path) -> int:
    """Write one prompt a line (the text-only prompt list `sdit encode` reads). Returns the count."""
    texts = [p.text if isinstance(p, Prompt) else p for p in prompts]
    if any("\n" in t for t in texts):
        raise SDiTError("a prompt contains a line break; a prompt list holds one prompt a line")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    return len(texts)
