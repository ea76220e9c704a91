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
    # the default window (25 steps) every 50 steps instead of 100: [0, 25) and [50, 75) in 75 steps; the
    # second starts once the first is done, however slow the machine, since no newer span can take its place
    code, out, summary, events = shadow_run(tmp_path / "healthy", "--job", str(REPO / "jobs/tiny.yaml"),
                                            "--set", "steps=75", "--policy-set", "verify.every_n_steps=50")
    assert code == 0 and summary["phase"] == "finished"
    assert summary["final_step"] == 75 and summary["steps_fp8"] == 75
    assert summary["num_verifications"] == 2
    assert summary["num_precision_switches"] == 0
    assert all(v["level"] == "clean" for v in summary["verdicts"]), summary["verdicts"]
    for key in ("final_loss", "steps_bf16", "verdicts", "verification_cost", "wall_s", "effective_speedup"):
        assert key in summary
    assert summary["verification_cost"] == pytest.approx(25 * summary["num_verifications"] / 75)
    kept, discarded = read_history(out)
    assert [r.step for r in kept] == list(range(75)) and not discarded
    assert len(list((out / "replays").glob("*.jsonl"))) == summary["num_verifications"]


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
