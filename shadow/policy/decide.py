"""`decide`: one verdict in, the new state and the decisions out. Pure.

The controller calls it once per finished replay window (verification, probe or noise), in the
order windows finish, and executes the decisions at the next step boundary. See the package
docstring for the transition table.
"""

from __future__ import annotations

from dataclasses import replace
from enum import Enum
from typing import Sequence

from shadow.compare import Verdict, VerdictKind, trend_of
from shadow.config.policy import Mode, OnSwitch, Policy, ThresholdsConfig
from shadow.policy import cadence, evidence
from shadow.policy.noise import effective_thresholds, noise_value
from shadow.policy.state import (ACTIONS, Decision, DecisionKind, Decisions, Machine, PolicyState,
                                 Purpose)


class Level(str, Enum):
    CLEAN = "clean"  # metric (|metric| when two-sided) at or below warn
    WARN = "warn"  # above warn, at or below switch
    VIOLATION = "violation"  # above switch, or the FP8 side produced a non-finite loss
    UNAVAILABLE = "unavailable"  # nothing to judge (metric missing, BF16 side non-finite)


def purpose_of(verdict: Verdict) -> Purpose | None:
    """Which kind of window a verdict is about, from the precisions its two sides ran in."""
    if verdict.fp8_side == "main":
        return Purpose.VERIFY
    if verdict.fp8_side == "replay":
        return Purpose.PROBE
    if verdict.main_precision == verdict.replay_precision != "mixed":
        return Purpose.NOISE
    return None


def decide(policy: Policy, state: PolicyState, verdict: Verdict, *, main_step: int) -> Decisions:
    """Judge `verdict` and return the new state and decisions.

    `main_step`: the main job's step at this decision point; a switch that continues forward starts
    there. Everything else the policy remembers is in `state`, so a call costs the same at any run length.
    """
    window = f"window [{verdict.window_start}, {verdict.window_end})"
    if state.machine is Machine.BF16_FOREVER:
        return _keep(state, DecisionKind.NOTE, f"{window} ignored: the job stays BF16 to the end")
    if state.machine is Machine.BF16_FALLBACK and state.num_fallbacks >= policy.action.max_switches:
        stay = Decision(DecisionKind.STAY_BF16, f"{state.num_fallbacks} fallbacks reach action.max_switches="
                        f"{policy.action.max_switches}: the job stays BF16 to the end", {})
        return act(policy, state, replace(state, machine=Machine.BF16_FOREVER), [stay])

    if verdict.window_start < state.since_step:
        return _keep(state, DecisionKind.NOTE, f"{window} ignored: it starts before the current regime "
                     f"({state.machine.value} since step {state.since_step})")
    if verdict.kind is VerdictKind.NO_OVERLAP:
        return _keep(state, DecisionKind.NOTE, f"{window} ignored: no step present on both sides{_missing(verdict)}")
    purpose = purpose_of(verdict)
    if purpose is Purpose.NOISE:
        return _on_noise(policy, state, verdict, window)
    expected = Purpose.PROBE if state.machine is Machine.BF16_FALLBACK else Purpose.VERIFY
    if purpose is not expected:
        return _keep(state, DecisionKind.NOTE, f"{window} ignored: main {verdict.main_precision} vs replay "
                     f"{verdict.replay_precision} is not a {expected.value} window in state {state.machine.value}")

    thresholds = effective_thresholds(policy, state.noise_floor)
    level, judged = _classify(policy, thresholds, verdict)
    if verdict.window_start <= state.last_window_start:
        return _keep(state, DecisionKind.NOTE, f"{window} {purpose.value}: {judged}; not counted, window "
                     f"[{state.last_window_start}, ...) was already judged (windows count in step order)")
    state = replace(state, last_window_start=verdict.window_start)
    payload = {"purpose": purpose.value, "window_start": verdict.window_start, "window_end": verdict.window_end,
               "metric": policy.compare.metric.value, "value": verdict.metric(policy.compare.metric.value),
               "warn": thresholds.warn, "switch": thresholds.switch, "level": level.value}
    text = f"{window} {purpose.value}: {judged}{_missing(verdict)}"
    if purpose is Purpose.PROBE:
        return _on_probe(policy, state, level, text, payload, main_step)
    windows = state.recent_verifications + ((verdict.window_start, payload["value"]),)
    state = replace(state, recent_verifications=_remembered(policy, windows))
    return _on_verification(policy, thresholds, state, windows, verdict, level, text, payload, main_step)


def _remembered(policy: Policy, windows: tuple[tuple[int, float | None], ...]) -> tuple[tuple[int, float], ...]:
    """What the trend needs from the next window on: the last `trend_windows - 1` values (none when off)."""
    keep = policy.thresholds.trend_windows - 1
    values = tuple((start, value) for start, value in windows if value is not None)
    return values[-keep:] if keep >= 1 else ()


def _classify(policy: Policy, thresholds: ThresholdsConfig, verdict: Verdict) -> tuple[Level, str]:
    if verdict.kind is VerdictKind.NONFINITE:
        if verdict.fp8_nonfinite:
            steps = verdict.nonfinite_main or verdict.nonfinite_replay
            return Level.VIOLATION, f"FP8 side non-finite at steps {_steps(steps)} while BF16 stayed finite"
        return Level.UNAVAILABLE, (f"BF16 side non-finite (main at {_steps(verdict.nonfinite_main)}, replay at "
                                   f"{_steps(verdict.nonfinite_replay)}): not an FP8 verdict")
    name = policy.compare.metric.value
    value = verdict.metric(name)
    if value is None:
        return Level.UNAVAILABLE, f"{name} unavailable for this window"
    size, shown = (abs(value), f"{name}={value:+.4g} (size {abs(value):.4g})") if (
        thresholds.two_sided and value < 0) else (value, f"{name}={value:+.4g}")
    if size > thresholds.switch:
        return Level.VIOLATION, f"{shown} > switch {thresholds.switch:g}"
    if size > thresholds.warn:
        return Level.WARN, f"{shown} > warn {thresholds.warn:g} (switch {thresholds.switch:g})"
    return Level.CLEAN, f"{shown} within warn {thresholds.warn:g} (switch {thresholds.switch:g})"


def _on_verification(policy, thresholds, state, windows, verdict, level, text, payload, main_step) -> Decisions:
    if level is Level.UNAVAILABLE:
        return _keep(state, DecisionKind.NOTE, text, payload)
    pending = policy.noise.enabled and state.noise_floor is None
    if not pending:
        state = evidence.accumulate(policy, thresholds, state, payload["value"], verdict.window_start)
    if level is Level.CLEAN:
        state = replace(cadence.after_clean(policy, state), num_violations_in_row=0, streak_start_step=None,
                        last_verified_step=max(state.last_verified_step or 0, verdict.window_start))
        if policy.verify.max_every_n_steps:
            text += f"; verification interval {cadence.interval(policy, state)} steps"
        decisions = [Decision(DecisionKind.NOTE, f"{text}: clean", payload)]
        probation = policy.action.return_to_fp8.probation_windows
        if state.machine is Machine.FP8_PROBATION:
            state = replace(state, num_clean_probation_windows=state.num_clean_probation_windows + 1)
            done = state.num_clean_probation_windows >= probation
            if done:
                state = replace(state, machine=Machine.FP8)
            decisions.append(Decision(DecisionKind.NOTE, f"probation: {state.num_clean_probation_windows} of "
                                      f"{probation} clean windows" + ("; FP8 trusted again" if done else ""), payload))
        return Decisions(state, tuple(decisions + _trend_warning(policy, windows, payload)))
    if state.cadence_doublings:
        text += f"; verification interval back to {policy.verify.every_n_steps} steps"
        state = cadence.back_to_base(state)
    accumulated = evidence.beyond_limit(policy, state)
    if level is Level.WARN:
        state = replace(state, num_violations_in_row=0, streak_start_step=None)
        if accumulated is not None:
            return _switch_on_evidence(policy, state, accumulated, verdict, text, payload, main_step)
        return _keep(state, DecisionKind.WARN, text, payload)

    if pending and not verdict.fp8_nonfinite:
        return _keep(state, DecisionKind.WARN, f"{text}: not counted, noise calibration pending "
                     f"({len(state.noise_values)} of {policy.noise.num_windows} windows)", payload)
    counted = replace(state, num_violations_in_row=state.num_violations_in_row + 1,
                      streak_start_step=state.streak_start_step if state.streak_start_step is not None
                      else verdict.window_start)
    in_probation = state.machine is Machine.FP8_PROBATION
    required = 1 if in_probation or verdict.fp8_nonfinite else policy.thresholds.consecutive
    streak = f"violation {counted.num_violations_in_row} of {required} in a row"
    if in_probation:
        streak += " (in probation one is enough)"
    if counted.num_violations_in_row < required:
        if accumulated is not None:
            return _switch_on_evidence(policy, counted, accumulated, verdict, f"{text}: {streak}", payload, main_step)
        return _keep(counted, DecisionKind.WARN, f"{text}: {streak}", payload)
    return _switch_to_bf16(policy, counted, verdict, f"{text}: {streak}", payload, main_step)


def _switch_on_evidence(policy, state, accumulated, verdict, text, payload, main_step) -> Decisions:
    """Accumulated evidence acts as a violation streak would; without a clean window to roll back to,
    a rollback returns to the first window of the evidence."""
    reason, extra = evidence.describe(policy, *accumulated)
    first = accumulated[1].first_start
    if state.streak_start_step is None or first < state.streak_start_step:
        state = replace(state, streak_start_step=first)
    return _switch_to_bf16(policy, state, verdict, f"{text}: {reason}", {**payload, **extra}, main_step,
                           first_bad="the first window of the accumulated evidence")


def _switch_to_bf16(policy, counted: PolicyState, verdict: Verdict, text: str, payload: dict, main_step: int,
                    first_bad: str = "the first violating window") -> Decisions:
    on_switch = policy.action.on_switch
    if on_switch is OnSwitch.ROLLBACK:
        verified = counted.last_verified_step
        resume = verified if verified is not None else counted.streak_start_step
        how = (f"roll back to step {resume}, " + ("the last clean verification window" if verified is not None
               else f"the start of {first_bad} (no clean window in this regime)"))
    elif on_switch is OnSwitch.ADOPT_REPLAY:
        resume = verdict.window_end
        how = f"adopt the replay's BF16 state at step {resume}, the end of window [{verdict.window_start}, {resume})"
    else:
        resume = main_step
        how = f"continue in BF16 from step {resume}"
    num_fallbacks = counted.num_fallbacks + 1
    final = num_fallbacks >= policy.action.max_switches
    machine = Machine.BF16_FOREVER if final else Machine.BF16_FALLBACK
    switch_payload = {**payload, "on_switch": on_switch.value, "resume_step": resume, "num_fallbacks": num_fallbacks}
    decisions = [Decision(DecisionKind.SWITCH_TO_BF16, f"{text}: switching to BF16, {how}", switch_payload)]
    if final:
        decisions.append(Decision(DecisionKind.STAY_BF16, f"fallback {num_fallbacks} reaches action.max_switches="
                                  f"{policy.action.max_switches}: the job stays BF16 to the end", switch_payload))
    return act(policy, counted, counted.new_regime(machine, resume, num_fallbacks=num_fallbacks), decisions)


def _on_probe(policy, state, level, text, payload, main_step) -> Decisions:
    needed = policy.action.return_to_fp8.clean_probes
    if level is Level.UNAVAILABLE:
        return _keep(state, DecisionKind.NOTE, text, payload)
    if level is not Level.CLEAN:
        return _keep(replace(state, num_clean_probes=0), DecisionKind.NOTE,
                     f"{text}: FP8 does not track BF16 yet, clean probes reset to 0 of {needed}", payload)
    counted = replace(state, num_clean_probes=state.num_clean_probes + 1)
    progress = f"clean probe {counted.num_clean_probes} of {needed}"
    if counted.num_clean_probes < needed:
        return _keep(counted, DecisionKind.NOTE, f"{text}: {progress}", payload)
    probation = policy.action.return_to_fp8.probation_windows
    machine = Machine.FP8_PROBATION if probation > 0 else Machine.FP8
    switch = Decision(DecisionKind.SWITCH_TO_FP8, f"{text}: {progress}: switching back to FP8 at step {main_step}"
                      + (f", on probation for {probation} windows" if probation else ""),
                      {**payload, "resume_step": main_step})
    return act(policy, counted, counted.new_regime(machine, main_step), [switch])


def _on_noise(policy: Policy, state: PolicyState, verdict: Verdict, window: str) -> Decisions:
    if not policy.noise.enabled or state.noise_floor is not None:
        return _keep(state, DecisionKind.NOTE, f"{window} noise: ignored, calibration is off or done")
    metric = policy.compare.metric.value
    value = noise_value(verdict, metric)
    if value is None:
        return _keep(state, DecisionKind.NOTE,
                     f"{window} noise: no finite {metric} ({verdict.kind.value}), not counted")
    values = state.noise_values + (value,)
    state = replace(state, noise_values=values, last_noise_start=max(state.last_noise_start, verdict.window_start))
    payload = {"purpose": Purpose.NOISE.value, "window_start": verdict.window_start, "metric": metric, "value": value}
    if len(values) < policy.noise.num_windows:
        return _keep(state, DecisionKind.NOTE, f"{window} noise: |{metric}|={value:.4g} "
                     f"({len(values)} of {policy.noise.num_windows} windows)", payload)
    state = replace(state, noise_floor=max(values))
    scaled = effective_thresholds(policy, state.noise_floor)
    return _keep(state, DecisionKind.NOTE, f"noise floor {state.noise_floor:.4g} from {len(values)} windows: "
                 f"warn {policy.thresholds.warn:g} -> {scaled.warn:g}, switch {policy.thresholds.switch:g} -> "
                 f"{scaled.switch:g}", {**payload, "noise_floor": state.noise_floor, "warn": scaled.warn,
                                         "switch": scaled.switch})


def _trend_warning(policy, windows, payload) -> list[Decision]:
    """WARN when the metric (its size when two-sided) rose in each of the last `trend_windows`
    verification windows of this regime. `windows`: (start, value) of the latest counted ones, this one last."""
    num_windows = policy.thresholds.trend_windows
    if num_windows < 2:
        return []
    if policy.thresholds.two_sided:
        windows = tuple((start, None if value is None else abs(value)) for start, value in windows)
    recent = trend_of(windows[-num_windows:])
    if len(recent.values) < num_windows or not recent.growing or recent.values[-1] <= 0:
        return []
    values = ", ".join(f"{v:+.4g}" for v in recent.values)
    return [Decision(DecisionKind.WARN, f"{policy.compare.metric.value} grew in each of the last {num_windows} "
                     f"verification windows ({values})", {**payload, "trend": recent.to_dict()})]


def _keep(state: PolicyState, kind: DecisionKind, reason: str, payload: dict | None = None) -> Decisions:
    return Decisions(state, (Decision(kind, reason, payload or {}),))


def act(policy: Policy, counted: PolicyState, acted: PolicyState, decisions: list[Decision]) -> Decisions:
    """Enforce mode: the transition. Observe mode: report it instead and keep the machine where it is
    (counters still count, so every further violating window is reported again)."""
    if policy.action.mode is Mode.ENFORCE:
        return Decisions(acted, tuple(decisions))
    reports = tuple(
        Decision(DecisionKind.REPORT, f"observe only, would {d.kind.value}: {d.reason}",
                 {**d.payload, "would": d.kind.value})
        if d.kind in ACTIONS else d
        for d in decisions
    )
    return Decisions(counted, reports)


def _missing(verdict: Verdict) -> str:
    parts = [f"{len(steps)} steps missing in {side} ({_steps(steps)})"
             for side, steps in (("main", verdict.missing_in_main), ("replay", verdict.missing_in_replay)) if steps]
    return "; " + ", ".join(parts) if parts else ""


def _steps(steps: Sequence[int]) -> str:
    shown = ", ".join(str(s) for s in steps[:5])
    return f"[{shown}{', ...' if len(steps) > 5 else ''}]"
