"""The controller's durable state round-trips through events.jsonl, and reads run directories of earlier versions."""

import json

from shadow.controller.state import RunState
from shadow.policy import Machine, PolicyState
from shadow.policy.state import Cusum


def test_run_state_round_trips_with_the_policy_state_as_an_object():
    state = RunState(policy_state=PolicyState(machine=Machine.BF16_FALLBACK, num_fallbacks=1, noise_values=(0.1,)),
                     precision="bf16", lineage=2, regime=1, num_precision_switches=1)
    again = RunState.from_dict(state.to_dict())
    assert again == state and isinstance(again.policy_state, PolicyState)


def test_a_state_written_before_the_counters_were_renamed_still_loads():
    # 0.1 wrote one name, `num_switches`, for two counts: switches applied (run) and fallbacks (policy)
    old = {"precision": "bf16", "lineage": 1, "regime": 2, "num_switches": 2,
           "policy_state": {"machine": "fp8_probation", "num_switches": 1, "since_step": 300}}
    state = RunState.from_dict(old)
    assert state.num_precision_switches == 2 and state.policy_state.num_fallbacks == 1
    assert state.policy_state.machine is Machine.FP8_PROBATION and state.policy_state.since_step == 300


def test_cadence_evidence_and_the_speed_judgement_round_trip_and_default_in_older_states():
    state = RunState(policy_state=PolicyState(cadence_doublings=3, evidence_fp8_worse=Cusum(0.004, 2, 300),
                                              fp8_pay_judged=True))
    again = RunState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert again == state and again.policy_state.evidence_fp8_worse.first_start == 300
    old = RunState.from_dict({"precision": "fp8", "policy_state": {"machine": "fp8", "since_step": 0}})
    assert old.policy_state.cadence_doublings == 0 and old.policy_state.evidence_fp8_worse == Cusum()
    assert not old.policy_state.fp8_pay_judged
