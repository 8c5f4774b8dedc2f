"""Per-problem rows streamed to a file as they arrive: JSON lines (`.jsonl`) or Parquet (`.parquet`).

Rows are keyed by their problem `id`: a row whose id was already written (a retried task that finished twice) is
dropped, so every problem is in the file exactly once, in the order the job yields them (problem order).
"""

from __future__ import annotations

import json
import os

FORMATS = (".jsonl", ".parquet")


def check_out_path(path: str | None) -> None:
    """Before any work: a known extension and a folder that exists."""
    if path is None:
        return
    if not path.endswith(FORMATS):
        raise ValueError(f"out: expected a path ending in {' or '.join(FORMATS)}, got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"out: the folder {folder} does not exist")


class RowWriter:
    """`write(row)` (a dict with an int "id"), then `close()`; Parquet rows go out in row groups of `group` rows."""

    def __init__(self, path: str | None, *, group: int = 64):
        check_out_path(path)
        self.path, self.group = path, group
        self.seen: set[int] = set()
        self.duplicates = 0
        self._pending: list[dict] = []
        self._file = self._parquet = None
        if path is not None and path.endswith(".jsonl"):
            self._file = open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, row: dict) -> bool:
        """False (and nothing written) for an id seen before."""
        if row["id"] in self.seen:
            self.duplicates += 1
            return False
        self.seen.add(row["id"])
        if self._file is not None:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        elif self.path is not None:
            self._pending.append(row)
            if len(self._pending) >= self.group:
                self._flush_parquet()
        return True

    def _flush_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._pending:
            return
        table = pa.Table.from_pylist(self._pending)
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self.path, table.schema)
        self._parquet.write_table(table.cast(self._parquet.schema))
        self._pending = []

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        elif self.path is not None:
            self._flush_parquet()
            if self._parquet is not None:
                self._parquet.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_rows(path: str) -> list[dict]:
    """The rows of a file written by `RowWriter`, in file order."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]
