"""Noise-floor calibration: raise thresholds above the gap that same-precision runs already show.

A noise window compares the main job with a replay in the main job's own precision from the same
checkpoint. Any gap there is noise (non-deterministic kernels, restore effects), and a threshold
below it would flag noise as an FP8 problem, so both thresholds are raised by `noise.multiplier` x
the floor. On CPU replays are bit-exact, the floor is 0 and the thresholds stay exactly as configured.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Sequence

from shadow.compare import Verdict, VerdictKind
from shadow.config.policy import Policy, ThresholdsConfig


def noise_value(verdict: Verdict, metric: str) -> float | None:
    """|metric| of a same-precision window, or None when it has no finite value."""
    if verdict.kind is not VerdictKind.COMPARED:
        return None
    value = verdict.metric(metric)
    return abs(value) if value is not None and math.isfinite(value) else None


def scale_thresholds(thresholds: ThresholdsConfig, multiplier: float, floor: float) -> ThresholdsConfig:
    """Both thresholds raised by multiplier x floor: a gap counts only by what it exceeds the noise.

    Additive rather than a ratio so the result never decreases when any input increases (raising a
    configured threshold can never make the policy stricter) and is the identity when the floor is 0.
    """
    if floor <= 0:
        return thresholds
    margin = multiplier * floor
    return replace(thresholds, warn=thresholds.warn + margin, switch=thresholds.switch + margin)


def calibrate(policy: Policy, noise_verdicts: Sequence[Verdict]) -> ThresholdsConfig:
    """The thresholds to use given same-precision verdicts (the floor is the largest |metric|)."""
    values = [v for v in (noise_value(verdict, policy.compare.metric.value) for verdict in noise_verdicts)
              if v is not None]
    return scale_thresholds(policy.thresholds, policy.noise.multiplier, max(values, default=0.0))


def effective_thresholds(policy: Policy, noise_floor: float | None) -> ThresholdsConfig:
    """The policy's thresholds, scaled by the measured noise floor when calibration is on and done."""
    if not policy.noise.enabled or noise_floor is None:
        return policy.thresholds
    return scale_thresholds(policy.thresholds, policy.noise.multiplier, noise_floor)
