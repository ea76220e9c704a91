"""Write-ahead log of tracking operations: every op is on disk before MLflow is asked to store it.

The controller thread appends ops (`mlflow-spool.jsonl`); the worker thread sends them in order and
acknowledges them (`mlflow-spool.acked` holds the last acknowledged sequence number) once MLflow has
them. So whatever MLflow has not confirmed survives an outage and a driver crash, and is sent
(backfilled) when the server answers again, or by the next process that opens the run directory
(`shadow run --resume`, `shadow report`). Re-sending an op is harmless: metrics keep the timestamp
they were spooled with and MLflow drops a metric identical in key, value, step and timestamp; runs
are looked up by tag before one is created; params and tags are set to the same values.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from itertools import islice
from pathlib import Path

from shadow.jsonl import JsonlWriter, read_jsonl

SPOOL_FILE = "mlflow-spool.jsonl"
ACKED_FILE = "mlflow-spool.acked"
COMPACT_BYTES = 1 << 20  # once everything is acknowledged, a spool larger than this starts over empty


class Spool:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / SPOOL_FILE
        self._acked_path = Path(run_dir) / ACKED_FILE
        self._lock = threading.Lock()
        self._acked = int(self._acked_path.read_text()) if self._acked_path.exists() else 0
        on_disk = list(read_jsonl(self.path)) if self.path.exists() else []
        self._pending = deque(op for op in on_disk if op["seq"] > self._acked)
        self._next_seq = max([self._acked, *(op["seq"] for op in on_disk)]) + 1
        self._writer = JsonlWriter(self.path)

    def append(self, op: dict) -> int:
        """Write one op (called on the controller thread: a line write, no network)."""
        with self._lock:
            op = {"seq": self._next_seq, **op}
            self._next_seq += 1
            self._writer.write(op)
            self._pending.append(op)
            return op["seq"]

    def pending(self, limit: int) -> list[dict]:
        """The oldest ops not yet acknowledged, in order."""
        with self._lock:
            return list(islice(self._pending, limit))

    def num_pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def ack(self, seq: int) -> None:
        """MLflow has every op up to `seq`."""
        with self._lock:
            while self._pending and self._pending[0]["seq"] <= seq:
                self._pending.popleft()
            self._acked = max(self._acked, seq)
            tmp = self._acked_path.with_name(f".{self._acked_path.name}.tmp")
            tmp.write_text(str(self._acked))
            os.replace(tmp, self._acked_path)
            if not self._pending and self.path.stat().st_size > COMPACT_BYTES:
                self._writer.close()  # every line is acknowledged (and the ack is on disk): start over
                self.path.write_bytes(b"")
                self._writer = JsonlWriter(self.path)

    def sync(self) -> None:
        with self._lock:
            self._writer.sync()

    def close(self) -> None:
        with self._lock:
            self._writer.close()
