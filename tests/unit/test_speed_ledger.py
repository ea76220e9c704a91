"""The measured ledger: step times that compare (`shadow/controller/speed.py`), the effective speedup in
summary.json and on the console (`summary.py`), and `action.fp8_must_pay` acting on it (`policy/pays.py`)."""

from dataclasses import replace

import pytest

from shadow.config.policy import Mode, PayAct, Policy
from shadow.controller.speed import MIN_TIMED_STEPS, MainSetup, StepTimes, describe
from shadow.controller.summary import build_summary, format_summary
from shadow.policy import DecisionKind, Machine, PolicyState, judge_speed
from shadow.records import StepRecord

CPU = MainSetup("cpu x1 threads", 1, fp8_emulated=True)


def rows(precision, seconds, n, start=0):
    return [StepRecord(step=start + i, loss=2.0, precision=precision, tokens=1, step_time_s=seconds, grad_norm=1.0,
                       lr=1e-3) for i in range(n)]


def test_fp8_main_steps_and_bf16_replays_on_the_same_device_and_ranks_give_the_speedup():
    times = StepTimes()
    times.add_main(rows("fp8", 0.4, 30))
    times.add_replay(rows("bf16", 0.3, 9) + rows("bf16", 5.0, 1), "cpu x1 threads", 1)  # a cold first step
    measured = times.measured(CPU)
    assert measured["fp8_speedup"] == pytest.approx(0.75)  # medians: the cold step does not count
    assert (measured["num_fp8_steps"], measured["num_bf16_steps"]) == (30, 10)
    assert measured["fp8_emulated"] and measured["device"] == "cpu x1 threads" and measured["num_ranks"] == 1
    assert describe(measured) == ("FP8 = 0.75x BF16 per step (emulated FP8, cpu x1 threads, 1 rank; medians of 30 "
                                  "FP8 and 10 BF16 steps)")


def test_replays_on_another_rank_count_or_device_do_not_compare():
    times = StepTimes()
    times.add_main(rows("fp8", 0.4, 30))
    times.add_replay(rows("bf16", 0.3, 20), "cpu x1 threads", 2)
    times.add_replay(rows("bf16", 0.3, 20), "NVIDIA H100 80GB HBM3", 1)
    assert times.measured(CPU) is None
    why = times.why_not(CPU)
    assert "30 FP8 and 0 BF16 steps on the main job's cpu x1 threads, 1 rank" in why
    assert "replays ran on NVIDIA H100 80GB HBM3, 1 rank and cpu x1 threads, 2 ranks" in why


def test_the_main_jobs_own_bf16_steps_compare_and_too_few_steps_measure_nothing():
    times = StepTimes()
    times.add_main(rows("fp8", 0.2, 20) + rows("bf16", 0.3, MIN_TIMED_STEPS - 1))
    assert times.measured(CPU) is None
    times.add_main(rows("bf16", 0.3, 1))
    assert times.measured(CPU)["fp8_speedup"] == pytest.approx(1.5)
    assert times.measured(None) is None and times.why_not(None) == "the main job never started"


def summary(measured, replay_steps=None):
    history = rows("fp8", 0.2, 100)
    return build_summary(history=history, trained=history, replay_steps=replay_steps or {"bf16": 20}, verdicts=[],
                         triggers=[], num_triggered_replays=0, num_precision_switches=0, final_eval_loss=None,
                         checkpoint_waits_s=[], fp8_speedup=1.3, measured=measured, not_measured="0 BF16 steps",
                         wall_s=1.0, phase="finished", policy_state={})


def test_the_summary_uses_the_measured_speedup_and_labels_it():
    times = StepTimes()
    times.add_main(rows("fp8", 0.2, 100))
    times.add_replay(rows("bf16", 0.3, 20), "cpu x1 threads", 1)
    speed = summary(times.measured(CPU))["effective_speedup"]
    assert speed["basis"] == "measured" and speed["assumed"] is None
    assert speed["fp8_speedup"] == speed["measured"]["fp8_speedup"] == pytest.approx(1.5)
    assert speed["wall"] == pytest.approx(1.5)  # 100 / (100 / 1.5)
    assert speed["compute"] == pytest.approx(100 / (100 / 1.5 + 20))  # the 20 replay steps that ran
    assert speed["measured"]["compute"] == speed["compute"]
    line = next(x for x in format_summary(summary(times.measured(CPU))).splitlines() if "effective speedup" in x)
    assert "(measured: FP8 = 1.50x BF16 per step (emulated FP8, cpu x1 threads, 1 rank;" in line


def test_without_a_measurement_the_assumed_speedup_is_used_and_says_so():
    speed = summary(None)["effective_speedup"]
    assert speed["basis"] == "assumed" and speed["measured"] is None
    assert speed["assumed"] == {"fp8_speedup": 1.3, "wall": speed["wall"], "compute": speed["compute"],
                                "why": "nothing comparable measured: 0 BF16 steps"}
    line = next(x for x in format_summary(summary(None)).splitlines() if "effective speedup" in x)
    assert "(assumed: FP8 = 1.3x BF16 per step, run.fp8_speedup; nothing comparable measured: 0 BF16 steps)" in line


def must_pay(min_speedup, act="report", mode="enforce"):
    base = Policy()
    return replace(base, action=replace(base.action, mode=Mode(mode),
                                        fp8_must_pay=replace(base.action.fp8_must_pay, min_speedup=min_speedup,
                                                             act=PayAct(act))))


def test_fp8_must_pay_is_off_by_default_and_judges_once():
    assert judge_speed(Policy(), PolicyState(), fp8_speedup=0.5, measured="m", main_step=10) is None
    out = judge_speed(must_pay(1.05), PolicyState(), fp8_speedup=1.3, measured="FP8 = 1.30x", main_step=10)
    assert out.kinds == (DecisionKind.NOTE,) and "FP8 pays on this job: measured FP8 = 1.30x" in out.decisions[0].reason
    assert out.state.fp8_pay_judged
    assert judge_speed(must_pay(1.05), out.state, fp8_speedup=0.5, measured="m", main_step=20) is None


def test_fp8_that_does_not_pay_is_reported_or_switched_off_for_good():
    out = judge_speed(must_pay(1.05), PolicyState(), fp8_speedup=0.74, measured="FP8 = 0.74x", main_step=10)
    assert out.kinds == (DecisionKind.WARN,) and out.state.machine is Machine.FP8
    assert out.decisions[0].reason == ("FP8 does not pay on this job: measured FP8 = 0.74x, below "
                                       "action.fp8_must_pay.min_speedup 1.05")
    out = judge_speed(must_pay(1.05, "switch"), PolicyState(), fp8_speedup=0.74, measured="m", main_step=60)
    assert out.kinds == (DecisionKind.STAY_BF16,) and out.state.machine is Machine.BF16_FOREVER
    assert out.state.since_step == 60 and out.state.num_fallbacks == 0
    out = judge_speed(must_pay(1.05, "switch", "observe"), PolicyState(), fp8_speedup=0.74, measured="m", main_step=60)
    assert out.kinds == (DecisionKind.REPORT,) and out.state.machine is Machine.FP8
    forever = PolicyState(machine=Machine.BF16_FOREVER)
    assert judge_speed(must_pay(1.05), forever, fp8_speedup=0.74, measured="m", main_step=60) is None


def test_a_resumed_run_keeps_the_times_measured_before():
    times = StepTimes.resumed(rows("fp8", 0.4, 30), [(rows("bf16", 0.3, 12), "cpu x1 threads", 1),
                                                     (rows("bf16", 0.1, 12), "cpu x1 threads", 2)])
    assert times.measured(CPU)["fp8_speedup"] == pytest.approx(0.75)
    assert times.measured(CPU)["num_bf16_steps"] == 12
