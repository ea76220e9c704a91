"""Early stopping: end a replay window once its paired per-step gaps decide it. Pure.

The controller streams a replay's records and, after `verify.early_stop.min_steps` compared steps and
after every step from then on, asks `early_stop` whether the steps so far already decide the window.
The statistic is the t-interval of the window's mean gap at `verify.early_stop.confidence`
(`shadow.compare.mean_interval`), in `compare.metric`'s unit (mean_gap or rel_mean_gap), against the
thresholds in force (raised by the noise floor once calibrated):

| interval [low, high] | decision |
| --- | --- |
| high <= warn, and low >= -warn when two-sided | stop: clean |
| low > switch, or high < -switch when two-sided | stop: violation |
| otherwise | go on (a warn-level window runs to its end: accumulated evidence needs its full value) |
| a non-finite loss on either side | stop: the window's verdict can no longer change |

The stopped window is judged like any other, over the steps it ran; its point estimate lies inside the
interval, so the verdict's level is the one that stopped it.

Error rates per window (simulated in tests/unit/test_early_stop.py: 25-step windows, `min_steps` 8,
confidence 0.99, normal gaps around a known mean): a window whose true mean gap is exactly `warn`
stops as clean in about 2% of windows (the test holds it under 4%), one exactly at `switch` stops as a
violation in about 2%; at 1.5x warn, or at switch / 1.5, never in 2000 windows. Each look is a 0.5%
one-sided test; looking after every step from the 8th to the 24th is what makes it about 2% at the
boundary. Healthy windows (mean gap 0.1%, spread 0.2-0.3%) stop clean after 8-9 steps, broken ones (3%)
as violations after 8-9. The interval assumes the gaps of a window scatter independently: with a
step-to-step correlation of 0.5 (the most a healthy tiny-job window showed) a window exactly at warn
stops clean in about 15%, one at 1.5x warn in 0.3%.
"""

from __future__ import annotations

from dataclasses import dataclass

from shadow.compare import Verdict, VerdictKind, mean_interval
from shadow.config.policy import Policy
from shadow.jsonl import jsonable
from shadow.policy.noise import effective_thresholds
from shadow.policy.state import PolicyState


@dataclass(frozen=True)
class EarlyStop:
    """Why a window ended before its last step."""

    level: str  # "clean", "violation" or "nonfinite"
    num_compared: int  # paired steps compared when it was decided
    interval: tuple[float, float] | None  # the interval of the metric that decided it (None: non-finite)
    reason: str  # one line: the interval against the threshold it cleared

    def to_dict(self) -> dict:
        return {"level": self.level, "num_compared": self.num_compared, "interval": jsonable(self.interval),
                "reason": self.reason}


def early_stop(policy: Policy, state: PolicyState, verdict: Verdict) -> EarlyStop | None:
    """Whether the window's steps so far (`verdict`) decide it; None: go on."""
    config = policy.verify.early_stop
    num = len(verdict.steps)
    if not config.min_steps or num < config.min_steps:
        return None
    if verdict.kind is VerdictKind.NONFINITE:
        at = (verdict.nonfinite_main or verdict.nonfinite_replay)[0]
        return EarlyStop("nonfinite", num, None, f"non-finite loss at step {at}: the verdict can no longer change")
    metric = policy.compare.metric.value
    interval = mean_interval(verdict, metric, config.confidence)
    if interval is None:
        return None
    low, high = interval
    thresholds = effective_thresholds(policy, state.noise_floor)
    two_sided = thresholds.two_sided
    shown = f"{config.confidence:.3g} interval of {metric} [{low:+.4g}, {high:+.4g}] after {num} steps"
    if high <= thresholds.warn and (not two_sided or low >= -thresholds.warn):
        within = f"within +-{thresholds.warn:g}" if two_sided else f"at or below warn {thresholds.warn:g}"
        return EarlyStop("clean", num, interval, f"{shown} {within}")
    if low > thresholds.switch or (two_sided and high < -thresholds.switch):
        beyond = f"beyond {'+-' if two_sided else ''}switch {thresholds.switch:g}"
        return EarlyStop("violation", num, interval, f"{shown} {beyond}")
    return None
