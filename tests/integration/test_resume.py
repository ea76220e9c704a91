"""Kill the `shadow run` driver mid-run (SIGKILL, nothing flushed on purpose) and resume it.

Verdicts and decisions logged before the kill are kept and none is taken twice; the main job goes on
from the last checkpoint of its lineage, and the rows the dead driver wrote after that checkpoint
become discarded history.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import FAST, FIXED_POLICY, REPO

from shadow.rundir import read_events, read_history

pytestmark = pytest.mark.slow


def _shadow(*args) -> list[str]:
    return [sys.executable, "-m", "shadow", *args]


def test_driver_killed_after_a_rollback_resumes_without_losing_or_repeating_decisions(tmp_path):
    out = tmp_path / "run"
    log = open(tmp_path / "first.log", "w")
    driver = subprocess.Popen(_shadow("run", "--job", str(REPO / "jobs/tiny_fault.yaml"), *FAST, *FIXED_POLICY,
                                      "--out", str(out)),
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def killed_point_reached() -> bool:
        events = read_events(out) if (out / "events.jsonl").exists() else []
        rolled_back = any(e["event"] == "rollback" for e in events)
        return rolled_back and any(e["event"] == "checkpoint_committed" and e["lineage"] == 1 and e["step"] >= 50
                                   for e in events)

    deadline = time.time() + 240
    try:
        while not killed_point_reached():
            assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "the run never reached the kill point"
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        log.close()
    before = read_events(out)
    assert before[-1]["event"] != "run_finished"
    decided_before = [(e["name"], e["kind"], e["reason"]) for e in before if e["event"] == "decision"]

    resumed = subprocess.run(_shadow("run", "--resume", str(out)), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    after = read_events(out)
    assert after[: len(before)] == before  # the log before the kill is untouched
    resumed_event = next(e for e in after[len(before):] if e["event"] == "resumed")
    assert resumed_event["state"]["precision"] == "bf16"  # the rollback's switch to BF16 holds
    assert resumed_event["steps_lost"] >= 0
    decisions = [(e["name"], e["kind"], e["reason"]) for e in after if e["event"] == "decision"]
    assert decisions[: len(decided_before)] == decided_before
    assert len(decisions) == len(set(decisions))  # no decision taken twice
    verdicts = [(e["purpose"], e["window_start"], e["name"]) for e in after if e["event"] == "verdict"]
    assert len(verdicts) == len(set(verdicts))
    assert sum(1 for e in after if e["event"] == "rollback") == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["phase"] == "finished" and summary["final_step"] == 400
    # checkpoint waits cover the dead driver's commits too
    commits = [e for e in after if e["event"] == "checkpoint_committed"]
    assert summary["checkpoint_waits"]["num_saves"] == len(commits) > sum(
        1 for e in after[len(before):] if e["event"] == "checkpoint_committed")
    assert summary["checkpoint_waits"]["total_s"] == pytest.approx(sum(e["wait_s"] for e in commits))
    kept, _ = read_history(out)
    assert [r.step for r in kept] == list(range(400))
    assert any(e["event"] == "precision_switched" and e["new"] == "fp8" for e in after[len(before):])
