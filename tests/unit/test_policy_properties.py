"""Properties of the brain that must hold for every policy and trajectory, checked with hypothesis."""

import random
from dataclasses import replace

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from shadow.compare import compare
from shadow.config.policy import Metric, Mode, OnSwitch, Policy, ThresholdsConfig, policy_from_text
from shadow.config.loader import to_dict
from shadow.policy import (DecisionKind, Machine, PolicyState, Purpose, ReplayRequest, decide, due_replays,
                           scale_thresholds)
from shadow.records import StepRecord

GAP_METRICS = ["mean_gap", "rel_mean_gap", "end_gap", "rel_end_gap", "max_abs_gap"]
LOSS_METRICS = GAP_METRICS + ["slope", "t_stat"]
SETTINGS = settings(max_examples=120, deadline=None)

losses_st = st.lists(st.floats(min_value=0.5, max_value=8.0), min_size=1, max_size=30)
threshold_pair = st.tuples(st.floats(0.0, 5.0), st.floats(0.0, 5.0)).map(sorted)


def rows(start, losses, precision):
    return [StepRecord(step=start + i, loss=x, precision=precision, tokens=1, step_time_s=0.1, grad_norm=1.0, lr=1e-3)
            for i, x in enumerate(losses)]


def make_policy(metric, warn, switch, consecutive, on_switch="bf16", noise=False, mode="enforce", two_sided=False):
    """A valid policy built directly (YAML parsing has its own property below, and costs ~10 ms)."""
    base = Policy()
    return replace(
        base,
        compare=replace(base.compare, metric=Metric(metric)),
        thresholds=replace(base.thresholds, warn=warn, switch=switch, consecutive=consecutive, two_sided=two_sided),
        action=replace(base.action, on_switch=OnSwitch(on_switch), mode=Mode(mode)),
        noise=replace(base.noise, enabled=noise),
    )


def run_windows(policy, windows, state=None):
    """Feed (bf16 losses, fp8 losses) windows as verification windows 100 steps apart; all decisions."""
    state = state or PolicyState()
    kinds = []
    for i, (bf16, fp8) in enumerate(windows):
        start = state.since_step + 100 * (i + 1)
        verdict = compare(rows(start, fp8, "fp8"), rows(start, bf16, "bf16"))
        out = decide(policy, state, verdict, main_step=start + len(bf16))
        kinds.append(out.kinds)
        state = out.state
    return kinds


@SETTINGS
@given(metric=st.sampled_from(LOSS_METRICS), thresholds=threshold_pair, consecutive=st.integers(1, 4),
       trajectories=st.lists(losses_st, min_size=1, max_size=6), noise=st.booleans(),
       mode=st.sampled_from(["enforce", "observe"]))
def test_identical_trajectories_never_warn_or_switch(metric, thresholds, consecutive, trajectories, noise, mode):
    policy = make_policy(metric, *thresholds, consecutive, noise=noise, mode=mode)
    for kinds in run_windows(policy, [(losses, losses) for losses in trajectories]):
        assert set(kinds) == {DecisionKind.NOTE}


@SETTINGS
@given(metric=st.sampled_from(GAP_METRICS), thresholds=threshold_pair, consecutive=st.integers(1, 5),
       losses=st.lists(losses_st, min_size=5, max_size=5), margin=st.floats(0.01, 1.0),
       on_switch=st.sampled_from(["bf16", "rollback", "adopt_replay"]))
def test_a_constant_gap_above_switch_for_consecutive_windows_always_switches(metric, thresholds, consecutive, losses,
                                                                              margin, on_switch):
    warn, switch = thresholds
    policy = make_policy(metric, warn, switch, consecutive, on_switch=on_switch)
    # in the metric's unit: relative metrics divide by the BF16 loss, so scale the gap by the largest loss
    windows = []
    for bf16 in losses[:consecutive]:
        delta = (switch + margin) * (max(bf16) if metric.startswith("rel_") else 1.0)
        windows.append((bf16, [x + delta for x in bf16]))
    kinds = run_windows(policy, windows)
    assert all(DecisionKind.SWITCH_TO_BF16 not in k for k in kinds[:-1])
    assert kinds[-1][0] is DecisionKind.SWITCH_TO_BF16


def _shuffled(data, rng):
    if not isinstance(data, dict):
        return data
    keys = list(data)
    rng.shuffle(keys)
    return {key: _shuffled(data[key], rng) for key in keys}


policy_values = st.fixed_dictionaries({
    "compare": st.fixed_dictionaries({"metric": st.sampled_from(GAP_METRICS), "end_fraction": st.floats(0.1, 1.0)}),
    "thresholds": st.fixed_dictionaries({"warn": st.floats(0.0, 0.05), "switch": st.floats(0.05, 0.5),
                                         "consecutive": st.integers(1, 3),
                                         "trend_windows": st.sampled_from([0, 2, 3])}),
    "action": st.fixed_dictionaries({"on_switch": st.sampled_from(["bf16", "rollback", "adopt_replay"]),
                                     "max_switches": st.integers(1, 3),
                                     "return_to_fp8": st.fixed_dictionaries({"clean_probes": st.integers(1, 3)})}),
})


@settings(max_examples=60, deadline=None)  # two YAML loads per example: the slow part of this file
@given(values=policy_values, seed=st.integers(0, 2**32 - 1),
       gaps=st.lists(st.floats(-0.2, 0.6), min_size=1, max_size=8), losses=losses_st)
def test_decisions_do_not_depend_on_yaml_key_order(values, seed, gaps, losses):
    rng = random.Random(seed)
    text_a = yaml.safe_dump(values, sort_keys=True)
    text_b = yaml.safe_dump(_shuffled(values, rng), sort_keys=False)
    policy_a, policy_b = policy_from_text(text_a, "a.yaml"), policy_from_text(text_b, "b.yaml")
    assert policy_a == policy_b
    windows = [(losses, [x * (1 + g) for x in losses]) for g in gaps]
    assert run_windows(policy_a, windows) == run_windows(policy_b, windows)


def _first_switch(kinds):
    return next((i for i, k in enumerate(kinds) if DecisionKind.SWITCH_TO_BF16 in k), len(kinds))


@SETTINGS
@given(metric=st.sampled_from(LOSS_METRICS), thresholds=threshold_pair,
       raise_by=st.tuples(st.floats(0, 2), st.floats(0, 2)),
       consecutive=st.integers(1, 3), gaps=st.lists(st.floats(-0.5, 3.0), min_size=1, max_size=8), losses=losses_st)
def test_raising_a_threshold_never_makes_a_switch_come_sooner(metric, thresholds, raise_by, consecutive, gaps, losses):
    warn, switch = thresholds
    higher_switch = switch + raise_by[1]
    higher_warn = min(warn + raise_by[0], higher_switch)
    windows = [(losses, [x * (1 + g) for x in losses]) for g in gaps]
    low = run_windows(make_policy(metric, warn, switch, consecutive), windows)
    high = run_windows(make_policy(metric, higher_warn, higher_switch, consecutive), windows)
    assert _first_switch(high) >= _first_switch(low)


@SETTINGS
@given(warn=st.floats(0, 1), switch_extra=st.floats(0, 1), multiplier=st.floats(0.1, 10), floor=st.floats(0, 1),
       bump=st.floats(0, 1))
def test_noise_scaling_is_monotone_and_exact_at_zero_floor(warn, switch_extra, multiplier, floor, bump):
    base = ThresholdsConfig(warn=warn, switch=warn + switch_extra)
    assert scale_thresholds(base, multiplier, 0.0) == base
    scaled = scale_thresholds(base, multiplier, floor)
    assert scaled.warn >= base.warn and scaled.switch >= base.switch and scaled.warn <= scaled.switch
    for raised in (ThresholdsConfig(warn=warn + bump, switch=warn + bump + switch_extra),
                   ThresholdsConfig(warn=warn, switch=warn + switch_extra + bump)):
        higher = scale_thresholds(raised, multiplier, floor)
        assert higher.warn >= scaled.warn and higher.switch >= scaled.switch
    more_noise = scale_thresholds(base, multiplier, floor + bump)
    assert more_noise.warn >= scaled.warn and more_noise.switch >= scaled.switch


def test_shipped_default_round_trips_through_yaml():
    policy = Policy()
    assert policy_from_text(yaml.safe_dump(to_dict(policy)), "dumped.yaml") == policy
    assert PolicyState().machine is Machine.FP8


@SETTINGS
@given(metric=st.sampled_from(["mean_gap", "end_gap"]), thresholds=threshold_pair, consecutive=st.integers(1, 3),
       gaps=st.lists(st.floats(-3.0, 3.0), min_size=1, max_size=6), losses=losses_st)
def test_two_sided_decisions_do_not_depend_on_which_side_is_worse(metric, thresholds, consecutive, gaps, losses):
    """Two-sided, FP8 worse by d and BF16 worse by d are the same verdict level (absolute metrics)."""
    policy = make_policy(metric, *thresholds, consecutive, two_sided=True)
    fp8_worse = [(losses, [x + abs(g) for x in losses]) for g in gaps]
    bf16_worse = [([x + abs(g) for x in losses], losses) for g in gaps]
    assert run_windows(policy, fp8_worse) == run_windows(policy, bf16_worse)


def _due_by_full_scan(policy, state, main_step, committed, in_flight, total_steps, settled):
    """Reference: the cadence rule over every committed checkpoint (what `due_replays` must equal)."""
    free = policy.verify.max_concurrent_replays - len(in_flight)
    if free <= 0 or state.machine is Machine.BF16_FOREVER:
        return []
    window, every = policy.verify.window_steps, policy.verify.every_n_steps
    usable = [s for s in committed if state.since_step <= s <= main_step and s + window <= total_steps]
    probing = state.machine is Machine.BF16_FALLBACK
    noise = []
    if policy.noise.enabled and state.noise_floor is None:
        flying = [r.start_step for r in in_flight if r.purpose is Purpose.NOISE]
        needed = policy.noise.num_windows - len(state.noise_values) - len(flying)
        high = max([state.last_noise_start] + flying + [r.start_step for r in settled if r.purpose is Purpose.NOISE])
        noise = [("noise", s) for s in [s for s in usable if s > high][-needed:]] if needed > 0 else []
    noise = noise[:free]
    free -= len(noise)
    purpose = Purpose.PROBE if probing else Purpose.VERIFY
    earliest = state.since_step + (policy.action.return_to_fp8.after_steps if probing else 0)
    high = max([state.last_window_start] + [r.start_step for r in [*in_flight, *settled] if r.purpose is purpose])
    spans = {}
    for s in usable:
        if s >= earliest and s // every > high // every:
            spans.setdefault(s // every, s)
    return noise + [(purpose.value, s) for s in sorted(sorted(spans.values(), reverse=True)[:free])]


@SETTINGS
@given(every=st.sampled_from([25, 50, 100]), checkpoint_every=st.sampled_from([10, 25, 50]),
       num_checkpoints=st.integers(0, 400), since=st.integers(0, 3000), last=st.integers(-1, 4000),
       settled_start=st.integers(-1, 4000), concurrency=st.integers(1, 4), busy=st.integers(0, 2),
       machine=st.sampled_from([Machine.FP8, Machine.FP8_PROBATION, Machine.BF16_FALLBACK]),
       main_step=st.integers(0, 4000), total_steps=st.integers(0, 4500),
       noise=st.booleans(), noise_windows=st.integers(1, 3), noise_done=st.integers(0, 2),
       last_noise=st.integers(-1, 4000), settled_noise=st.integers(-1, 4000))
def test_scheduling_from_the_high_water_marks_equals_a_full_scan(every, checkpoint_every, num_checkpoints, since,
                                                                 last, settled_start, concurrency, busy, machine,
                                                                 main_step, total_steps, noise, noise_windows,
                                                                 noise_done, last_noise, settled_noise):
    policy = make_policy("rel_mean_gap", 0.01, 0.03, 1, noise=noise)
    policy = replace(policy, verify=replace(policy.verify, every_n_steps=every, window_steps=25,
                                            max_concurrent_replays=concurrency),
                     noise=replace(policy.noise, num_windows=noise_windows))
    state = PolicyState(machine=machine, since_step=since, last_window_start=last, last_noise_start=last_noise,
                        noise_values=(0.0,) * min(noise_done, noise_windows - 1))
    committed = list(range(0, num_checkpoints * checkpoint_every, checkpoint_every))
    purpose = Purpose.PROBE if machine is Machine.BF16_FALLBACK else Purpose.VERIFY
    settled = [ReplayRequest(settled_start, 25, "bf16", purpose)] if settled_start >= 0 else []
    settled += [ReplayRequest(settled_noise, 25, "fp8", Purpose.NOISE)] if settled_noise >= 0 else []
    in_flight = [ReplayRequest(10_000 + i, 25, "bf16", Purpose.NOISE) for i in range(busy)]
    due = due_replays(policy, state, main_step=main_step, committed_steps=committed, in_flight=in_flight,
                      total_steps=total_steps, settled=settled)
    expected = _due_by_full_scan(policy, state, main_step, committed, in_flight, total_steps, settled)
    assert [(r.purpose.value, r.start_step) for r in due] == expected
