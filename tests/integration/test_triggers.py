"""Triggered verification end to end: the scale fault of tiny_fault shows in telemetry at its first
step, and the trigger's replay catches it long before the sparse cadence would have."""

import json

import pytest
from conftest import FAST, REPO

from shadow.cli import main
from shadow.rundir import read_events, read_trajectory

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]


def test_scale_fault_fires_a_trigger_and_its_replay_switches_to_bf16(tmp_path):
    out = tmp_path / "run"
    code = main(["run", "--out", str(out), "--job", str(REPO / "jobs/tiny_fault.yaml"), *FAST, "--set", "steps=130",
                 "--policy", str(REPO / "policies/triggered.yaml"), "--policy-set", "action.on_switch=bf16"])
    assert code == 0
    events = read_events(out)
    fired = [e for e in events if e["event"] == "trigger_fired"]
    assert fired and {e["step"] for e in fired} == {100}  # the fault's first step; nothing fired before it
    saturation = next(e for e in fired if e["signal"] == "fp8/saturation_max")
    assert saturation["test"] == "above" and saturation["value"] > 0.5 and saturation["replay_start"] == 100
    started = [e["start_step"] for e in events if e["event"] == "replay_started"]
    assert started[:2] == [0, 100]  # the cadence (every 200 steps) would not have verified again before 200
    verdict = next(e for e in events if e["event"] == "verdict" and e["window_start"] == 100)
    assert verdict["level"] == "violation"
    switch = next(e for e in events if e["event"] == "precision_switched")
    assert switch["new"] == "bf16" and switch["reason"].startswith("window [100, 125)")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_triggers_fired"] == len(fired) and summary["num_trigger_steps"] == 1
    assert summary["num_triggered_replays"] == 1
    assert [e["triggered"] for e in events if e["event"] == "replay_started"][:2] == [False, True]
    assert {t["signal"] for t in summary["triggers"]} == {e["signal"] for e in fired}
    rows = {r.step: r for r in read_trajectory(out) if r.lineage == 0}
    assert rows[90].telemetry and not rows[91].telemetry  # telemetry.every_steps: 10
    assert rows[100].telemetry["fp8/saturation_max"] == saturation["value"]


def test_a_trigger_rule_the_job_can_never_fire_is_an_error(tmp_path, capsys):
    """Telemetry off: the triggered policy's telemetry rules would never fire; the run says so and stops."""
    out = tmp_path / "run"
    code = main(["run", "--out", str(out), "--job", str(REPO / "jobs/tiny.yaml"), *FAST, "--set", "steps=20",
                 "--set", "telemetry.every_steps=0", "--policy", str(REPO / "policies/triggered.yaml")])
    assert code == 1
    err = capsys.readouterr().err
    assert "triggers.rules[" in err and "fp8/saturation_max" in err and "telemetry.every_steps: 0" in err
    assert not (out / "trajectory.jsonl").exists()  # nothing trained
