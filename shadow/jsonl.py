"""Append-only JSON-lines files that survive crashes: whole lines only, torn tails tolerated.

Writers append one complete line per record and flush; `sync()` fsyncs at commit points (after a
checkpoint commit, a decision). Readers skip a torn last line (a crash mid-write) instead of failing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator


class JsonlWriter:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(self.path)
        self._file = open(self.path, "a", encoding="utf-8")

    def write_line(self, line: str) -> None:
        """Append one serialized record. The line is written in one call so it is never interleaved."""
        if "\n" in line:
            raise ValueError("a JSON-lines record must not contain a newline")
        self._file.write(line + "\n")
        self._file.flush()

    def write(self, record: dict) -> None:
        self.write_line(json.dumps(record, sort_keys=True))

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self.sync()
            self._file.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _drop_torn_tail(path: Path) -> None:
    """Cut a partial last line left by a crash, so appending continues on a clean line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Yield each complete record; a torn or unparsable last line is skipped, an earlier one raises."""
    lines = Path(path).read_bytes().split(b"\n")
    last_index = len(lines) - 1
    for index, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            yield json.loads(raw)
        except json.JSONDecodeError as exc:
            is_tail = index == last_index or (index == last_index - 1 and not lines[last_index].strip())
            if is_tail:
                return
            raise ValueError(f"{path}: line {index + 1} is not valid JSON ({exc.msg})") from None
