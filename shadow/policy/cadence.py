"""The adaptive verification cadence: how far apart verification windows start. Pure, O(1) per call.

With `verify.max_every_n_steps` set, the interval between verification windows doubles after each
clean window judged in FP8 (`every_n_steps`, 2x, 4x, ... at most `max_every_n_steps`), and returns to
`every_n_steps` on anything that calls for a closer look: a warn or violation window, a telemetry
trigger or non-finite FP8 loss, and a precision switch either way (`PolicyState.new_regime`). Windows of
FP8_PROBATION keep the base interval (FP8 is not trusted yet), and FP8 probes in BF16_FALLBACK always
use it. The state is one counter in `PolicyState` (`cadence_doublings`), so a policy edit that changes
either bound takes effect at once and the interval never leaves [every_n_steps, max_every_n_steps].

    | input | next cadence_doublings |
    | --- | --- |
    | clean verification window in FP8, interval below the maximum | + 1 |
    | clean verification window in FP8_PROBATION, or interval at the maximum | unchanged |
    | warn or violation verification window (counted or not) | 0 |
    | trigger fired, non-finite FP8 loss | 0 |
    | switch to BF16 or back to FP8 (new regime) | 0 |
    | probe, noise or unjudgeable window | unchanged |
"""

from __future__ import annotations

from dataclasses import replace

from shadow.config.policy import Policy
from shadow.policy.state import Machine, PolicyState


def interval(policy: Policy, state: PolicyState) -> int:
    """Steps from one verification window's span to the next one's start, now."""
    base, most = policy.verify.every_n_steps, policy.verify.max_every_n_steps
    if most <= base:
        return base
    return min(base << min(state.cadence_doublings, most.bit_length()), most)


def after_clean(policy: Policy, state: PolicyState) -> PolicyState:
    """A clean verification window was judged in `state` (before its own transition)."""
    if state.machine is not Machine.FP8 or interval(policy, state) >= policy.verify.max_every_n_steps:
        return state
    return replace(state, cadence_doublings=state.cadence_doublings + 1)


def back_to_base(state: PolicyState) -> PolicyState:
    """A warn, a violation or a trigger: verify at every_n_steps again."""
    return state if state.cadence_doublings == 0 else replace(state, cadence_doublings=0)
