"""Processes that die or misbehave during `shadow run`: the run goes on and loses nothing.

Faults are injected through the job's documented `faults` section (like Megatron's error injection):
the main trainer's or a replay's process exits abruptly (`os._exit`, as an OOM kill would end it), a
replay raises, or a loss turns NaN.
"""

import json

import pytest
from conftest import FAST, FIXED_POLICY, REPO

from shadow.cli import main
from shadow.rundir import read_events, read_history

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]
TINY = str(REPO / "jobs/tiny.yaml")
EVERY_50 = ["--policy-set", "verify.every_n_steps=50"]


def _run(tmp_path, *args):
    out = tmp_path / "run"
    code = main(["run", "--job", TINY, *FAST, "--set", "steps=150", *FIXED_POLICY, *EVERY_50, "--out", str(out), *args])
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    return code, out, summary, read_events(out)


def _of(events, kind):
    return [e for e in events if e["event"] == kind]


def test_main_trainer_killed_mid_chunk_restarts_from_its_last_checkpoint(tmp_path):
    code, out, summary, events = _run(tmp_path, "--set", "faults.main_crash_at_step=67")
    assert code == 0 and summary["phase"] == "finished" and summary["final_step"] == 150
    (restart,) = _of(events, "main_restarted")
    assert restart["step"] == 50  # the newest committed checkpoint before the crash (every 50 steps)
    assert restart["discarded"] == [50, 60]  # the chunk [50, 60) was reported, [60, 67) never was
    assert "ActorDiedError" in restart["error"] or "RayActorError" in restart["error"]
    kept, discarded = read_history(out)
    assert [r.step for r in kept] == list(range(150))
    assert sorted(r.step for r in discarded) == list(range(50, 60))  # reported as discarded, not erased
    assert summary["steps_discarded"] == 10


def test_main_trainer_restarts_are_bounded(tmp_path, capsys):
    code, out, summary, events = _run(tmp_path, "--set", "faults.main_crash_at_step=67",
                                      "--set", "run.max_main_restarts=0")
    assert code == 1
    assert "main trainer died 1 times (run.max_main_restarts=0)" in capsys.readouterr().err
    assert summary["phase"] == "failed"
    assert events[-1]["event"] == "run_finished" and events[-1]["phase"] == "failed"


def test_killed_replay_is_retried_on_a_new_worker(tmp_path):
    code, out, summary, events = _run(tmp_path, "--set", "faults.replay_crash_at_step=10")
    assert code == 0
    (failure,) = _of(events, "replay_failed")
    assert failure["worker_died"] and failure["attempt"] == 0
    first = next(e for e in _of(events, "verdict") if e["window_start"] == 0)
    assert first["name"] == failure["name"] and first["level"] == "clean"  # the retry judged the window
    assert not _of(events, "replay_skipped")


def test_replay_that_keeps_raising_is_skipped_and_the_main_job_goes_on(tmp_path):
    code, out, summary, events = _run(tmp_path, "--set", "faults.replay_error_at_step=10")
    assert code == 0 and summary["final_step"] == 150
    failures = _of(events, "replay_failed")
    assert [f["attempt"] for f in failures] == [0, 1]  # verify.replay_retries = 1
    assert all("injected replay error" in f["error"] and not f["worker_died"] for f in failures)
    (skipped,) = _of(events, "replay_skipped")
    assert skipped["start_step"] == 0
    later = [v for v in _of(events, "verdict") if v["window_start"] > 0]
    assert later and all(v["level"] == "clean" for v in later)  # verification goes on after the skipped window


def test_nan_loss_in_the_main_job_is_a_nonfinite_verdict_and_switches(tmp_path):
    code, out, summary, events = _run(tmp_path, "--set", "faults.nan_loss_at_step=60")
    assert code == 0
    assert _of(events, "replay_triggered")[0]["step"] == 60  # not left to the cadence
    verdict = next(e for e in _of(events, "verdict") if e["window_start"] == 50)
    assert verdict["kind"] == "nonfinite" and verdict["level"] == "violation"
    assert _of(events, "rollback") and summary["num_precision_switches"] >= 1
    kept, _ = read_history(out)
    assert [r.step for r in kept] == list(range(150))
    assert all(r.loss == r.loss for r in kept)  # the NaN step was rolled back: history is finite


def test_nan_loss_in_a_replay_is_reported_not_acted_on(tmp_path):
    code, out, summary, events = _run(tmp_path, "--set", "faults.nan_loss_at_step=10",
                                      "--set", "faults.nan_loss_in=replay")
    assert code == 0 and summary["num_precision_switches"] == 0
    verdict = next(e for e in _of(events, "verdict") if e["window_start"] == 0)
    assert verdict["kind"] == "nonfinite"
    assert verdict["verdict"]["nonfinite_replay"] == [10] and verdict["verdict"]["nonfinite_main"] == []
    notes = [e for e in _of(events, "decision") if e["name"] == verdict["name"]]
    assert notes and all(n["kind"] == "note" for n in notes)
