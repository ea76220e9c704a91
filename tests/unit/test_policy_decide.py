"""The decision state machine, replay scheduling and noise calibration, one transition per test."""

import json
import math

import pytest

from shadow.compare import compare
from shadow.config.policy import load_policy
from shadow.policy import (DecisionKind, Machine, PolicyState, Purpose, ReplayRequest, calibrate, decide,
                           due_replays, effective_thresholds)
from shadow.records import StepRecord

K = DecisionKind


def policy(*overrides):
    """Default policy with rel_mean_gap thresholds warn 1%, switch 3%, plus `key=value` overrides."""
    return load_policy(None, ["thresholds.warn=0.01", "thresholds.switch=0.03", *overrides])


def verdict(start, rel_gap, *, main="fp8", replay="bf16", n=10, loss=2.0, nonfinite_fp8=False):
    """A window [start, start+n) where the FP8 side is worse by `rel_gap` of the BF16 loss."""
    fp8_losses = [loss * (1 + rel_gap)] * n
    if nonfinite_fp8:
        fp8_losses[-1] = math.nan
    bf16_losses = [loss] * n
    main_losses, replay_losses = (fp8_losses, bf16_losses) if main == "fp8" else (bf16_losses, fp8_losses)
    if main == replay:
        main_losses, replay_losses = [loss * (1 + rel_gap)] * n, [loss] * n
    rows = lambda losses, precision: [StepRecord(step=start + i, loss=x, precision=precision, tokens=1, step_time_s=0.1,
                                                 grad_norm=1.0, lr=1e-3) for i, x in enumerate(losses)]
    return compare(rows(main_losses, main), rows(replay_losses, replay))


def run(pol, gaps, state=None, main_step=None):
    """Feed verification windows at 100, 200, ... and return (final outcome, all outcomes)."""
    state = state or PolicyState()
    outcomes = []
    for i, gap in enumerate(gaps):
        v = verdict(state.since_step + 100 * (i + 1), gap) if not isinstance(gap, tuple) else gap[0]
        out = decide(pol, state, v, main_step=main_step or v.window_end + 5)
        outcomes.append(out)
        state = out.state
    return outcomes[-1], outcomes


def test_clean_window_is_a_note_and_becomes_the_rollback_target():
    out = decide(policy(), PolicyState(), verdict(100, 0.001), main_step=120)
    assert out.kinds == (K.NOTE,) and out.state.machine is Machine.FP8
    assert out.state.last_verified_step == 100 and out.state.last_window_start == 100
    assert "rel_mean_gap=+0.001" in out.decisions[0].reason and "warn 0.01" in out.decisions[0].reason


def test_warn_window():
    out = decide(policy(), PolicyState(), verdict(100, 0.02), main_step=120)
    assert out.kinds == (K.WARN,) and out.state.num_violations_in_row == 0
    assert "> warn 0.01" in out.decisions[0].reason


def test_consecutive_violations_switch_and_the_reason_carries_the_numbers():
    last, outcomes = run(policy("thresholds.consecutive=3"), [0.05, 0.05, 0.05])
    assert [o.kinds for o in outcomes] == [(K.WARN,), (K.WARN,), (K.SWITCH_TO_BF16,)]
    assert last.state.machine is Machine.BF16_FALLBACK and last.state.num_fallbacks == 1
    reason = last.decisions[0].reason
    assert "rel_mean_gap=+0.05" in reason and "switch 0.03" in reason and "3 of 3" in reason
    assert last.decisions[0].payload["on_switch"] == "bf16"


def test_a_window_at_or_below_switch_breaks_the_streak():
    _, outcomes = run(policy(), [0.05, 0.02, 0.05, 0.001, 0.05])
    assert all(K.SWITCH_TO_BF16 not in o.kinds for o in outcomes)
    assert outcomes[-1].state.num_violations_in_row == 1


def test_on_switch_bf16_resumes_at_the_current_step():
    out, _ = run(policy("thresholds.consecutive=1"), [0.05], main_step=777)
    assert out.decisions[0].payload["resume_step"] == 777 and out.state.since_step == 777


def test_on_switch_rollback_goes_to_the_last_clean_window():
    out, _ = run(policy("action.on_switch=rollback"), [0.001, 0.02, 0.05, 0.05])
    assert out.decisions[0].payload["resume_step"] == 100
    assert out.state.since_step == 100 and "roll back to step 100" in out.decisions[0].reason


def test_rollback_without_a_clean_window_goes_to_the_start_of_the_streak():
    out, _ = run(policy("action.on_switch=rollback"), [0.05, 0.05])
    assert out.decisions[0].payload["resume_step"] == 100


def test_adopt_replay_resumes_at_the_end_of_the_failing_window():
    out, _ = run(policy("action.on_switch=adopt_replay", "thresholds.consecutive=1"), [0.05])
    assert out.decisions[0].payload["resume_step"] == 110 and out.state.since_step == 110


def test_nonfinite_fp8_switches_at_once():
    v = verdict(100, 0.0, nonfinite_fp8=True)
    out = decide(policy("thresholds.consecutive=5"), PolicyState(), v, main_step=120)
    assert out.kinds == (K.SWITCH_TO_BF16,) and "non-finite" in out.decisions[0].reason


def test_nonfinite_bf16_side_is_only_noted():
    rows = lambda p, x: [StepRecord(step=100, loss=x, precision=p, tokens=1, step_time_s=0, grad_norm=0, lr=0)]
    v = compare(rows("fp8", 2.0), rows("bf16", math.nan))
    out = decide(policy("thresholds.consecutive=1"), PolicyState(), v, main_step=120)
    assert out.kinds == (K.NOTE,) and out.state.machine is Machine.FP8


def test_max_switches_makes_the_last_fallback_final():
    state = PolicyState(num_fallbacks=1)
    out, _ = run(policy("action.max_switches=2", "thresholds.consecutive=1"), [0.05], state=state)
    assert out.kinds == (K.SWITCH_TO_BF16, K.STAY_BF16) and out.state.machine is Machine.BF16_FOREVER
    later = decide(policy(), out.state, verdict(1000, 0.5, main="bf16", replay="fp8"), main_step=1100)
    assert later.kinds == (K.NOTE,) and later.state == out.state


def test_lowering_max_switches_mid_fallback_stays_bf16():
    state = PolicyState(machine=Machine.BF16_FALLBACK, num_fallbacks=2, since_step=100)
    out = decide(policy("action.max_switches=2"), state, verdict(300, 0.0, main="bf16", replay="fp8"),
                 main_step=400)
    assert out.kinds == (K.STAY_BF16,) and out.state.machine is Machine.BF16_FOREVER


def fallback(**changes):
    return PolicyState(machine=Machine.BF16_FALLBACK, since_step=100, num_fallbacks=1, **changes)


def test_clean_probes_switch_back_to_fp8_on_probation():
    pol = policy("action.return_to_fp8.clean_probes=2")
    first = decide(pol, fallback(), verdict(200, 0.001, main="bf16", replay="fp8"), main_step=260)
    assert first.kinds == (K.NOTE,) and first.state.num_clean_probes == 1
    second = decide(pol, first.state, verdict(300, 0.002, main="bf16", replay="fp8"), main_step=360)
    assert second.kinds == (K.SWITCH_TO_FP8,) and second.state.machine is Machine.FP8_PROBATION
    assert second.state.since_step == 360 and second.decisions[0].payload["resume_step"] == 360
    assert second.state.num_fallbacks == 1


def test_a_bad_probe_resets_the_clean_count():
    out = decide(policy(), fallback(num_clean_probes=1), verdict(200, 0.02, main="bf16", replay="fp8"),
                 main_step=260)
    assert out.kinds == (K.NOTE,) and out.state.num_clean_probes == 0 and out.state.machine is Machine.BF16_FALLBACK


def test_probe_orientation_is_judged_like_verification():
    """A probe where FP8 (the replay) is 5% worse must not count as clean; one-sided, 5% better does."""
    out = decide(policy("action.return_to_fp8.clean_probes=1"), fallback(),
                 verdict(200, 0.05, main="bf16", replay="fp8"), main_step=260)
    assert out.state.machine is Machine.BF16_FALLBACK
    better = decide(policy("action.return_to_fp8.clean_probes=1", "thresholds.two_sided=false"), fallback(),
                    verdict(200, -0.05, main="bf16", replay="fp8"), main_step=260)
    assert better.kinds == (K.SWITCH_TO_FP8,)


def test_without_probation_clean_probes_return_to_plain_fp8():
    pol = policy("action.return_to_fp8.clean_probes=1", "action.return_to_fp8.probation_windows=0")
    out = decide(pol, fallback(), verdict(200, 0.0, main="bf16", replay="fp8"), main_step=260)
    assert out.state.machine is Machine.FP8


def probation(**changes):
    return PolicyState(machine=Machine.FP8_PROBATION, since_step=400, num_fallbacks=1, **changes)


def test_one_violation_in_probation_switches_back():
    out = decide(policy("thresholds.consecutive=3"), probation(), verdict(500, 0.05), main_step=560)
    assert out.kinds == (K.SWITCH_TO_BF16,) and out.state.machine is Machine.BF16_FALLBACK
    assert out.state.num_fallbacks == 2 and "probation" in out.decisions[0].reason


def test_clean_probation_windows_restore_trust():
    pol = policy("action.return_to_fp8.probation_windows=2")
    first = decide(pol, probation(), verdict(500, 0.0), main_step=560)
    assert first.state.machine is Machine.FP8_PROBATION
    second = decide(pol, first.state, verdict(600, 0.0), main_step=660)
    assert second.state.machine is Machine.FP8 and "trusted again" in second.decisions[-1].reason
    assert second.state.since_step == 400  # not a precision switch


def test_observe_mode_reports_and_never_switches():
    pol = policy("action.mode=observe", "thresholds.consecutive=2")
    last, outcomes = run(pol, [0.05, 0.05, 0.05])
    assert [o.kinds for o in outcomes] == [(K.WARN,), (K.REPORT,), (K.REPORT,)]
    assert last.state.machine is Machine.FP8 and last.state.num_fallbacks == 0
    assert last.decisions[0].payload["would"] == "switch_to_bf16"


def test_observe_mode_reports_stay_bf16_too():
    pol = policy("action.mode=observe", "thresholds.consecutive=1", "action.max_switches=1")
    out, _ = run(pol, [0.05])
    assert out.kinds == (K.REPORT, K.REPORT) and {d.payload["would"] for d in out.decisions} == {
        "switch_to_bf16", "stay_bf16"}


def test_windows_from_before_the_regime_are_ignored():
    state = PolicyState(machine=Machine.FP8_PROBATION, since_step=400)
    out = decide(policy("thresholds.consecutive=1"), state, verdict(300, 0.5), main_step=460)
    assert out.kinds == (K.NOTE,) and out.state == state and "before the current regime" in out.decisions[0].reason


def test_a_probe_verdict_in_fp8_state_is_ignored():
    out = decide(policy(), PolicyState(), verdict(100, 0.5, main="bf16", replay="fp8"), main_step=160)
    assert out.kinds == (K.NOTE,) and out.state == PolicyState()


def test_an_older_window_than_one_already_judged_is_not_counted():
    state = PolicyState(last_window_start=200, num_violations_in_row=1)
    out = decide(policy(), state, verdict(100, 0.001), main_step=260)
    assert out.kinds == (K.NOTE,) and out.state.num_violations_in_row == 1


def test_a_window_without_paired_steps_is_noted_with_what_is_missing():
    rows = [StepRecord(step=s, loss=2.0, precision="bf16", tokens=1, step_time_s=0, grad_norm=0, lr=0) for s in (100, 101)]
    out = decide(policy(), PolicyState(), compare([], rows), main_step=90)
    assert out.kinds == (K.NOTE,) and "no step present on both sides; 2 steps missing in main" in out.decisions[0].reason


def test_an_unavailable_metric_is_noted():
    pol = policy("compare.metric=eval_gap", "verify.eval_batches=2")
    out = decide(pol, PolicyState(), verdict(100, 0.5), main_step=160)
    assert out.kinds == (K.NOTE,) and "unavailable" in out.decisions[0].reason


def test_trend_warning_when_the_gap_grows_window_after_window():
    pol = policy("thresholds.trend_windows=3")
    last, outcomes = run(pol, [0.001, 0.002, 0.004])
    assert [o.kinds for o in outcomes] == [(K.NOTE,), (K.NOTE,), (K.NOTE, K.WARN)]
    assert "grew in each of the last 3" in last.decisions[-1].reason
    _, flat = run(pol, [0.004, 0.002, 0.003])
    assert all(K.WARN not in o.kinds for o in flat)


def test_the_trend_needs_only_the_last_windows_in_the_state():
    """The state keeps trend_windows - 1 values, so a decision costs the same at any run length; a
    switch starts a new regime with no trend behind it, and the values survive a resume."""
    pol = policy("thresholds.trend_windows=3")
    last, _ = run(pol, [0.001] * 50 + [0.002, 0.003])
    assert [(start, round(value, 9)) for start, value in last.state.recent_verifications] == [(5100, 0.002), (5200, 0.003)]
    assert PolicyState.from_dict(json.loads(json.dumps(last.state.to_dict()))) == last.state
    grows = decide(pol, last.state, verdict(5300, 0.004), main_step=5360)
    assert grows.kinds == (K.NOTE, K.WARN)
    switched, _ = run(policy("thresholds.trend_windows=3", "thresholds.consecutive=1"), [0.001, 0.002, 0.05])
    assert switched.state.recent_verifications == ()


def test_two_sided_the_trend_watches_the_size_of_the_gap():
    growing_in_fp8s_favour = [-0.001, -0.002, -0.004]
    last, _ = run(policy("thresholds.trend_windows=3"), growing_in_fp8s_favour)
    assert last.kinds == (K.NOTE, K.WARN) and "-0.001, -0.002, -0.004" not in last.decisions[-1].reason
    one_sided, _ = run(policy("thresholds.trend_windows=3", "thresholds.two_sided=false"), growing_in_fp8s_favour)
    assert one_sided.kinds == (K.NOTE,)


def test_two_sided_thresholds_judge_a_gap_in_fp8s_favour_by_its_size():
    """FP8 main 5% *better* than its BF16 replay: ignored one-sided, a violation two-sided (a model
    that depends on FP8's clipping does worse in BF16)."""
    one_sided = decide(policy("thresholds.consecutive=1", "thresholds.two_sided=false"), PolicyState(),
                       verdict(100, -0.05), main_step=160)
    assert one_sided.kinds == (K.NOTE,)
    pol = policy("thresholds.consecutive=1", "thresholds.two_sided=true")
    out = decide(pol, PolicyState(), verdict(100, -0.05), main_step=160)
    assert out.kinds == (K.SWITCH_TO_BF16,) and "rel_mean_gap=-0.05 (size 0.05) > switch" in out.decisions[0].reason
    assert decide(pol, PolicyState(), verdict(100, -0.02), main_step=160).kinds == (K.WARN,)
    assert decide(pol, PolicyState(), verdict(100, -0.005), main_step=160).kinds == (K.NOTE,)
    probe = decide(policy("thresholds.two_sided=true", "action.return_to_fp8.clean_probes=1"), fallback(),
                   verdict(200, -0.05, main="bf16", replay="fp8"), main_step=260)
    assert K.SWITCH_TO_FP8 not in probe.kinds and probe.state.num_clean_probes == 0


def test_noise_calibration_pending_does_not_count_violations():
    pol = policy("noise.enabled=true", "thresholds.consecutive=1")
    out = decide(pol, PolicyState(), verdict(100, 0.05), main_step=160)
    assert out.kinds == (K.WARN,) and "calibration pending" in out.decisions[0].reason
    assert out.state.num_violations_in_row == 0


def test_noise_windows_set_the_floor_and_raise_thresholds():
    pol = policy("noise.enabled=true", "noise.num_windows=2", "noise.multiplier=2")
    first = decide(pol, PolicyState(), verdict(100, 0.002, main="fp8", replay="fp8"), main_step=160)
    assert first.state.noise_floor is None and len(first.state.noise_values) == 1
    second = decide(pol, first.state, verdict(200, -0.004, main="fp8", replay="fp8"), main_step=260)
    assert second.state.noise_floor == pytest.approx(0.004)
    thresholds = effective_thresholds(pol, second.state.noise_floor)
    assert thresholds.warn == pytest.approx(0.01 + 0.008) and thresholds.switch == pytest.approx(0.03 + 0.008)
    judged = decide(pol, second.state, verdict(300, 0.015), main_step=360)
    assert judged.kinds == (K.NOTE,)  # 1.5% is below the raised warn of 1.8%


def test_bit_exact_noise_leaves_thresholds_as_configured():
    pol = policy("noise.enabled=true")
    noise = [verdict(s, 0.0, main="fp8", replay="fp8") for s in (100, 200)]
    assert calibrate(pol, noise) == pol.thresholds
    assert calibrate(pol, [verdict(100, 0.01, main="bf16", replay="bf16")]).warn > pol.thresholds.warn


def test_state_and_decisions_round_trip_through_json():
    out, _ = run(policy("thresholds.consecutive=1", "noise.enabled=false"), [0.05])
    state = PolicyState(noise_values=(0.1, 0.2), noise_floor=0.2, machine=Machine.FP8_PROBATION, since_step=5)
    assert PolicyState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    assert PolicyState.from_dict(json.loads(json.dumps(out.state.to_dict()))) == out.state
    event = json.loads(json.dumps([d.to_dict() for d in out.decisions], allow_nan=False))
    assert event[0]["kind"] == "switch_to_bf16" and event[0]["payload"]["resume_step"] == out.state.since_step


# --- scheduling -------------------------------------------------------------------------------

CKPTS = [50, 100, 150, 200, 250, 300]


def test_verification_cadence_picks_the_first_checkpoint_of_each_span():
    pol = policy("verify.every_n_steps=100", "verify.max_concurrent_replays=5")
    due = due_replays(pol, PolicyState(), main_step=300, committed_steps=CKPTS, in_flight=[], total_steps=300)
    assert [r.start_step for r in due] == [50, 100, 200]
    assert all(r.purpose is Purpose.VERIFY and r.precision == "bf16" and r.num_steps == 50 for r in due)


def test_concurrency_limit_and_newest_first():
    pol = policy("verify.max_concurrent_replays=2")
    busy = [ReplayRequest(300, 50, "bf16", Purpose.VERIFY)]
    assert due_replays(pol, PolicyState(), main_step=400, committed_steps=CKPTS + [350, 400],
                       in_flight=busy + busy) == []
    # 300 is in flight, so only later spans are due, and there is none yet
    assert due_replays(pol, PolicyState(), main_step=380, committed_steps=CKPTS + [350], in_flight=busy) == []
    due = due_replays(pol, PolicyState(), main_step=300, committed_steps=CKPTS, in_flight=[])
    assert [r.start_step for r in due] == [200, 300]


def test_decided_windows_are_not_scheduled_again():
    state = PolicyState(last_window_start=200)
    due = due_replays(policy("verify.max_concurrent_replays=4"), state, main_step=300, committed_steps=CKPTS,
                      in_flight=[])
    assert [r.start_step for r in due] == [300]


def test_windows_never_reach_past_the_job_or_before_the_regime():
    pol = policy("verify.max_concurrent_replays=9", "verify.every_n_steps=50")
    due = due_replays(pol, PolicyState(machine=Machine.FP8_PROBATION, since_step=150), main_step=300,
                      committed_steps=CKPTS, in_flight=[], total_steps=300)
    assert [r.start_step for r in due] == [150, 200, 250]
    assert due_replays(pol, PolicyState(), main_step=120, committed_steps=CKPTS, in_flight=[]) == [
        ReplayRequest(50, 50, "bf16", Purpose.VERIFY), ReplayRequest(100, 50, "bf16", Purpose.VERIFY)]


def test_probes_start_after_steps_in_bf16_and_run_fp8():
    pol = policy("action.return_to_fp8.after_steps=100", "verify.max_concurrent_replays=9")
    state = PolicyState(machine=Machine.BF16_FALLBACK, since_step=130, num_fallbacks=1)
    due = due_replays(pol, state, main_step=400, committed_steps=CKPTS + [350, 400], in_flight=[])
    assert [r.start_step for r in due] == [250, 300, 400]
    assert all(r.purpose is Purpose.PROBE and r.precision == "fp8" for r in due)


def test_scheduling_looks_only_past_the_high_water_marks():
    """A long run (every checkpoint kept, many windows settled) schedules like a short one."""
    pol = policy("verify.every_n_steps=100", "verify.max_concurrent_replays=2")
    committed = list(range(0, 100_001, 50))
    settled = [ReplayRequest(99_700, 50, "bf16", Purpose.VERIFY)]
    state = PolicyState(last_window_start=99_600)
    due = due_replays(pol, state, main_step=100_000, committed_steps=committed, in_flight=[], settled=settled,
                      total_steps=100_000)
    assert [r.start_step for r in due] == [99_800, 99_900]


def test_no_replays_when_bf16_forever():
    state = PolicyState(machine=Machine.BF16_FOREVER)
    assert due_replays(policy(), state, main_step=300, committed_steps=CKPTS, in_flight=[]) == []


def test_noise_windows_come_first_in_the_main_precision():
    pol = policy("noise.enabled=true", "noise.num_windows=2", "verify.max_concurrent_replays=3")
    due = due_replays(pol, PolicyState(), main_step=300, committed_steps=CKPTS, in_flight=[], total_steps=400)
    assert [(r.purpose, r.start_step, r.precision) for r in due] == [
        (Purpose.NOISE, 250, "fp8"), (Purpose.NOISE, 300, "fp8"), (Purpose.VERIFY, 300, "bf16")]
    calibrated = PolicyState(noise_values=(0.0, 0.0), noise_floor=0.0)
    assert all(r.purpose is Purpose.VERIFY for r in due_replays(
        pol, calibrated, main_step=300, committed_steps=CKPTS, in_flight=[]))
