"""Does FP8 pay on this job? `action.fp8_must_pay` against the speedup the run measured. Pure.

The controller calls `judge_speed` at each decision point once the run has timed enough FP8 and BF16
steps where they compare (`shadow/controller/speed.py`); it judges once per run:

| state | measured FP8 speedup | decisions | next state |
| --- | --- | --- | --- |
| any but BF16_FOREVER | >= `min_speedup` | NOTE "FP8 pays" | unchanged |
| any but BF16_FOREVER | < `min_speedup`, `act: report` | WARN "FP8 does not pay" | unchanged |
| any but BF16_FOREVER | < `min_speedup`, `act: switch` | STAY_BF16 (REPORT in observe mode) | BF16_FOREVER |
"""

from __future__ import annotations

from dataclasses import replace

from shadow.config.policy import PayAct, Policy
from shadow.policy.decide import act
from shadow.policy.state import Decision, DecisionKind, Decisions, Machine, PolicyState


def judge_speed(policy: Policy, state: PolicyState, *, fp8_speedup: float, measured: str,
                main_step: int) -> Decisions | None:
    """Judge the measured speedup (BF16 step time / FP8 step time; `measured` says what it rests on);
    None when there is nothing to judge (off, judged already, or the job is BF16 for good)."""
    config = policy.action.fp8_must_pay
    if config.min_speedup <= 0 or state.fp8_pay_judged or state.machine is Machine.BF16_FOREVER:
        return None
    judged = replace(state, fp8_pay_judged=True)
    payload = {"fp8_speedup": fp8_speedup, "min_speedup": config.min_speedup, "act": config.act.value}
    bound = f"action.fp8_must_pay.min_speedup {config.min_speedup:g}"
    if fp8_speedup >= config.min_speedup:
        return Decisions(judged, (Decision(DecisionKind.NOTE, f"FP8 pays on this job: measured {measured}, "
                                           f"at least {bound}", payload),))
    text = f"FP8 does not pay on this job: measured {measured}, below {bound}"
    if config.act is PayAct.REPORT:
        return Decisions(judged, (Decision(DecisionKind.WARN, text, payload),))
    stay = Decision(DecisionKind.STAY_BF16, f"{text}: the main job switches to BF16 and stays there to the end",
                    payload)
    return act(policy, judged, judged.new_regime(Machine.BF16_FOREVER, main_step), [stay])
