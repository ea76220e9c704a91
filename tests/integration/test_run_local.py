"""`shadow run`'s controller logic end to end on a real local Ray (one per module), real training on CPU:
the full FP8 -> BF16 -> FP8 cycle, rollback and adoption, a policy edited mid-run, checkpoint waits.

These use the shipped jobs with a smaller model (`FAST`): the same data, schedule and fault. The fault
job runs once per `on_switch` for every test that reads it. The healthy and degraded scenarios at full
model size are in test_run_scenarios.py.
"""

import shutil

import pytest
from conftest import FAST, FIXED_POLICY, REPO, kinds_of, shadow_run

from shadow.cli import main
from shadow.controller.callbacks import RunDirWriter
from shadow.rundir import read_events, read_history

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]


def _run(tmp_path, name, *args):
    return shadow_run(tmp_path / name, *args)


@pytest.fixture(scope="module")
def fault_job_runs(local_ray, tmp_path_factory):
    """`shadow run` of the fault job per `action.on_switch`, each run once for the tests that read it."""
    runs = {}

    def run(on_switch: str):
        if on_switch not in runs:
            runs[on_switch] = _run(tmp_path_factory.mktemp(on_switch), on_switch, "--job",
                                   str(REPO / "jobs/tiny_fault.yaml"), *FAST, *FIXED_POLICY,
                                   "--policy-set", f"action.on_switch={on_switch}")
        return runs[on_switch]
    return run


def test_fault_job_walks_the_full_cycle_in_order(fault_job_runs):
    code, out, summary, events = fault_job_runs("rollback")  # fixed.yaml's (and the default's)
    assert code == 0 and summary["num_precision_switches"] == 2
    names = [e["event"] for e in events]
    to_bf16 = next(i for i, e in enumerate(events) if e["event"] == "precision_switched" and e["new"] == "bf16")
    to_fp8 = next(i for i, e in enumerate(events) if e["event"] == "precision_switched" and e["new"] == "fp8")
    assert to_bf16 < to_fp8
    violation = next(e for e in events[:to_bf16] if e["event"] == "verdict" and e["level"] == "violation")
    assert 100 <= violation["window_start"] < 150  # the window that covers the fault
    assert "switch 0.015" in events[to_bf16]["reason"]
    probes = [e for e in events[to_bf16:to_fp8] if e["event"] == "verdict" and e["purpose"] == "probe"]
    assert len(probes) >= 2 and all(p["window_start"] >= 150 for p in probes[-2:])
    assert all(p["level"] == "clean" for p in probes[-2:])
    assert "clean probe 2 of 2" in events[to_fp8]["reason"]
    after = [e for e in events[to_fp8:] if e["event"] == "verdict"]
    assert after and after[-1]["purpose"] == "verify" and after[-1]["level"] == "clean"
    assert names.index("run_started") == 0 and names[-1] == "run_finished"
    kept, _ = read_history(out)
    bf16_from, fp8_from = events[to_bf16]["step"], events[to_fp8]["step"]
    assert [r.step for r in kept] == list(range(400))
    assert all(r.precision == ("bf16" if bf16_from <= r.step < fp8_from else "fp8") for r in kept)
    # the policy rolls back to the last clean window: no FP8 step of the fault stays in history
    assert kinds_of(events, "rollback") and bf16_from <= 100


@pytest.mark.parametrize("on_switch", ["rollback", "adopt_replay"])
def test_rollback_and_adoption_leave_a_complete_history(fault_job_runs, on_switch):
    code, out, summary, events = fault_job_runs(on_switch)
    assert code == 0
    restart = kinds_of(events, "rollback" if on_switch == "rollback" else "replay_adopted")
    assert len(restart) == 1
    first, last = restart[0]["discarded"]
    kept, discarded = read_history(out)
    assert [r.step for r in kept] == list(range(400))  # each step once: nothing missing, nothing twice
    assert sorted(r.step for r in discarded) == list(range(first, last))  # marked, not erased
    assert summary["steps_discarded"] == last - first
    assert all(r.lineage == 0 for r in discarded)
    if on_switch == "rollback":
        assert restart[0]["new_step"] < restart[0]["old_step"]
        assert all(r.precision == "bf16" for r in kept if first <= r.step < 150)  # re-trained through the fault
    else:
        adopted = restart[0]["new_step"]
        replay_rows = [r for r in kept if first <= r.step < adopted]
        assert replay_rows and all(r.precision == "bf16" and r.lineage == 1 for r in replay_rows)


def test_policy_edit_during_a_run_takes_effect(tmp_path, monkeypatch):
    policy = tmp_path / "policy.yaml"
    shutil.copy(REPO / "policies/fixed.yaml", policy)
    out = tmp_path / "hot"
    original = policy.read_text()
    faster = original.replace("every_n_steps: 100", "every_n_steps: 25")
    edits = {"checkpoint_committed": "verify: [this is not valid\n", "policy_rejected": faster}

    # the edits happen as the run writes the events they follow (the first commit, then the
    # rejection), so each lands before the next decision point (every 10 steps) at any machine speed
    write_event = RunDirWriter.on_event

    def on_event(self, event):
        write_event(self, event)
        if event["event"] in edits:
            policy.write_text(edits.pop(event["event"]))

    monkeypatch.setattr(RunDirWriter, "on_event", on_event)
    code = main(["run", "--job", str(REPO / "jobs/tiny.yaml"), *FAST, "--set", "steps=120",
                 "--policy", str(policy), "--out", str(out)])
    assert code == 0
    events = read_events(out)
    rejected = kinds_of(events, "policy_rejected")
    reloaded = kinds_of(events, "policy_reloaded")
    assert len(rejected) == 1 and "valid YAML" in rejected[0]["error"]
    assert len(reloaded) == 1 and reloaded[0]["changes"]["verify.every_n_steps"] == {"old": 100, "new": 25}
    reload_index = events.index(reloaded[0])
    later_starts = [e["start_step"] for e in events[reload_index:] if e["event"] == "replay_started"]
    assert any(start % 100 for start in later_starts)  # a window the old cadence would never start
    assert "every_n_steps: 25" in (out / "policy-v2.yaml").read_text()


def test_a_checkpoint_interval_shorter_than_a_save_shows_its_wait(tmp_path):
    """A checkpoint after every ~2 ms step of a 1 x 8 model: a save (encode, sha256, write, fsync, rename)
    outlasts a step, so the next save must wait for it; each wait is in its `checkpoint_committed` event
    and their sum, maximum and count in summary.json."""
    code, out, summary, events = _run(tmp_path, "waits", "--job", str(REPO / "jobs/tiny.yaml"), "--set", "steps=40",
                                      "--set", "model.num_layers=1", "--set", "model.d_model=8",
                                      "--set", "model.num_heads=1", "--set", "model.seq_len=8",
                                      "--set", "batch_size=2", "--set", "checkpoint.every_steps=1", *FIXED_POLICY,
                                      "--policy-set", "verify.every_n_steps=20", "--policy-set", "verify.window_steps=5")
    assert code == 0
    waits = [e["wait_s"] for e in kinds_of(events, "checkpoint_committed")]
    assert len(waits) == 41  # the start and one after every step
    waited = summary["checkpoint_waits"]
    assert waited["num_saves"] == 41 and waited["num_waited"] == sum(1 for w in waits if w > 0)
    assert waited["num_waited"] > 0 and waited["max_s"] > 0
    assert waited["total_s"] == pytest.approx(sum(waits)) and waited["max_s"] == max(waits)
