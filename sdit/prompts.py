"""Text-only prompt banks: one prompt per line of a text file, or a column of a Parquet file, read as a stream of
`SourceItem`s without images (`sdit encode --prompt-bank`, `sdit eval --prompts`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from sdit.errors import SDiTError
from sdit.sources import SourceItem


class PromptSource:
    """Prompt bank items: one prompt per line of a text file, or a column of a parquet file."""

    format = "prompts"

    def __init__(self, location: str, column: str):
        self.path, self.column = Path(location), column
        if not self.path.is_file():
            raise SDiTError(f"--prompts {self.path}: no such file (a text file, one prompt a line, or a parquet file)")
        if self.path.suffix == ".parquet":
            import pyarrow.parquet as pq

            self.parquet = pq.ParquetFile(self.path)
            if column not in self.parquet.schema_arrow.names:
                raise SDiTError(f"--prompts {self.path}: no column {column!r} "
                                f"(columns: {', '.join(self.parquet.schema_arrow.names)}); set --prompt-column")

    def num_items(self) -> int:
        if self.path.suffix == ".parquet":
            return self.parquet.metadata.num_rows
        with self.path.open("rb") as f:
            return sum(1 for _ in f)

    def __iter__(self) -> Iterator[SourceItem]:
        if self.path.suffix == ".parquet":
            lines = (text for batch in self.parquet.iter_batches(batch_size=4096, columns=[self.column])
                     for text in batch.column(0).to_pylist())
        else:
            lines = (line.rstrip("\r\n") for line in self.path.open(encoding="utf-8", errors="replace"))
        for i, text in enumerate(lines):
            yield SourceItem(position=i, id=f"prompt-{i}", caption=None if text is None else text.strip())


def open_prompts(location: str, column: str = "text") -> PromptSource:
    return PromptSource(location, column)
