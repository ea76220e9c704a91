"""The persister: the loop blocks only for the snapshot, at most one save in flight (the next one
waits), failures are events, retention runs after each commit, and the sync mode has the same interface."""

import threading
import time

import pytest
import torch

from shadow.checkpoint import (
    AsyncPersister,
    CheckpointDeleted,
    CheckpointFailed,
    CommitInfo,
    StorageError,
    SyncPersister,
    open_store,
)
from shadow.checkpoint.local import LocalStore
from shadow.config import load_job
from shadow.loop import LoopSettings, run_steps
from shadow.snapshot import Snapshot
from shadow.trainer import Trainer


def _snapshot(step):
    return Snapshot(step, {"model.w": torch.full((4,), float(step))}, {"job_hash": "j", "param_groups": []})


class GatedStore(LocalStore):
    """A store whose saves wait until the test opens the gate."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.started = threading.Event()

    def save(self, snapshot, process_group=None):
        self.started.set()
        assert self.gate.wait(10)
        return super().save(snapshot, process_group)


class BrokenStore(LocalStore):
    """Storage that refuses every write: the data files (streamed) and the JSON files (whole)."""

    def _open_writer(self, path):
        raise StorageError(f"{self.run_uri}/{path}: bucket 'x' does not exist")

    def _put(self, path, data):
        raise StorageError(f"{self.run_uri}/{path}: bucket 'x' does not exist")


def test_async_submit_returns_at_once_and_the_next_one_waits(tmp_path):
    store = GatedStore(str(tmp_path), "run")
    persister = AsyncPersister(store)
    started = time.perf_counter()
    assert persister.submit(_snapshot(10)) < 0.1
    assert time.perf_counter() - started < 0.5 and store.started.wait(5)
    assert persister.in_flight and persister.poll() == []

    waits = []
    second = threading.Thread(target=lambda: waits.append(persister.submit(_snapshot(20))))
    second.start()
    second.join(0.3)
    assert second.is_alive()  # blocked: the save of step 10 is still in flight
    store.gate.set()
    second.join(5)
    assert not second.is_alive() and waits[0] >= 0.25
    events = persister.close()
    assert [(type(e), e.step) for e in events] == [(CommitInfo, 10), (CommitInfo, 20)]
    assert events[0].uri.endswith("run/step-000000010") and events[0].num_bytes > 0
    # the wait is reported with the save that had to wait (the event payload carries it)
    assert events[0].wait_s == 0.0 and events[1].wait_s == waits[0]
    assert events[1].to_event()["wait_s"] == waits[0]
    assert store.latest_committed() == 20


@pytest.mark.parametrize("persister_type", [SyncPersister, AsyncPersister])
def test_failure_is_an_event_not_an_exception(tmp_path, persister_type):
    with persister_type(BrokenStore(str(tmp_path), "run")) as persister:
        persister.submit(_snapshot(10))
        persister.wait()
        (event,) = persister.poll()
    assert isinstance(event, CheckpointFailed) and event.stage == "save"
    assert event.step == 10 and "step-000000010/rank-00000.bin: bucket 'x' does not exist" in event.error
    assert event.to_event()["event"] == "checkpoint_failed"


@pytest.mark.parametrize("persister_type", [SyncPersister, AsyncPersister])
def test_retention_runs_after_each_commit(tmp_path, persister_type):
    persister = persister_type(open_store(str(tmp_path), "run", keep_last=1))
    for step in (0, 10, 20):
        persister.submit(_snapshot(step))
    events = persister.close()
    assert [(e.kind, e.step) for e in events] == [
        ("checkpoint_committed", 0), ("checkpoint_committed", 10), ("checkpoint_deleted", 0),
        ("checkpoint_committed", 20), ("checkpoint_deleted", 10)]
    assert isinstance(events[2], CheckpointDeleted)


def test_training_loop_goes_on_through_async_saves(tmp_path, small_job_file):
    job = load_job(str(small_job_file), ["steps=8"])
    settings = LoopSettings(until_step=8, checkpoint_every=4, checkpoint_at_start=True)
    sync_store = open_store(str(tmp_path / "sync"), "run")
    torch.manual_seed(0)  # the snapshot holds the global RNG state: start both runs from the same
    sync_result = run_steps(Trainer(job), settings, sync_store)
    persister = AsyncPersister(open_store(str(tmp_path / "async"), "run"))
    torch.manual_seed(0)
    result = run_steps(Trainer(job), settings, persister=persister)
    late = persister.close()
    assert [r.loss for r in result.records] == [r.loss for r in sync_result.records]
    assert len(result.checkpoint_block_s) == 3
    assert sorted(e.step for e in result.checkpoint_events + late) == [0, 4, 8]
    assert [c.step for c in sync_result.commits] == [0, 4, 8]
    # what the background thread wrote is the state at submit time, although training went on
    for step in (0, 4, 8):
        saved, reference = persister.store.load(step), sync_store.load(step)
        assert all(torch.equal(saved.tensors[k], v) for k, v in reference.tensors.items())
