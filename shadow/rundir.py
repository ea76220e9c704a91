"""The run directory: the local record of a run (see DESIGN.md, "Run directory").

`trajectory.jsonl` (one StepRecord per step), `events.jsonl` (one event per line) and `summary.json`
(written atomically). Everything a person or `--resume` needs is here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from shadow.jsonl import JsonlWriter, read_jsonl
from shadow.records import StepRecord

TRAJECTORY = "trajectory.jsonl"
EVENTS = "events.jsonl"
SUMMARY = "summary.json"


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._trajectory: JsonlWriter | None = None
        self._events: JsonlWriter | None = None

    @property
    def name(self) -> str:
        return self.path.name

    def append_record(self, record: StepRecord) -> None:
        if self._trajectory is None:
            self._trajectory = JsonlWriter(self.path / TRAJECTORY)
        self._trajectory.write_line(record.to_json())

    def write_event(self, event: dict) -> None:
        if self._events is None:
            self._events = JsonlWriter(self.path / EVENTS)
        self._events.write(event)

    def sync(self) -> None:
        """fsync the logs at a commit point (checkpoint committed, decision taken)."""
        for writer in (self._trajectory, self._events):
            if writer is not None:
                writer.sync()

    def write_summary(self, summary: dict) -> None:
        write_json_atomic(self.path / SUMMARY, summary)

    def close(self) -> None:
        for writer in (self._trajectory, self._events):
            if writer is not None:
                writer.close()


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_events(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / EVENTS
    return list(read_jsonl(path)) if path.exists() else []


def read_history(run_dir: str | os.PathLike) -> tuple[list[StepRecord], list[StepRecord]]:
    """(kept, discarded) rows of a main job's trajectory.

    A rollback, adopted replay or restart starts a new lineage from some step; rows of older lineages
    at or after that step were trained but are not part of the run's history. The kept rows have
    each step exactly once, in order.
    """
    rows = read_trajectory(run_dir)
    kept: dict[int, StepRecord] = {}
    discarded: list[StepRecord] = []
    for row in rows:  # file order: a later lineage's row replaces an earlier one for the same step
        if row.step in kept:
            discarded.append(kept[row.step])
        kept[row.step] = row
        for step in [s for s in kept if s > row.step and kept[s].lineage < row.lineage]:
            discarded.append(kept.pop(step))
    return [kept[s] for s in sorted(kept)], discarded


def read_trajectory(path: str | os.PathLike) -> list[StepRecord]:
    """Rows of a trajectory file (or of `<run dir>/trajectory.jsonl`); a torn last line is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / TRAJECTORY
    return [StepRecord.from_dict(row) for row in read_jsonl(path)]
