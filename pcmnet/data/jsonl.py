"""Append-only JSON-lines files that survive a kill at any moment.

One writer per process and file (`PartWriter`): every `append` is one write + flush + fsync, and
opening a file first cuts a last line a killed write left without its newline, so new rows never
glue onto a fragment. `read_rows` returns the complete rows and skips a torn last line. Used by
`pcmnet synth` (manifest parts) and `pcmnet caption --output` (result parts, for --resume).
File names that are not valid UTF-8 (surrogate-escaped by Python) round-trip unchanged.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

ENCODING = dict(encoding="utf-8", errors="surrogateescape")


def dumps(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False, sort_keys=True)


def cut_torn_tail(path: Path) -> None:
    """Drop a last line without its newline (a write killed half-way) before appending more."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)
        f.flush()
        os.fsync(f.fileno())


class PartWriter:
    """Append-only JSON-lines file of one process. Each `append` is one write + flush + fsync."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cut_torn_tail(self.path)
        self.file = open(self.path, "a", **ENCODING)

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        self.file.write("".join(dumps(r) + "\n" for r in rows))
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_rows(path: str | Path) -> list[dict]:
    """The complete rows of a JSON-lines file (a line cut by a kill is skipped)."""
    rows = []
    with open(path, **ENCODING) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
