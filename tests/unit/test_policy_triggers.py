"""Triggered verification (pure): absolute and z-score rules, the rate limit, and the schema."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shadow.config import ConfigError
from shadow.config.policy import TriggerRule, TriggersConfig, policy_from_text
from shadow.policy.triggers import TriggerState, watch, z_of

SETTINGS = settings(max_examples=150, deadline=None)


def run(config, series, signal="grad_norm"):
    """Feed values at steps 0, 1, ...; return the firing steps and the final state."""
    state, fired = TriggerState(), []
    for step, value in enumerate(series):
        state, firings = watch(config, state, step, {signal: value})
        fired += [f.step for f in firings]
    return fired, state


def test_above_fires_on_the_first_value_over_the_threshold():
    config = TriggersConfig(rules=[TriggerRule("fp8/saturation_max", above=0.01)], min_steps_between=1)
    fired, _ = run(config, [0.0, 0.005, 0.01, 0.02, 0.0, 0.5], "fp8/saturation_max")
    assert fired == [3, 5]  # 0.01 itself is not above 0.01


def test_z_score_fires_on_a_spike_only_once_the_window_is_full():
    config = TriggersConfig(rules=[TriggerRule("grad_norm", z_score=6.0, window=4)], min_steps_between=1)
    assert run(config, [1.0, 9.0])[0] == []  # no window yet
    quiet = [1.0, 1.1, 0.9, 1.0]
    fired, _ = run(config, quiet + [1.2, 5.0])
    assert fired == [5]
    firing = watch(config, run(config, quiet)[1], 4, {"grad_norm": 5.0})[1][0]
    assert firing.test == "z_score" and firing.z == pytest.approx(z_of(5.0, tuple(quiet))) and firing.z > 6


def test_non_finite_values_fire_and_stay_out_of_the_window():
    config = TriggersConfig(rules=[TriggerRule("loss", z_score=3.0, window=2)], min_steps_between=1)
    state, firings = watch(config, TriggerState(), 0, {"loss": math.nan})
    assert [f.test for f in firings] == ["non_finite"] and "loss" not in state.history
    assert firings[0].to_dict()["value"] == "nan"  # JSON has no NaN: events carry it as a string


def test_the_rate_limit_is_per_signal():
    config = TriggersConfig(rules=[TriggerRule("grad_norm", above=5.0), TriggerRule("fp8/saturation_max", above=0.01)],
                            min_steps_between=100)
    state, first = watch(config, TriggerState(), 98, {"grad_norm": 7.0, "fp8/saturation_max": 0.0})
    state, held = watch(config, state, 105, {"grad_norm": 7.0, "fp8/saturation_max": 0.0})
    state, second = watch(config, state, 110, {"grad_norm": 1.0, "fp8/saturation_max": 0.9})
    assert [f.signal for f in first] == ["grad_norm"] and held == []
    assert [f.signal for f in second] == ["fp8/saturation_max"]  # not masked by grad_norm's firing at 98
    assert state.num_fired == 2 and state.num_suppressed == 1


def test_signals_not_in_the_step_are_skipped():
    config = TriggersConfig(rules=[TriggerRule("act/kurtosis_max", above=1.0)])
    assert watch(config, TriggerState(), 5, {"loss": 3.0}) == (TriggerState(history={}), [])


@SETTINGS
@given(st.lists(st.floats(0.0, 10.0), min_size=1, max_size=60), st.integers(1, 30), st.floats(0.0, 10.0))
def test_rate_limit_holds_and_every_suppressed_step_is_counted(series, gap, threshold):
    config = TriggersConfig(rules=[TriggerRule("grad_norm", above=threshold)], min_steps_between=gap)
    fired, state = run(config, series)
    assert all(b - a >= gap for a, b in zip(fired, fired[1:]))
    over = sum(1 for v in series if v > threshold)
    assert state.num_fired == len(fired) and state.num_fired + state.num_suppressed == over
    if over:
        assert fired[0] == next(i for i, v in enumerate(series) if v > threshold)


@SETTINGS
@given(st.floats(-1e3, 1e3), st.integers(2, 20), st.integers(1, 40), st.floats(0.1, 10.0))
def test_a_constant_signal_never_jumps(value, window, length, z):
    config = TriggersConfig(rules=[TriggerRule("loss", z_score=z, window=window)], min_steps_between=1)
    fired, state = run(config, [value] * length, "loss")
    assert fired == [] and len(state.history["loss"]) == min(length, window)


@SETTINGS
@given(st.lists(st.integers(0, 50), min_size=3, max_size=30).filter(lambda h: len(set(h)) > 1),
       st.floats(0.5, 20.0))
def test_z_score_is_invariant_to_shift_and_positive_scale(ints, factor):
    history = [i / 10 for i in ints]
    value = max(history) + 1.0
    assert z_of(value * factor + 3.0, tuple(v * factor + 3.0 for v in history)) == pytest.approx(
        z_of(value, tuple(history)), rel=1e-6, abs=1e-6)


def test_policy_schema_names_the_rule_and_field():
    policy = policy_from_text("triggers: {rules: [{signal: fp8/saturation_max, above: 0.01},"
                              " {signal: grad_norm, z_score: 6, window: 50}], min_steps_between: 40}", "p.yaml")
    assert [r.signal for r in policy.triggers.rules] == ["fp8/saturation_max", "grad_norm"]
    assert policy.triggers.rules[1].z_score == 6.0 and policy.triggers.min_steps_between == 40
    for text, expected in [
        ("triggers: {rules: [{signal: nope, above: 1}]}", "triggers.rules[0].signal: got 'nope'"),
        ("triggers: {rules: [{signal: loss}]}", "triggers.rules[0].above: got None"),
        ("triggers: {rules: [{signal: loss, z_score: 2, window: 1}]}", "triggers.rules[0].window: got 1"),
        ("triggers: {rules: [{signal: loss, above: 1, treshold: 2}]}", "triggers.rules[0].treshold"),
        ("triggers: {rules: {signal: loss}}", "triggers.rules: got"),
        ("triggers: {min_steps_between: 0}", "triggers.min_steps_between: got 0"),
    ]:
        with pytest.raises(ConfigError) as caught:
            policy_from_text(text, "bad.yaml")
        assert expected in str(caught.value)


def test_signals_a_job_never_produces_are_named_with_the_setting_to_change():
    from shadow.signals import why_never_produced

    on = dict(telemetry_every_steps=10, backend="emulated", scaling="delayed", num_layers=4)
    assert why_never_produced("loss", **{**on, "telemetry_every_steps": 0}) is None
    assert why_never_produced("fp8/saturation_max", **on) is None
    assert why_never_produced("fp8/blocks.0.ffn.w_down/input/amax", **on) is None
    assert "telemetry.every_steps: 0" in why_never_produced("act/amax_max", **{**on, "telemetry_every_steps": 0})
    assert "model.num_layers: 4" in why_never_produced("act/blocks.4/kurtosis", **on)
    assert why_never_produced("act/blocks.3/kurtosis", **on) is None
    assert "precision.backend: torchao" in why_never_produced("fp8/underflow_max", **{**on, "backend": "torchao"})
    assert "precision.scaling: current" in why_never_produced("fp8/blocks.0.attn.qkv/weight/scale",
                                                              **{**on, "scaling": "current"})
    assert why_never_produced("fp8/blocks.0.attn.qkv/weight/saturation", **{**on, "scaling": "current"}) is None
