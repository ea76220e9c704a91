"""Bad input under a running or resumed `shadow run`: damaged, foreign or malicious checkpoints, and
a policy file edited into something invalid, deleted, or replaced by a huge file."""

import json
import shutil

import pytest
from checkpoint_damage import DATA, planted_pickle, set_first_value
from conftest import FAST, FIXED_POLICY, REPO

from shadow.checkpoint.format import MANIFEST
from shadow.cli import main
from shadow.controller.callbacks import RunDirWriter
from shadow.rundir import read_events, read_history

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]
TINY = str(REPO / "jobs/tiny.yaml")


@pytest.fixture(scope="module")
def crashed_run(tmp_path_factory, local_ray):
    """A run whose main trainer died at step 67 with no restart allowed: checkpoints at 0, 50 (and
    the run directory) are what a resume has to work with."""
    out = tmp_path_factory.mktemp("crashed") / "run"
    code = main(["run", "--job", TINY, *FAST, "--set", "steps=120", "--set", "faults.main_crash_at_step=67",
                 "--set", "run.max_main_restarts=0", *FIXED_POLICY, "--policy-set", "verify.every_n_steps=50",
                 "--out", str(out)])
    assert code == 1
    return out


def _copy_run(source, target):
    """A copy of a run whose events point at the copy's own local checkpoints."""
    shutil.copytree(source, target)
    events = (target / "events.jsonl").read_text().replace(str(source / "checkpoints"), str(target / "checkpoints"))
    (target / "events.jsonl").write_text(events)
    return target


def _damage(run_dir, how, marker):
    step_dir = run_dir / "checkpoints" / run_dir.name / "step-000000050"
    victim = step_dir / DATA
    if how == "truncated":
        victim.write_bytes(victim.read_bytes()[:1000])
    elif how == "malicious_pickle":
        victim.write_bytes(planted_pickle(marker))
    elif how == "foreign_job":
        manifest = json.loads((step_dir / MANIFEST).read_text())
        manifest["job_hash"] = "0123456789abcdef"
        (step_dir / MANIFEST).write_text(json.dumps(manifest))
    elif how == "nonfinite_resigned":  # the hashes rewritten to match: only the content check catches it
        set_first_value(step_dir, "model.tok_emb.weight", float("nan"))
    return step_dir


@pytest.mark.parametrize("how", ["truncated", "malicious_pickle", "foreign_job", "nonfinite_resigned"])
def test_resume_rejects_a_bad_newest_checkpoint_and_falls_back(crashed_run, tmp_path, how):
    run_dir = _copy_run(crashed_run, tmp_path / crashed_run.name)
    marker = tmp_path / "pickle-was-executed"
    _damage(run_dir, how, marker)
    assert main(["run", "--resume", str(run_dir)]) == 0
    events = read_events(run_dir)
    (rejected,) = [e for e in events if e["event"] == "checkpoint_rejected"]
    assert rejected["step"] == 50
    expected = {"truncated": f"{DATA}: 1000 bytes, manifest says",
                "malicious_pickle": f"{DATA}: {len(planted_pickle(marker))} bytes, manifest says",
                "foreign_job": f"{MANIFEST}: written by job",
                "nonfinite_resigned": f"{DATA}: tensor 'model.tok_emb.weight': 1 NaN"}[how]
    assert expected in rejected["error"]
    resumed = next(e for e in events if e["event"] == "resumed")
    assert resumed["step"] == 0  # the previous valid checkpoint
    assert not marker.exists()  # nothing from the checkpoint was executed
    kept, _ = read_history(run_dir)
    assert [r.step for r in kept] == list(range(120))


def test_policy_file_broken_deleted_or_huge_mid_run_keeps_the_old_policy(tmp_path, monkeypatch):
    policy = tmp_path / "policy.yaml"
    shutil.copy(REPO / "policies/fixed.yaml", policy)
    out = tmp_path / "run"
    edits = [
        lambda: policy.write_text("verify:\n  every_n_steps: -5\n"),
        lambda: policy.unlink(),
        lambda: policy.write_text("# padding\n" * 60_000),
    ]
    # each edit as the run writes the event it follows (the first commit, then each rejection), so it
    # lands before the next decision point (every 10 steps) at any machine speed
    write_event = RunDirWriter.on_event

    def on_event(self, event):
        write_event(self, event)
        follows = "checkpoint_committed" if len(edits) == 3 else "policy_rejected"
        if edits and event["event"] == follows:
            edits.pop(0)()

    monkeypatch.setattr(RunDirWriter, "on_event", on_event)
    code = main(["run", "--job", TINY, *FAST, "--set", "steps=60", "--policy", str(policy), "--out", str(out)])
    assert code == 0
    rejected = [e for e in read_events(out) if e["event"] == "policy_rejected"]
    assert len(rejected) == 3
    assert "verify.every_n_steps" in rejected[0]["error"]
    assert "readable file" in rejected[1]["error"] or "No such file" in rejected[1]["error"]
    assert "at most" in rejected[2]["error"]
    assert all(e["kept_in_force"] for e in rejected)
    assert not [e for e in read_events(out) if e["event"] == "policy_reloaded"]
    assert not (out / "policy-v2.yaml").exists()
