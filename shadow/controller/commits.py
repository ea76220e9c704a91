"""Checkpoint commits and failures as the controller sees them, and the pins that keep
rollback targets and replay sources from retention."""

from __future__ import annotations

from shadow.checkpoint import CheckpointError
from shadow.controller.errors import ControllerError


class CommitsMixin:
    """Part of `Controller` (shadow/controller/controller.py); reads and writes its state."""

    def _on_checkpoint_events(self, events: list[dict]) -> None:
        for event in events:
            payload = {k: v for k, v in event.items() if k != "event"}
            if event["event"] == "checkpoint_committed":
                self.checkpoint_failures_in_row = 0
                self._on_commit(payload)
            elif event["event"] == "checkpoint_deleted":
                self.committed.discard(event["step"])
                self.emit("checkpoint_deleted", **payload)
            else:
                self._on_checkpoint_failed(payload)

    def _on_checkpoint_failed(self, payload: dict) -> None:
        """A failed save: training goes on from memory (replays use older checkpoints) until
        `run.max_checkpoint_failures` saves in a row failed; then the run stops rather than train on
        with nothing recoverable past the last commit."""
        self.checkpoint_failures_in_row += payload.get("stage") == "save"
        limit = self.job.run.max_checkpoint_failures
        self.emit("checkpoint_failed", lineage=self.state.lineage, failures_in_row=self.checkpoint_failures_in_row,
                  limit=limit, **payload)
        self._commit_point()
        if self.checkpoint_failures_in_row >= limit:
            raise ControllerError(
                f"{self.checkpoint_failures_in_row} checkpoint saves failed in a row (run.max_checkpoint_failures="
                f"{limit}); last error: {payload['error']}. The last committed checkpoint is step "
                f"{self.committed.newest()}; fix the store and continue with `shadow run --resume`")

    def _on_commit(self, info: dict) -> None:
        self.committed.add(info["step"])
        self.checkpoint_waits_s.append(info.get("wait_s", 0.0))
        self.emit("checkpoint_committed", lineage=self.state.lineage, **info)
        self._commit_point()

    def _pin_rollback_target(self) -> None:
        """Keep the checkpoint a rollback would return to (the last verified window's start)."""
        target = self.policy_state.last_verified_step
        if target == self.rollback_pin or target not in self.committed:
            return
        if self.rollback_pin is not None:
            self._unpin(self.rollback_pin, "rollback-target")
        try:
            self.store.pin(target, "rollback-target")
        except CheckpointError as exc:
            self.emit("pin_failed", step=target, reason="rollback-target", error=str(exc))
            return
        self.rollback_pin = target

    def _unpin(self, step: int, reason: str) -> None:
        """A pin left behind (store unreachable) only keeps a checkpoint longer: report it, go on."""
        try:
            self.store.unpin(step, reason)
        except CheckpointError as exc:
            self.emit("unpin_failed", step=step, reason=reason, error=str(exc))
