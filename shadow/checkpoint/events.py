"""What a store or persister reports about checkpoints, as data the controller logs as events.

Each class has a `kind` (the `event` name in `events.jsonl`) and `to_event()` for its payload. Error
texts come from store errors, which name the URI and the file and never carry credentials.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar


class _Event:
    """The `events.jsonl` line of a report: its kind and its fields."""

    kind: ClassVar[str]

    def to_event(self) -> dict:
        return {"event": self.kind, **asdict(self)}


@dataclass(frozen=True)
class CommitInfo(_Event):
    """A checkpoint whose manifest has been written: readers can load it from now on."""

    kind: ClassVar[str] = "checkpoint_committed"
    step: int
    uri: str
    num_bytes: int
    seconds: float  # encoding, hashing and writing (on the persister's thread when async)
    wait_s: float = 0.0  # the training loop's wait for the previous save to finish before this one could start


@dataclass(frozen=True)
class CheckpointFailed(_Event):
    """A save (stage "save") or a retention pass after it (stage "retention") that did not complete."""

    kind: ClassVar[str] = "checkpoint_failed"
    step: int
    uri: str
    error: str
    stage: str = "save"


@dataclass(frozen=True)
class CheckpointDeleted(_Event):
    """A checkpoint removed by retention (`keep_last`)."""

    kind: ClassVar[str] = "checkpoint_deleted"
    step: int
    uri: str
    reason: str


CheckpointEvent = CommitInfo | CheckpointFailed | CheckpointDeleted
