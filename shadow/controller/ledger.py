"""The main job's checkpoints as the controller knows them: which are committed on the current lineage,
which are pinned and why, and how many saves in a row failed.

The main trainer writes checkpoints and applies retention; the ledger hears of each outcome with the
chunk that produced it, and holds pins on the checkpoints the run still needs: each running replay's
start (`replay-N`) and the checkpoint a rollback would return to (`rollback-target`). Without Ray: the
store is reached through its small interface (`pin`, `unpin`, `pins`, `delete`).
"""

from __future__ import annotations

from typing import Iterable

from shadow.checkpoint import CheckpointError, CheckpointStore
from shadow.controller.callbacks import EventLog
from shadow.controller.committed import CommittedSteps
from shadow.controller.errors import ControllerError

ROLLBACK_PIN = "rollback-target"


class CheckpointLedger:
    def __init__(self, store: CheckpointStore, events: EventLog, *, max_failures_in_row: int,
                 committed: Iterable[int] = (), waits_s: Iterable[float] = ()):
        self.store = store
        self.events = events
        self.max_failures_in_row = max_failures_in_row
        self.committed = CommittedSteps(committed)
        self.num_failures_in_row = 0  # failed saves since the last commit
        self.rollback_pin: int | None = None  # the step pinned as `rollback-target`
        self.waits_s = list(waits_s)  # per commit of the run, the loop's wait for the save before it

    def record(self, checkpoint_events: list[dict], lineage: int) -> None:
        """Outcomes reported by the main trainer (committed, deleted by retention, failed), in order."""
        for event in checkpoint_events:
            payload = {k: v for k, v in event.items() if k != "event"}
            if event["event"] == "checkpoint_committed":
                self.num_failures_in_row = 0
                self.committed.add(payload["step"])
                self.waits_s.append(payload.get("wait_s", 0.0))
                self.events.emit("checkpoint_committed", lineage=lineage, **payload)
                self.events.commit_point()
            elif event["event"] == "checkpoint_deleted":
                self.committed.discard(payload["step"])
                self.events.emit("checkpoint_deleted", **payload)
            else:
                self._failed(payload, lineage)

    def _failed(self, payload: dict, lineage: int) -> None:
        """A failed save: training goes on from memory (replays use older checkpoints) until
        `run.max_checkpoint_failures` saves in a row failed; then the run stops rather than train on
        with nothing recoverable past the last commit."""
        self.num_failures_in_row += payload.get("stage") == "save"
        limit = self.max_failures_in_row
        self.events.emit("checkpoint_failed", lineage=lineage, failures_in_row=self.num_failures_in_row,
                         limit=limit, **payload)
        self.events.commit_point()
        if self.num_failures_in_row >= limit:
            raise ControllerError(
                f"{self.num_failures_in_row} checkpoint saves failed in a row (run.max_checkpoint_failures="
                f"{limit}); last error: {payload['error']}. The last committed checkpoint is step "
                f"{self.committed.newest()}; fix the store and continue with `shadow run --resume`")

    def reject(self, step: int, error: str) -> None:
        """A committed checkpoint failed to load: it no longer counts."""
        self.events.emit("checkpoint_rejected", step=step, error=error)
        self.committed.discard(step)

    def pin(self, step: int, reason: str) -> CheckpointError | None:
        """Keep `step` from retention; the error if the store refused (the step then no longer counts)."""
        try:
            self.store.pin(step, reason)
        except CheckpointError as exc:
            self.committed.discard(step)
            return exc
        return None

    def unpin(self, step: int, reason: str) -> None:
        """A pin left behind (store unreachable) only keeps a checkpoint longer: report it, go on."""
        try:
            self.store.unpin(step, reason)
        except CheckpointError as exc:
            self.events.emit("unpin_failed", step=step, reason=reason, error=str(exc))

    def unpin_replays_of_a_dead_driver(self) -> None:
        """On resume: the replays that held pins died with the old driver."""
        for step, reasons in self.store.pins().items():
            for reason in reasons:
                if reason.startswith("replay-"):
                    self.unpin(step, reason)

    def pin_rollback_target(self, target: int | None) -> None:
        """Keep the checkpoint a rollback would return to (the last verified window's start)."""
        if target == self.rollback_pin or target not in self.committed:
            return
        if self.rollback_pin is not None:
            self.unpin(self.rollback_pin, ROLLBACK_PIN)
        try:
            self.store.pin(target, ROLLBACK_PIN)
        except CheckpointError as exc:
            self.events.emit("pin_failed", step=target, reason=ROLLBACK_PIN, error=str(exc))
            return
        self.rollback_pin = target

    def abandon_after(self, step: int, why: str) -> None:
        """A rollback left the checkpoints after `step` on a dead branch: they must not count as latest
        or for retention. One pinned by a replay still running stays until that step is saved again."""
        for abandoned in self.committed.drop_after(step):
            try:
                self.store.delete(abandoned)
            except CheckpointError as exc:
                self.events.emit("checkpoint_kept", step=abandoned, reason=str(exc))
                continue
            self.events.emit("checkpoint_deleted", step=abandoned, uri=self.store.step_uri(abandoned),
                             reason=f"abandoned by {why}")
