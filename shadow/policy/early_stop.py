"""Early stopping: end a replay window once its paired per-step gaps decide it. Pure.

The controller streams a replay's records and, after `verify.early_stop.min_steps` compared steps and
after every step from then on, asks `early_stop` whether the steps so far already decide the window.
Two Student-t intervals at `verify.early_stop.confidence`, in `compare.metric`'s unit (mean_gap or
rel_mean_gap), are tested against the thresholds in force (raised by the noise floor once calibrated):

- the mean gap of the n steps so far (`shadow.compare.mean_interval`): the verdict's own metric;
- the mean gap over the whole planned window, projected from those steps by their least-squares line
  (`shadow.compare.projected_mean_interval`): a gap that grows within the window, as FP8 damage that
  builds up from the checkpoint does, projects above the steps seen, so it cannot stop as clean on
  its quiet first steps.

| both intervals [low, high] | decision |
| --- | --- |
| high <= warn, and low >= -warn when two-sided | stop: clean |
| low > switch, or high < -switch when two-sided | stop: violation |
| otherwise | go on (a warn-level window runs to its end: accumulated evidence needs its full value) |
| a non-finite loss on either side | stop: the window's verdict can no longer change |

The stopped window is judged like any other, over the steps it ran; the verdict's metric is the
centre of the first interval, so its level is the one that stopped it.

Error rates per window (simulated in tests/unit/test_early_stop.py: 25-step windows, `min_steps` 10,
confidence 0.99, normal gaps): a window whose true mean gap is exactly `warn` stops as clean in about
1% of windows (the test holds it under 4%), one exactly at `switch` stops as a violation in about 1%;
at 1.5x warn, or at switch / 1.5, never in 4000 windows. A gap rising steadily from 0 to 3x warn over
the window (mean 1.5x warn) never stops clean; with the mean interval alone it would in ~85% of
windows. Healthy windows (mean gap 0.1%, spread 0.1-0.3% per step) stop clean after 10-15 steps,
broken ones (3%) as violations after ~14. The intervals assume the gaps scatter independently around
their line: with a step-to-step correlation of 0.5 a window exactly at warn stops clean in about 9%.
A gap that is flat and then takes off (FP8 without scaling from initialization, measured on the tiny
job: ~0.1% for 8 steps, 3% over 25) is what no trend of the first steps shows; `min_steps` is the
guard (at 8 that window stops clean, at 10 it runs to its violation).
"""

from __future__ import annotations

from dataclasses import dataclass

from shadow.compare import Verdict, VerdictKind, mean_interval, projected_mean_interval
from shadow.config.policy import Policy
from shadow.jsonl import jsonable
from shadow.policy.noise import effective_thresholds
from shadow.policy.state import PolicyState


@dataclass(frozen=True)
class EarlyStop:
    """Why a window ended before its last step."""

    level: str  # "clean", "violation" or "nonfinite"
    num_compared: int  # paired steps compared when it was decided
    interval: tuple[float, float] | None  # the metric's interval over those steps (None: non-finite)
    projected: tuple[float, float] | None  # the interval of the whole window's mean, projected by the trend
    reason: str  # one line: the intervals against the threshold they cleared

    def to_dict(self) -> dict:
        return {"level": self.level, "num_compared": self.num_compared, "interval": jsonable(self.interval),
                "projected": jsonable(self.projected), "reason": self.reason}


def early_stop(policy: Policy, state: PolicyState, verdict: Verdict, num_steps: int) -> EarlyStop | None:
    """Whether the window's steps so far (`verdict`) decide it; None: go on. `num_steps`: the steps the
    window would compare if it ran to its end."""
    config = policy.verify.early_stop
    num = len(verdict.steps)
    if not config.min_steps or num < config.min_steps:
        return None
    if verdict.kind is VerdictKind.NONFINITE:
        at = (verdict.nonfinite_main or verdict.nonfinite_replay)[0]
        return EarlyStop("nonfinite", num, None, None,
                         f"non-finite loss at step {at}: the verdict can no longer change")
    metric = policy.compare.metric.value
    seen = mean_interval(verdict, metric, config.confidence)
    projected = projected_mean_interval(verdict, metric, config.confidence, num_steps)
    if seen is None or projected is None:
        return None
    low, high = min(seen[0], projected[0]), max(seen[1], projected[1])  # both intervals must clear a threshold
    thresholds = effective_thresholds(policy, state.noise_floor)
    two_sided = thresholds.two_sided
    shown = (f"{config.confidence:.3g} intervals of {metric} after {num} steps [{seen[0]:+.4g}, {seen[1]:+.4g}], "
             f"projected to {num_steps} steps [{projected[0]:+.4g}, {projected[1]:+.4g}]")
    if high <= thresholds.warn and (not two_sided or low >= -thresholds.warn):
        within = f"within +-{thresholds.warn:g}" if two_sided else f"at or below warn {thresholds.warn:g}"
        return EarlyStop("clean", num, seen, projected, f"{shown} {within}")
    if low > thresholds.switch or (two_sided and high < -thresholds.switch):
        beyond = f"beyond {'+-' if two_sided else ''}switch {thresholds.switch:g}"
        return EarlyStop("violation", num, seen, projected, f"{shown} {beyond}")
    return None
