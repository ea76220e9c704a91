"""Persist checkpoints off the training loop: it blocks only for the in-memory snapshot.

`AsyncPersister.submit(snapshot)` hands a staged CPU snapshot (`Trainer.snapshot()`: this rank's shards)
to one background thread that writes or uploads them, hashing as it goes; with several ranks every rank
has a persister, their threads run the collective save together over a process group of their own
(never the training one), and the coordinator commits the manifest. The leader then applies retention. Results
come back as events (`CommitInfo`, `CheckpointFailed`, `CheckpointDeleted`) from `poll()`; a failure is
an event, never an exception in the training loop. `wait()` and `close()` drain.

At most one snapshot is in flight. **When the next save comes due while the previous one is still
being written, `submit` blocks until that one has finished** (as torch.distributed.checkpoint's
`async_save` does when its previous future is pending). The alternatives are worse: skipping the save
would silently widen the gap to the last recoverable state (and to the replay start the controller
planned on), and queueing would hold several full copies of the model and optimizer in host memory.
The wait is returned by `submit` and carried by the save's `CommitInfo.wait_s` (so it reaches the
`checkpoint_committed` event and the run's summary): a wait that is often non-zero means the
checkpoint interval is shorter than the time to persist one.

`SyncPersister` has the same interface and does the work inside `submit`: the reference point for the
benchmark (`bench/checkpoint_blocking.py`) and for callers that need the commit before going on.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

from shadow.checkpoint.events import CheckpointEvent, CheckpointFailed
from shadow.checkpoint.errors import CheckpointError
from shadow.checkpoint.store import CheckpointStore
from shadow.snapshot import Snapshot


def persist(store: CheckpointStore, snapshot: Snapshot, wait_s: float = 0.0, process_group=None,
            leader: bool = True) -> list[CheckpointEvent]:
    """Save, then (on the leader) apply retention; every outcome becomes an event. `wait_s`: how long the
    loop waited for the previous save before handing over this snapshot (reported with the commit)."""
    try:
        events: list[CheckpointEvent] = [replace(store.save(snapshot, process_group), wait_s=wait_s)]
    except Exception as exc:  # reported as an event: the training loop must go on
        return [CheckpointFailed(snapshot.step, store.step_uri(snapshot.step), _describe(exc))]
    if not leader:
        return events
    try:
        events += store.prune()
    except Exception as exc:
        events.append(CheckpointFailed(snapshot.step, store.run_uri, _describe(exc), stage="retention"))
    return events


def _describe(exc: Exception) -> str:
    # store errors already name the URI and file; anything else is a bug worth its type name
    return str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"


class SyncPersister:
    """Persist inside `submit`, on the caller's thread."""

    def __init__(self, store: CheckpointStore, process_group=None, leader: bool = True):
        self.store = store
        self.process_group = process_group  # the ranks that save together (None: this process alone)
        self.leader = leader  # applies retention
        self._events: list[CheckpointEvent] = []
        self._events_lock = threading.Lock()

    def submit(self, snapshot: Snapshot) -> float:
        """Persist `snapshot`; returns the seconds spent waiting for an earlier save (always 0 here)."""
        self._report(persist(self.store, snapshot, 0.0, self.process_group, self.leader))
        return 0.0

    def poll(self) -> list[CheckpointEvent]:
        """Events of saves finished since the last poll, in order; never blocks."""
        with self._events_lock:
            events, self._events = self._events, []
        return events

    def wait(self) -> None:
        """Block until no save is in flight."""

    def close(self) -> list[CheckpointEvent]:
        """Drain, release the worker, and return the events not yet polled."""
        self.wait()
        return self.poll()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _report(self, events: list[CheckpointEvent]) -> None:
        with self._events_lock:
            self._events.extend(events)


class AsyncPersister(SyncPersister):
    """Persist on one background thread; at most one snapshot in flight (see the module docstring)."""

    def __init__(self, store: CheckpointStore, process_group=None, leader: bool = True):
        super().__init__(store, process_group, leader)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-persist")
        self._in_flight: Future | None = None

    @property
    def in_flight(self) -> bool:
        return self._in_flight is not None and not self._in_flight.done()

    def submit(self, snapshot: Snapshot) -> float:
        """Start persisting `snapshot` (the caller must not modify it afterwards).

        Blocks first until the previous save has finished; returns the seconds spent waiting for it
        (0.0 when it had already finished), which its `CommitInfo.wait_s` reports too.
        """
        started = time.perf_counter()
        busy = self.in_flight
        self.wait()
        waited_s = time.perf_counter() - started if busy else 0.0
        self._in_flight = self._executor.submit(lambda: self._report(
            persist(self.store, snapshot, waited_s, self.process_group, self.leader)))
        return waited_s

    def wait(self) -> None:
        if self._in_flight is not None:
            self._in_flight.result()  # persist() turns every error into an event
            self._in_flight = None

    def close(self) -> list[CheckpointEvent]:
        self.wait()
        self._executor.shutdown(wait=True)
        return self.poll()
