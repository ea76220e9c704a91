"""Triggered verification: which training signals call for a replay now, rather than at the cadence.

Pure. The controller calls `watch` with each FP8 main-job step's signals (loss, grad norm, telemetry)
in step order and starts a replay for what it returns. A rule fires when its signal is above `above`,
or jumps: z = (value - mean) / std of the signal's previous `window` values (population std) is above
`z_score`, the rule OLMo-core uses to skip steps on loss and gradient-norm spikes. A signal that was
constant over a full window fires on any rise (z = inf). A non-finite value always fires. The rate
limit is per signal: after a signal fired, it does not fire again for `min_steps_between` steps (what
would have fired is counted in `num_suppressed`); values keep entering the rolling windows meanwhile.
Per signal, so that one noisy signal's false alarm cannot mask another signal's real one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Mapping

from shadow.config.policy import TriggerRule, TriggersConfig
from shadow.jsonl import jsonable


@dataclass(frozen=True)
class Firing:
    step: int
    signal: str
    value: float
    test: str  # "above", "z_score" or "non_finite"
    threshold: float | None  # the rule's `above` or `z_score`
    z: float | None = None  # the jump in standard deviations (z_score rules)

    def to_dict(self) -> dict:
        """JSON-ready: a non-finite value or z becomes a string ("nan", "inf"), as in trajectory rows."""
        return {"step": self.step, "signal": self.signal, "value": jsonable(self.value), "test": self.test,
                "threshold": self.threshold, "z": jsonable(self.z)}


@dataclass(frozen=True)
class TriggerState:
    history: dict[str, tuple[float, ...]] = field(default_factory=dict)  # last values per signal, oldest first
    last_fired: dict[str, int] = field(default_factory=dict)  # step each signal last fired
    num_fired: int = 0  # firings returned
    num_suppressed: int = 0  # firings held back by the rate limit


def z_of(value: float, history: tuple[float, ...]) -> float:
    """How many standard deviations `value` lies above the mean of `history` (inf for a rise over a constant)."""
    if min(history) == max(history):  # exactly constant (a computed mean could round below it)
        return math.inf if value > history[0] else 0.0
    mean = math.fsum(history) / len(history)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in history) / len(history))
    return (value - mean) / std


def _test(rule: TriggerRule, step: int, value: float, history: tuple[float, ...]) -> Firing | None:
    if not math.isfinite(value):
        return Firing(step, rule.signal, value, "non_finite", None)
    if rule.above is not None and value > rule.above:
        return Firing(step, rule.signal, value, "above", rule.above)
    if rule.z_score is not None and len(history) >= rule.window:
        z = z_of(value, history[-rule.window:])
        if z > rule.z_score:
            return Firing(step, rule.signal, value, "z_score", rule.z_score, z)
    return None


def watch(config: TriggersConfig, state: TriggerState, step: int,
          values: Mapping[str, float]) -> tuple[TriggerState, list[Firing]]:
    """One step's signals -> the new state and the rules that fired (a signal within its rate limit is held back)."""
    if not config.rules:
        return state, []
    firings, suppressed = [], 0
    for rule in config.rules:
        if rule.signal not in values:
            continue
        firing = _test(rule, step, float(values[rule.signal]), state.history.get(rule.signal, ()))
        last = state.last_fired.get(rule.signal)
        if firing is not None and last is not None and step - last < config.min_steps_between:
            suppressed += 1
        elif firing is not None:
            firings.append(firing)
    keep = max(rule.window for rule in config.rules)
    history = dict(state.history)
    for signal in {rule.signal for rule in config.rules if rule.signal in values}:
        value = float(values[signal])
        if math.isfinite(value):  # a non-finite value would poison the mean for a whole window
            history[signal] = (history.get(signal, ()) + (value,))[-keep:]
    last_fired = {**state.last_fired, **{f.signal: step for f in firings}}
    return replace(state, history=history, last_fired=last_fired, num_fired=state.num_fired + len(firings),
                   num_suppressed=state.num_suppressed + suppressed), firings
