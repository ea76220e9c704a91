"""`shadow policy check` and `shadow compare`, in-process, plus one real `python -m shadow` call."""

import subprocess
import sys
from pathlib import Path

import pytest

from shadow.cli import main
from shadow.records import StepRecord

REPO = Path(__file__).parents[2]


def write_traj(path, start, losses, precision):
    path.write_text("".join(StepRecord(step=start + i, loss=x, precision=precision, tokens=1, step_time_s=0.1,
                                       grad_norm=1.0, lr=1e-3).to_json() + "\n" for i, x in enumerate(losses)))
    return str(path)


@pytest.fixture
def pair(tmp_path):
    """Main FP8 trajectory over steps 0..199, 5% worse than a BF16 replay of window [100, 150)."""
    main_path = write_traj(tmp_path / "main.jsonl", 0, [2.1] * 200, "fp8")
    replay_path = write_traj(tmp_path / "replay.jsonl", 100, [2.0] * 50, "bf16")
    return main_path, replay_path


def test_policy_check_prints_the_effective_policy(capsys):
    assert main(["policy", "check", str(REPO / "policies/default.yaml"), "--set", "thresholds.switch=0.04"]) == 0
    out = capsys.readouterr().out
    assert "policies/default.yaml: ok" in out and "switch: 0.04" in out and "on_switch: rollback" in out


def test_policy_check_reports_bad_files_and_still_prints_good_ones(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("thresholds:\n  warn: -1\n  consecutive: 0\n")
    assert main(["policy", "check", str(REPO / "policies/strict.yaml"), str(bad)]) == 2
    captured = capsys.readouterr()
    assert "strict.yaml: ok" in captured.out
    assert captured.err.splitlines() == [f"{bad}: thresholds.warn: got -1.0, expected a finite non-negative number",
                                         f"{bad}: thresholds.consecutive: got 0, expected a positive integer"]


def test_policy_check_of_a_missing_file(tmp_path, capsys):
    assert main(["policy", "check", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: <top level>: got None, expected a readable file" in capsys.readouterr().err


def test_compare_prints_verdict_and_the_decision(pair, capsys):
    assert main(["compare", *pair]) == 0
    out = capsys.readouterr().out
    assert "verdict: compared, window [100, 150), 50 paired steps, main fp8 vs replay bf16" in out
    assert "rel_mean_gap  +0.05" in out
    assert "WARN:" in out and "violation 1 of 2" in out  # the default policy waits for a second window


def test_compare_with_a_policy_that_switches(pair, capsys):
    assert main(["compare", *pair, "--policy", str(REPO / "policies/strict.yaml")]) == 0
    out = capsys.readouterr().out
    assert "SWITCH_TO_BF16:" in out and "roll back to step 100" in out and "next state: bf16_forever" in out


def test_compare_a_probe_starts_from_the_fallback_state(tmp_path, capsys):
    main_path = write_traj(tmp_path / "main.jsonl", 0, [2.0] * 200, "bf16")
    probe = write_traj(tmp_path / "probe.jsonl", 100, [2.0] * 50, "fp8")
    assert main(["compare", main_path, probe, "--set", "action.return_to_fp8.clean_probes=1"]) == 0
    out = capsys.readouterr().out
    assert "from state bf16_fallback" in out and "SWITCH_TO_FP8:" in out


def test_compare_lists_missing_and_nonfinite_steps(tmp_path, capsys):
    main_path = write_traj(tmp_path / "main.jsonl", 100, [2.0] * 10 + [float("nan")] + [2.0] * 5, "fp8")
    replay = write_traj(tmp_path / "replay.jsonl", 100, [2.0] * 20, "bf16")
    assert main(["compare", main_path, replay]) == 0
    out = capsys.readouterr().out
    assert "verdict: nonfinite" in out and "steps missing in main: 116-119" in out
    assert "non-finite main loss at steps: 110" in out and "SWITCH_TO_BF16" in out


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),
    ('{"step": 1}\n', "record 1 is not a step record"),
    ("not json\n" + '{"a": 1}\n', "line 1 is not valid JSON"),
    ('[1, 2]\n', "record 1 is not a step record (expected a JSON object"),
    ('{"step": "one", "loss": 2.0, "precision": "fp8", "tokens": 1, "step_time_s": 0, "grad_norm": 0, "lr": 0}\n',
     "step 'one' is not an integer"),
    ('{"step": 1, "loss": 2.0, "precision": "fp16", "tokens": 1, "step_time_s": 0, "grad_norm": 0, "lr": 0}\n',
     "precision 'fp16' is not 'fp8' or 'bf16'"),
    ("", "no step records"),
])
def test_compare_bad_input_exits_2_with_a_message(tmp_path, pair, capsys, content, message):
    replay = tmp_path / "bad_replay.jsonl"
    if content is not None:
        replay.write_text(content)
    assert main(["compare", pair[0], str(replay)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(replay) in err and "Traceback" not in err


def test_compare_with_a_bad_policy_exits_2(pair, tmp_path, capsys):
    bad = tmp_path / "p.yaml"
    bad.write_text("thresholds: {switch: .nan}\n")
    assert main(["compare", *pair, "--policy", str(bad)]) == 2
    assert f"{bad}: thresholds.switch: got nan" in capsys.readouterr().err


def test_python_m_shadow_policy_check_in_a_subprocess():
    result = subprocess.run([sys.executable, "-m", "shadow", "policy", "check", "policies/default.yaml"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "# policies/default.yaml: ok" in result.stdout and "thresholds:" in result.stdout


@pytest.fixture
def stopped_run(tmp_path):
    """A run directory as `shadow run --resume` reads it: started with one policy, resumed once with
    another (since deleted), and no checkpoint: resuming it fails, after the policy is loaded, at the
    missing checkpoint."""
    import json

    from shadow.config import load_job, to_yaml

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "job.yaml").write_text(to_yaml(load_job(None)))
    started = {"event": "run_started", "time_unix": 0.0, "job": "tiny", "run": "run", "precision": "fp8",
               "policy_path": str(tmp_path / "deleted-policy.yaml"), "store_uri": str(tmp_path / "checkpoints"),
               "resumed": False}
    resumed = {**started, "policy_path": str(tmp_path / "deleted-policy.yaml"), "resumed": True}
    started["policy_path"] = str(REPO / "policies/observe_only.yaml")
    (run_dir / "events.jsonl").write_text(json.dumps(started) + "\n" + json.dumps(resumed) + "\n")
    return run_dir


def test_resume_uses_the_runs_policy_unless_one_is_given(stopped_run, tmp_path, capsys):
    # no --policy: the policy the run was last (re)started with, which is gone
    assert main(["run", "--resume", str(stopped_run)]) == 2
    assert "deleted-policy.yaml" in capsys.readouterr().err
    # --policy given, even the default path: that file is loaded, and the resume goes on to the checkpoint
    for policy in ("policies/default.yaml", str(REPO / "policies/strict.yaml")):
        assert main(["run", "--resume", str(stopped_run), "--policy", policy]) == 2
        err = capsys.readouterr().err
        assert "deleted-policy.yaml" not in err and "no loadable checkpoint" in err, err
    broken = tmp_path / "broken.yaml"
    broken.write_text("thresholds:\n  warn: -1\n")
    assert main(["run", "--resume", str(stopped_run), "--policy", str(broken)]) == 2
    assert "broken.yaml" in capsys.readouterr().err
