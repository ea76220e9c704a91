"""Rebuild a controller's position from a run directory after the driver died (`shadow run --resume`).

The event log is the source of truth: the last event carrying a `state` holds the policy state,
precision, lineage and regime consistent with every decision logged before it; `checkpoint_committed`
events say which checkpoints belong to the current lineage; `verdict` events rebuild the summary's
verdict rows. The main job continues from the newest checkpoint of its lineage that the store can load,
in a new lineage, so rows the dead driver wrote after that checkpoint become discarded history.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from shadow.checkpoint import CheckpointError, StorageError, open_store
from shadow.controller.state import RunState
from shadow.records import StepRecord
from shadow.rundir import read_events, read_history, read_trajectory
from shadow.snapshot import SnapshotLayout


class ResumeError(RuntimeError):
    """The run directory cannot be resumed; the message names what is missing."""


@dataclass
class ResumePoint:
    state: RunState  # with the new lineage and the restore point filled in
    restore_step: int
    restore_run: str
    history: list[StepRecord]  # kept rows before restore_step
    steps_lost: int  # rows the dead driver wrote after restore_step: trained again, now discarded
    rejected: list[tuple[int, str]]  # newer checkpoints of the lineage that failed verification, and why
    trained: list[StepRecord]  # every row the main job trained
    committed: set[int]
    verdict_rows: list[dict]
    trigger_rows: list[dict]
    replay_steps: dict[str, int]
    num_replays: int
    num_triggered_replays: int
    checkpoint_waits_s: list[float]  # the loop's waits for a previous save, every commit of the run so far
    replay_times: list[tuple[list[StepRecord], str, int]]  # each finished replay's rows, device and rank count


def load_resume_point(run_dir: str | Path, run: str, store_uri: str, job_hash: str,
                      layout: SnapshotLayout | None) -> ResumePoint:
    """Where the run continues: its state and the newest checkpoint of its lineage that is sound and fits
    the job (`layout`: names, shapes, dtypes, finite values; None where the job's precision backend cannot
    be built here, and the main trainer checks the checkpoint against its own model when it loads it)."""
    events = read_events(run_dir)
    started = [e for e in events if e["event"] == "run_started"]
    if not started:
        raise ResumeError(f"{run_dir}: no run_started event in events.jsonl; is this a `shadow run` directory?")
    with_state = [e for e in events if "state" in e]
    state = RunState.from_dict(with_state[-1]["state"]) if with_state else RunState(
        precision=started[0]["precision"])
    lineage_commits = sorted({e["step"] for e in events
                              if e["event"] == "checkpoint_committed" and e.get("lineage") == state.lineage})
    store = open_store(store_uri, run)
    restore_step, restore_run = None, run
    rejected: list[tuple[int, str]] = []
    for step in reversed(lineage_commits):
        try:
            store.verify(step, expected_job_hash=job_hash, layout=layout)
        except StorageError:
            raise  # the store is unreachable: falling back to an older checkpoint would be wrong
        except CheckpointError as exc:  # damaged, truncated, foreign, not fitting the job: fall back
            rejected.append((step, str(exc)))
            continue
        restore_step = step
        break
    if restore_step is None:
        if state.restore_step is None:
            raise ResumeError(f"{run_dir}: no loadable checkpoint of the main job in {store.run_uri}")
        restore_step, restore_run = state.restore_step, state.restore_run
    new_state = replace(state, lineage=state.lineage + 1, restore_step=restore_step, restore_run=restore_run)
    kept, _ = read_history(run_dir)
    verdict_events = [e for e in events if e["event"] == "verdict"]
    replay_steps: dict[str, int] = {}
    for event in events:
        if event["event"] == "replay_finished":
            replay_steps[event["precision"]] = replay_steps.get(event["precision"], 0) + event["steps"]
    return ResumePoint(
        state=new_state,
        restore_step=restore_step,
        restore_run=restore_run,
        history=[r for r in kept if r.step < restore_step],
        steps_lost=sum(1 for r in kept if r.step >= restore_step),
        rejected=rejected,
        trained=read_trajectory(run_dir),
        committed={s for s in lineage_commits if s <= restore_step},
        verdict_rows=[{k: v for k, v in e.items() if k not in ("event", "time_unix", "verdict")}
                      for e in verdict_events],
        trigger_rows=[{k: v for k, v in e.items() if k not in ("event", "time_unix")}
                      for e in events if e["event"] == "trigger_fired"],
        replay_steps=replay_steps,
        num_replays=sum(1 for e in events if e["event"] == "replay_started"),
        num_triggered_replays=sum(1 for e in events if e["event"] == "replay_started" and e.get("triggered")),
        checkpoint_waits_s=[e.get("wait_s", 0.0) for e in events if e["event"] == "checkpoint_committed"],
        replay_times=_replay_times(Path(run_dir), events),
    )


def _replay_times(run_dir: Path, events: list[dict]) -> list[tuple[list[StepRecord], str, int]]:
    """Every finished replay's rows (their step times), with the device and rank count they ran on."""
    found = []
    for event in events:
        path = run_dir / "replays" / f"{event.get('name')}.jsonl"
        if event["event"] == "replay_finished" and "device" in event and path.exists():
            found.append((read_trajectory(path), event["device"], event["ranks"]))
    return found
