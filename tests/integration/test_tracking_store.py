"""The tracker against real MLflow stores without Ray: an embedded sqlite store, a server that is
not there, a run deleted behind the tracker's back, and ops sent twice after lost acknowledgements.

The controller is played by hand: the same callbacks, in the order `shadow run` makes them.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mlflow_server import free_port
from shadow.records import StepRecord
from shadow.tracking import tracker as tracker_module
from shadow.tracking.sender import MlflowSender
from shadow.tracking.spool import ACKED_FILE, Spool
from shadow.tracking.state import TrackingState
from shadow.tracking.tracker import MlflowTracker
from shadow.tracking.uri import embedded_uri
from shadow.tracking.worker import TrackingWorker

POLICY_YAML = "thresholds:\n  warn: 0.005\n  switch: 0.015\n"
REPLAY = {"event": "replay_started", "name": "001-verify-bf16-at-000000000", "start_step": 0, "num_steps": 4,
          "precision": "bf16", "purpose": "verify"}


def _rows(steps, precision="fp8", offset=0.0):
    return [StepRecord(step=s, loss=3.0 - 0.1 * s + offset, precision=precision, tokens=64, step_time_s=0.01,
                       grad_norm=1.0, lr=1e-3) for s in steps]


def _play_run(tracker: MlflowTracker, run_dir: Path) -> None:
    (run_dir / "events.jsonl").write_text('{"event": "run_started"}\n')  # as RunDirWriter would
    (run_dir / "policy-v1.yaml").write_text(POLICY_YAML)
    tracker.on_policy(1, POLICY_YAML)
    tracker.on_event({"event": "run_started", "job": "t", "precision": "fp8", "policy_path": "p",
                      "store_uri": str(run_dir)})
    tracker.on_event(REPLAY)
    tracker.on_main_records(_rows(range(0, 4)))
    tracker.on_replay_finished(REPLAY["name"], _rows(range(0, 4), "bf16", 0.01))
    tracker.on_main_records(_rows(range(4, 8)))
    tracker.on_event({"event": "verdict", "name": REPLAY["name"], "purpose": "verify", "window_start": 0,
                      "window_end": 4, "metric": "rel_mean_gap", "value": 0.004, "level": "clean",
                      "kind": "compared", "verdict": {"rel_mean_gap": 0.004}})
    tracker.on_commit_point()


@pytest.fixture
def emitted():
    return []


def _emit_into(events: list):
    def emit(name, **payload):
        events.append({"event": name, **payload})
        return events[-1]
    return emit


def test_embedded_sqlite_store_gets_parent_child_and_artifacts(tmp_path, emitted, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "job.yaml").write_text("name: t\nsteps: 8\nmodel: {d_model: 64}\n")
    tracker = MlflowTracker(tmp_path, experiment="t")
    tracker.bind(_emit_into(emitted))
    _play_run(tracker, tmp_path)
    tracker.on_finish({"phase": "finished", "final_step": 8, "final_loss": 2.3, "effective_speedup": {"wall": 1.25},
                       "checkpoint_waits": {"total_s": 0.5, "num_waited": 2}, "policy_state": {"num_fallbacks": 1}})
    assert not emitted  # nothing went wrong, nothing to report

    state = TrackingState.load(tmp_path)
    assert state.tracking_uri == embedded_uri(tmp_path)
    client = MlflowClient(embedded_uri(tmp_path))
    parent = client.get_run(state.parent_run_id)
    child = client.get_run(state.runs[REPLAY["name"]])
    assert parent.info.status == "FINISHED" and child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.params["job.model.d_model"] == "64" and parent.data.params["policy.thresholds.warn"] == "0.005"
    assert sorted(m.step for m in client.get_metric_history(parent.info.run_id, "train/loss")) == list(range(8))
    assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "train/loss")) == list(range(4))
    assert parent.data.metrics["summary/final_loss"] == 2.3
    # nested summary figures are flattened with "_"; the policy state is not a metric
    assert parent.data.metrics["summary/effective_speedup_wall"] == 1.25
    assert parent.data.metrics["summary/checkpoint_waits_total_s"] == 0.5
    assert not [k for k in parent.data.metrics if "policy_state" in k or "num_fallbacks" in k]
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.artifact_location == (tmp_path / "mlflow-artifacts").as_uri()  # beside the db
    assert {"job.yaml", "events.jsonl", "policy"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_sending_everything_twice_duplicates_no_run_and_no_metric(tmp_path, monkeypatch):
    """An answer lost after MLflow stored the op (or a crash before the ack) makes the op go out again."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = MlflowTracker(tmp_path, experiment="t")
    _play_run(tracker, tmp_path)
    tracker.on_finish({"phase": "finished", "final_step": 8})
    client = MlflowClient(embedded_uri(tmp_path))
    state = TrackingState.load(tmp_path)
    first = {key: Counter((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, "train/loss"))
             for key, run_id in state.runs.items()}

    (tmp_path / ACKED_FILE).unlink()  # as if no acknowledgement and no run id had been written
    forgetful = TrackingState(state.tracking_uri, state.experiment, state.run_dir_id)
    spool = Spool(tmp_path)
    assert spool.num_pending() > 5
    worker = TrackingWorker(spool, lambda: MlflowSender(embedded_uri(tmp_path), tmp_path, forgetful), lambda *a: None,
                            "x")
    worker.start()
    assert worker.close(30) == 0
    assert forgetful.runs == state.runs  # the same runs, found again by their tags
    experiment = client.get_experiment_by_name("t")
    assert len(client.search_runs([experiment.experiment_id])) == 2
    again = {key: Counter((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, "train/loss"))
             for key, run_id in state.runs.items()}
    assert again == first


def test_unreachable_server_degrades_without_failing_and_keeps_secrets(tmp_path, emitted, monkeypatch, capsys):
    monkeypatch.setattr(tracker_module, "CLOSE_TIMEOUT_S", 1.0)
    uri = f"http://alice:s3cret@127.0.0.1:{free_port()}"  # nothing listens there
    (tmp_path / "job.yaml").write_text("name: t\ncheckpoint: {uri: 's3://bob:s3cret@bucket/x'}\n")
    tracker = MlflowTracker(tmp_path, experiment="t", tracking_uri=uri)
    tracker.bind(_emit_into(emitted))
    started = time.perf_counter()
    _play_run(tracker, tmp_path)
    time.sleep(0.5)  # the worker's first attempt fails
    tracker.on_main_records(_rows(range(8, 10)))
    assert time.perf_counter() - started < 2.0  # the callbacks never waited for the server
    tracker.on_finish({"phase": "finished", "final_step": 10})

    [degraded] = [e for e in emitted if e["event"] == "tracking_degraded"]
    assert degraded["uri"] == f"http://***@127.0.0.1:{uri.rsplit(':', 1)[1]}"
    assert "Connection refused" in degraded["reason"] or "onnection" in degraded["reason"]
    spool = Spool(tmp_path)
    spooled_steps = [m[3] for op in spool.pending(1000) if op["run"] == "main" for m in op.get("metrics", [])
                     if m[0] == "train/loss"]
    assert spooled_steps == list(range(10))  # everything waits on disk for the server
    printed = capsys.readouterr().err
    assert "not yet in MLflow" in printed and "shadow report" in printed
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.name != "job.yaml":  # the user's own file, as written
            assert "s3cret" not in path.read_text(errors="replace"), path
    assert "s3cret" not in printed and "s3cret" not in str(emitted)


def test_a_refused_op_is_reported_and_dropped_while_the_rest_goes_on(tmp_path, emitted, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = MlflowTracker(tmp_path, experiment="t")
    tracker.bind(_emit_into(emitted))
    tracker.on_main_records(_rows(range(0, 2)))
    client = MlflowClient(embedded_uri(tmp_path))
    deadline = time.time() + 30
    while TrackingState.load(tmp_path).parent_run_id is None or tracker.spool.num_pending():
        assert time.time() < deadline
        time.sleep(0.1)
    client.delete_run(TrackingState.load(tmp_path).parent_run_id)  # someone deletes the run in the UI
    tracker.on_main_records(_rows(range(2, 4)))
    tracker.on_event(REPLAY)
    tracker.on_replay_finished(REPLAY["name"], _rows(range(0, 4), "bf16"))
    while tracker.spool.num_pending():
        assert time.time() < deadline
        time.sleep(0.1)
    tracker.on_main_records([])  # a callback on the controller thread delivers the worker's reports
    rejected = [e for e in emitted if e["event"] == "tracking_rejected"]
    assert rejected and rejected[0]["run"] == "main" and "active" in rejected[0]["reason"]
    child = TrackingState.load(tmp_path).runs[REPLAY["name"]]
    assert len(client.get_metric_history(child, "train/loss")) == 4
    tracker.on_finish({"phase": "finished", "final_step": 4})


def test_failed_replays_and_main_restarts_are_recorded(tmp_path, emitted, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = MlflowTracker(tmp_path, experiment="t")
    tracker.bind(_emit_into(emitted))
    tracker.on_main_records(_rows(range(0, 6)))
    tracker.on_event(REPLAY)
    tracker.on_event({"event": "replay_failed", "name": REPLAY["name"], "attempt": 1, "retries": 1,
                      "worker_died": True, "error": "RayActorError: the actor died"})
    tracker.on_event({"event": "replay_skipped", "name": REPLAY["name"], "reason": "failed 2 time(s)"})
    tracker.on_event({"event": "replay_skipped", "name": "002-verify-bf16-at-000000004",  # never started
                      "reason": "cannot pin its checkpoint"})
    tracker.on_event({"event": "main_restarted", "restart": 1, "limit": 3, "step": 4, "discarded": [4, 6],
                      "error": "RayActorError"})
    tracker.on_main_records(_rows(range(4, 8), offset=0.5))
    tracker.on_finish({"phase": "finished", "final_step": 8})
    assert not [e for e in emitted if e["event"] == "tracking_rejected"]

    client = MlflowClient(embedded_uri(tmp_path))
    state = TrackingState.load(tmp_path)
    assert set(state.runs) == {"main", REPLAY["name"]}
    child = client.get_run(state.runs[REPLAY["name"]])
    assert child.info.status == "FAILED" and child.data.tags["shadow.verdict"] == "skipped: failed 2 time(s)"
    assert child.data.tags["shadow.failed_attempts"] == "2"
    parent = client.get_run(state.parent_run_id)
    assert parent.data.tags["shadow.discarded"] == "[4, 6) by main_restarted at step 6"
    assert [(m.step, m.value) for m in client.get_metric_history(parent.info.run_id, "shadow/main_restarted")] == [
        (4, 1.0)]
    lineage_steps = Counter(m.step for m in client.get_metric_history(parent.info.run_id, "train/loss"))
    assert lineage_steps[4] == lineage_steps[5] == 2 and lineage_steps[7] == 1  # re-trained steps logged again


def test_a_malformed_event_costs_only_its_own_record(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tracker_module, "CLOSE_TIMEOUT_S", 0.0)
    tracker = MlflowTracker(tmp_path, experiment="t", tracking_uri=f"http://127.0.0.1:{free_port()}")
    tracker.on_event({"event": "verdict", "name": "x"})  # no window: a bug upstream, not a reason to stop
    tracker.on_event({"event": "rollback", "discarded": [0]})
    tracker.on_main_records(_rows(range(0, 3)))
    tracker.on_finish({"phase": "finished", "final_step": 3})
    err = capsys.readouterr().err
    assert "on_event failed; the run goes on without it: Traceback" in err
    assert "on_event failed; the run goes on without it: ValueError" in err  # later ones in one line
    steps = [m[3] for op in Spool(tmp_path).pending(100) for m in op.get("metrics", []) if m[0] == "train/loss"]
    assert steps == [0, 1, 2]
