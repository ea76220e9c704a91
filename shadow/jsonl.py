"""Append-only JSON-lines files that survive crashes: whole lines only, torn tails tolerated.

Writers append one complete line per record with unbuffered writes (so a crash of the process loses
nothing written); `sync()` fsyncs at commit points (a checkpoint committed, a decision taken) so a
crash of the machine loses nothing before them either. Readers skip a torn last line (a crash
mid-write) instead of failing.

`jsonable` turns a record's values into what JSON can hold, the one way every writer does it.
"""

from __future__ import annotations

import json
import math
import os
from enum import Enum
from pathlib import Path
from typing import Any, Iterator


def jsonable(value: Any) -> Any:
    """JSON-ready data: non-finite floats become strings ("nan", "inf", "-inf"; JSON has none, and a
    diverged step must stay a valid row), enums their values, tuples lists, nested dicts and lists too."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


class JsonlWriter:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write_line(self, line: str) -> None:
        """Append one serialized record, whole or not at all.

        On a failed write (a full disk) the file is cut back to where the line began, so the log never
        ends in half a record, and the error names the file.
        """
        if "\n" in line:
            raise ValueError("a JSON-lines record must not contain a newline")
        data = (line + "\n").encode("utf-8")
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            written = 0
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError as exc:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass
            raise OSError(exc.errno, f"cannot append to {self.path}: {exc.strerror} "
                          "(is the disk of the run directory full?)") from None

    def write(self, record: dict) -> None:
        self.write_line(json.dumps(record, sort_keys=True))

    def sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            try:
                self.sync()
            finally:
                os.close(self._fd)
                self._fd = None

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
