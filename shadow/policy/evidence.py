"""Accumulated evidence: a persistent, same-signed gap across verification windows. Pure, O(1) per call.

One window judges its own gap against `warn` and `switch`; a gap that stays a little above `warn`
window after window never crosses `switch` and never acts, though it is systematic FP8 harm. This
is Page's CUSUM over the windows' metric x (oriented: positive = FP8 worse) with `warn` as the
allowance and `thresholds.evidence_limit` as the decision limit:

    S+ = max(0, S+ + x - warn)        S- = max(0, S- - x - warn)   (S- only with thresholds.two_sided)

The policy switches as on a violation once S+ (or S-) is above the limit and has been above 0 for at
least two windows in a row: evidence that no single window shows. A window at or below `warn` adds
nothing (it can only lower a sum), so a run whose windows are all clean never switches on it. Both
sums start over in each regime (a switch either way). While noise calibration is pending they stay
at 0, like violations, which do not count until then.
"""

from __future__ import annotations

from dataclasses import replace

from shadow.config.policy import Policy, ThresholdsConfig
from shadow.policy.state import Cusum, PolicyState

DIRECTIONS = {"evidence_fp8_worse": "FP8 worse", "evidence_fp8_better": "FP8 better"}


def accumulate(policy: Policy, thresholds: ThresholdsConfig, state: PolicyState, value: float | None,
               window_start: int) -> PolicyState:
    """Add one counted verification window's metric (None: nothing to add)."""
    if policy.thresholds.evidence_limit <= 0 or value is None:
        return state
    worse = state.evidence_fp8_worse.add(value - thresholds.warn, window_start)
    better = state.evidence_fp8_better.add(-value - thresholds.warn, window_start) if thresholds.two_sided else Cusum()
    return replace(state, evidence_fp8_worse=worse, evidence_fp8_better=better)


def beyond_limit(policy: Policy, state: PolicyState) -> tuple[str, Cusum] | None:
    """(direction, sum) when a sum is above `evidence_limit` over two or more windows in a row."""
    limit = policy.thresholds.evidence_limit
    if limit <= 0:
        return None
    for name, direction in DIRECTIONS.items():
        cusum = getattr(state, name)
        if cusum.total > limit and cusum.num_windows >= 2:
            return direction, cusum
    return None


def describe(policy: Policy, direction: str, cusum: Cusum) -> tuple[str, dict]:
    """The reason text and payload of a switch on accumulated evidence."""
    metric, limit = policy.compare.metric.value, policy.thresholds.evidence_limit
    text = (f"accumulated evidence ({direction}): {cusum.num_windows} windows in a row from step {cusum.first_start} "
            f"add {cusum.total:.4g} beyond warn, above thresholds.evidence_limit {limit:g} (CUSUM of {metric})")
    return text, {"evidence": {"direction": direction, "total": cusum.total, "num_windows": cusum.num_windows,
                               "first_start": cusum.first_start, "limit": limit}}
