"""A one-line progress bar on a terminal, occasional plain lines otherwise (logs, Ray job output)."""

from __future__ import annotations

import sys
import time

from shadow.records import StepRecord


class Progress:
    def __init__(self, first_step: int, until_step: int, label: str, stream=None):
        self.first_step = first_step
        self.until_step = until_step
        self.label = label
        self.stream = stream or sys.stderr
        self.is_tty = self.stream.isatty()
        self.started = time.perf_counter()
        self._last_line_at = 0.0

    def update(self, record: StepRecord, extra: str = "") -> None:
        done = record.step + 1 - self.first_step
        total = max(1, self.until_step - self.first_step)
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done * (total - done) if done else 0.0
        text = (
            f"{self.label} step {record.step + 1}/{self.until_step} loss {record.loss:.4f} "
            f"{record.precision} {record.step_time_s * 1000:.0f} ms/step eta {eta:.0f}s{extra}"
        )
        if self.is_tty:
            width = 24
            filled = int(width * done / total)
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\x1b[K")
            if done == total:
                self.stream.write("\n")
            self.stream.flush()
        elif done == total or time.perf_counter() - self._last_line_at >= 10.0:
            self._last_line_at = time.perf_counter()
            print(text, file=self.stream, flush=True)
