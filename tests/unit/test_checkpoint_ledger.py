"""The controller's checkpoint ledger over a real local store, without Ray (`shadow/controller/ledger.py`)."""

from __future__ import annotations

import pytest
import torch

from shadow.checkpoint import open_store
from shadow.controller.callbacks import EventLog, RunCallback
from shadow.controller.errors import ControllerError
from shadow.controller.ledger import ROLLBACK_PIN, CheckpointLedger
from shadow.snapshot import Snapshot


class Recorder(RunCallback):
    def __init__(self):
        self.events, self.num_commit_points = [], 0

    def on_event(self, event):
        self.events.append(event)

    def on_commit_point(self):
        self.num_commit_points += 1

    def names(self):
        return [e["event"] for e in self.events]


@pytest.fixture
def setup(tmp_path):
    store = open_store(str(tmp_path), "run")
    for step in (0, 50, 100, 150):
        store.save(Snapshot(step, {"model.w": torch.full((2,), float(step))}, {"job_hash": "j", "param_groups": []}))
    recorder = Recorder()
    ledger = CheckpointLedger(store, EventLog([recorder]), max_failures_in_row=2)
    return store, recorder, ledger


def _committed(step):
    return {"event": "checkpoint_committed", "step": step, "uri": f"file:///x/{step}"}


def _failed(stage="save"):
    return {"event": "checkpoint_failed", "step": 7, "stage": stage, "error": "disk full"}


def test_commits_and_deletions_update_the_committed_steps(setup):
    _, recorder, ledger = setup
    ledger.record([_committed(0), _committed(50), {"event": "checkpoint_deleted", "step": 0}], lineage=3)
    assert list(ledger.committed) == [50]
    assert recorder.names() == ["checkpoint_committed", "checkpoint_committed", "checkpoint_deleted"]
    assert recorder.events[0]["lineage"] == 3 and recorder.num_commit_points == 2


def test_failed_saves_stop_the_run_only_when_in_a_row(setup):
    _, recorder, ledger = setup
    ledger.record([_failed(), _committed(50), _failed()], lineage=0)  # a commit resets the count
    assert ledger.num_failures_in_row == 1
    ledger.record([_failed(stage="prune")], lineage=0)  # retention trouble is reported, not counted
    assert ledger.num_failures_in_row == 1
    with pytest.raises(ControllerError, match=r"2 checkpoint saves failed in a row .* last committed checkpoint is step 50"):
        ledger.record([_failed()], lineage=0)
    assert recorder.events[-1]["failures_in_row"] == 2 and recorder.events[-1]["limit"] == 2


def test_a_pin_the_store_refuses_takes_the_step_out_of_the_committed_ones(setup):
    store, _, ledger = setup
    ledger.record([_committed(50), _committed(75)], lineage=0)  # 75 was never saved: the store refuses its pin
    assert ledger.pin(50, "replay-1") is None and store.pins() == {50: {"replay-1"}}
    assert ledger.pin(75, "replay-2") is not None and list(ledger.committed) == [50]
    ledger.unpin(50, "replay-1")
    assert store.pins() == {}


def test_the_rollback_pin_moves_with_the_target(setup):
    store, _, ledger = setup
    ledger.record([_committed(s) for s in (0, 50, 100)], lineage=0)
    ledger.pin_rollback_target(None)
    assert store.pins() == {}
    ledger.pin_rollback_target(50)
    ledger.pin_rollback_target(100)
    assert store.pins() == {100: {ROLLBACK_PIN}} and ledger.rollback_pin == 100
    ledger.pin_rollback_target(150)  # not committed on this lineage: the pin stays where it is
    assert store.pins() == {100: {ROLLBACK_PIN}}


def test_a_rollback_deletes_the_abandoned_branch_but_keeps_what_a_replay_still_reads(setup):
    store, recorder, ledger = setup
    ledger.record([_committed(s) for s in (0, 50, 100, 150)], lineage=0)
    ledger.pin(100, "replay-4")
    ledger.abandon_after(50, "rollback")
    assert list(ledger.committed) == [0, 50]
    assert store.list_committed() == [0, 50, 100]  # 150 deleted, 100 pinned by the running replay
    kept = [e for e in recorder.events if e["event"] == "checkpoint_kept"]
    deleted = [e for e in recorder.events if e["event"] == "checkpoint_deleted"]
    assert [e["step"] for e in kept] == [100] and "replay-4" in kept[0]["reason"]
    assert [e["step"] for e in deleted] == [150] and deleted[0]["reason"] == "abandoned by rollback"


def test_a_resumed_run_releases_the_pins_of_the_dead_drivers_replays(setup):
    store, _, ledger = setup
    store.pin(0, "replay-1")
    store.pin(50, ROLLBACK_PIN)
    ledger.unpin_replays_of_a_dead_driver()
    assert store.pins() == {50: {ROLLBACK_PIN}}
