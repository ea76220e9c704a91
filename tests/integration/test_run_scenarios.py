"""The healthy and degraded scenarios of `shadow run` on the tiny jobs at full model size, where the
default policy's thresholds are tuned (real local Ray, real training on CPU). The degraded one runs with
a main job of two FSDP2 ranks verified by one-rank replays (a one-rank main job switching on a failing
verification: test_run_local.py and test_triggers.py; the healthy scenario at two ranks: test_scale_out.py)."""

import json

import pytest
from conftest import REPO, kinds_of, shadow_run

from shadow.cli import main
from shadow.rundir import read_history

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]


TWO_RANKS = ["--set", "resources.num_ranks=2", "--policy-set", "verify.replay_resources.num_ranks=1"]


def test_healthy_tiny_job_verifies_and_never_switches(tmp_path):
    # The default policy (adaptive cadence, early stopping) from a base interval of 25 steps instead of
    # 100: the clean window from step 0 doubles the interval to 50, so the next window starts at the
    # checkpoint of step 50 (a fixed cadence would start one at 25 too), and each window ends once 10+
    # steps put its intervals within warn.
    code, out, summary, events = shadow_run(tmp_path / "healthy", "--job", str(REPO / "jobs/tiny.yaml"),
                                            "--set", "steps=75", "--set", "checkpoint.every_steps=25",
                                            "--policy-set", "verify.every_n_steps=25")
    assert code == 0 and summary["phase"] == "finished"
    assert summary["final_step"] == 75 and summary["steps_fp8"] == 75
    assert summary["num_verifications"] == 2
    assert [v["window_start"] for v in summary["verdicts"]] == [0, 50]
    intervals = [e["reason"] for e in kinds_of(events, "decision") if e["name"] and "verify" in e["name"]]
    assert "verification interval 50 steps" in intervals[0] and "verification interval 100 steps" in intervals[1]
    assert summary["num_precision_switches"] == 0
    assert all(v["level"] == "clean" for v in summary["verdicts"]), summary["verdicts"]
    for key in ("final_loss", "steps_bf16", "verdicts", "verification_cost", "wall_s", "effective_speedup"):
        assert key in summary
    # the windows stopped early: the verdicts say at how many steps, and the cost counts only those
    stopped = [v["stopped_early"] for v in summary["verdicts"]]
    assert all(s["level"] == "clean" and 10 <= s["steps"] < s["planned_steps"] == 25 for s in stopped), stopped
    assert [v["window_end"] - v["window_start"] for v in summary["verdicts"]] == [s["steps"] for s in stopped]
    finished = kinds_of(events, "replay_finished")
    assert [(e["steps"], e["planned_steps"], e["stopped_early"]) for e in finished] == [
        (s["steps"], 25, True) for s in stopped]
    assert len(kinds_of(events, "replay_stopped_early")) == 2
    replayed = sum(s["steps"] for s in stopped)
    assert summary["replay_steps"] == {"bf16": replayed}
    assert summary["verification_cost"] == pytest.approx(replayed / 75)
    # the ledger: FP8 main steps and BF16 replay steps on the same device and rank count
    speed = summary["effective_speedup"]
    assert speed["basis"] == "measured" and speed["assumed"] is None, speed
    measured = speed["measured"]
    assert (measured["num_fp8_steps"], measured["num_bf16_steps"]) == (75, replayed)
    assert measured["device"] == "cpu x1 threads" and measured["num_ranks"] == 1 and measured["fp8_emulated"]
    assert measured["fp8_speedup"] == pytest.approx(measured["bf16_step_s"] / measured["fp8_step_s"])
    assert speed["wall"] == pytest.approx(measured["fp8_speedup"])  # every kept step FP8, none discarded
    kept, discarded = read_history(out)
    assert [r.step for r in kept] == list(range(75)) and not discarded
    replays = sorted((out / "replays").glob("*.jsonl"))
    assert [len(p.read_text().splitlines()) for p in replays] == [s["steps"] for s in stopped]


def test_degraded_two_rank_job_switches_at_first_failing_verification_and_ends_near_bf16(tmp_path):
    steps = ["--set", "steps=60"]  # unguarded FP8 held-out +45% vs BF16 at 60 steps (300-step figures: docs)
    job = str(REPO / "jobs/tiny_noscale.yaml")
    code, out, summary, events = shadow_run(tmp_path / "guarded", "--job", job, *steps, *TWO_RANKS)
    assert code == 0
    assert kinds_of(events, "main_started")[0]["ranks"] == 2
    first_verdict = kinds_of(events, "verdict")[0]
    assert first_verdict["level"] == "violation"
    switch = kinds_of(events, "precision_switched")[0]
    assert switch["old"] == "fp8" and switch["new"] == "bf16"
    assert switch["reason"].startswith(f"window [{first_verdict['window_start']}, {first_verdict['window_end']})")
    for precision in ("bf16", "fp8"):
        assert main(["train", "--job", job, *steps, "--precision", precision, "--out",
                     str(tmp_path / precision)]) == 0
    bf16 = json.loads((tmp_path / "bf16" / "summary.json").read_text())
    fp8 = json.loads((tmp_path / "fp8" / "summary.json").read_text())
    assert abs(summary["final_loss"] - bf16["final_loss"]) / bf16["final_loss"] < 0.02
    assert abs(summary["final_eval_loss"] - bf16["final_eval_loss"]) / bf16["final_eval_loss"] < 0.02
    assert (fp8["final_eval_loss"] - bf16["final_eval_loss"]) / bf16["final_eval_loss"] > 0.10
