"""Side effects of a run, as callbacks with no-op defaults: the controller never writes files itself.

`RunDirWriter` keeps the run directory (events, trajectory, replay trajectories, summary); the
MLflow tracker and the console progress line are further callbacks beside it.
"""

from __future__ import annotations

import time

from shadow.records import StepRecord
from shadow.rundir import RunDir, write_json_atomic


class RunCallback:
    def on_event(self, event: dict) -> None:
        """Every event the controller emits (also written to events.jsonl)."""

    def on_main_records(self, records: list[StepRecord]) -> None:
        """Rows of the main job as chunks finish (and rows adopted from a replay)."""

    def on_replay_finished(self, name: str, records: list[StepRecord]) -> None:
        """A replay's rows; `name` is unique per replay, e.g. `verify-000000100`."""

    def on_commit_point(self) -> None:
        """A checkpoint was committed or a decision taken: make what was written durable."""

    def on_policy(self, version: int, policy_yaml: str) -> None:
        """A policy version came into force (1 at the start, then one per accepted reload)."""

    def on_ending(self) -> None:
        """The run is about to end and events can still be written: settle background work whose
        outcome belongs in the event log."""

    def on_finish(self, summary: dict) -> None:
        """The run ended (finished, failed or interrupted) with this summary."""


class RunDirWriter(RunCallback):
    def __init__(self, run_dir: RunDir):
        self.run_dir = run_dir
        (run_dir.path / "replays").mkdir(exist_ok=True)

    def on_event(self, event: dict) -> None:
        self.run_dir.write_event(event)

    def on_main_records(self, records: list[StepRecord]) -> None:
        for record in records:
            self.run_dir.append_record(record)

    def on_replay_finished(self, name: str, records: list[StepRecord]) -> None:
        path = self.run_dir.path / "replays" / f"{name}.jsonl"
        path.write_text("".join(record.to_json() + "\n" for record in records))

    def on_commit_point(self) -> None:
        self.run_dir.sync()

    def on_policy(self, version: int, policy_yaml: str) -> None:
        (self.run_dir.path / f"policy-v{version}.yaml").write_text(policy_yaml)

    def on_finish(self, summary: dict) -> None:
        write_json_atomic(self.run_dir.path / "summary.json", summary)
        self.run_dir.close()


class EventLog:
    """Where every part of the controller reports: each event goes to every callback, stamped with the
    time; a commit point asks them to make what they wrote durable."""

    def __init__(self, callbacks: list[RunCallback]):
        self.callbacks = callbacks

    def emit(self, event_name: str, /, **payload) -> dict:
        event = {"event": event_name, "time_unix": round(time.time(), 3), **payload}
        for callback in self.callbacks:
            callback.on_event(event)
        return event

    def commit_point(self) -> None:
        for callback in self.callbacks:
            callback.on_commit_point()
