"""The policy schema: when to verify, how to compare, which gap is too much, and what to do then.

`policies/*.yaml` files are merged over these defaults (see `loader.load_config`); the field comments
are the documentation users read. Gaps are oriented so that a positive value means FP8 is worse than
BF16, for verification replays (main FP8, replay BF16) and FP8 probes (main BF16, replay FP8) alike.
A window violates a threshold when its metric is strictly greater than it, so `0` means "any gap
where FP8 is worse" and identical trajectories never violate.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from enum import Enum

from shadow.config.loader import build_config, load_config, parse_overrides, parse_yaml_mapping
from shadow.signals import is_signal


class Metric(str, Enum):
    """Which verdict field the thresholds test. The name says the unit of `warn` and `switch`."""

    MEAN_GAP = "mean_gap"  # mean per-step loss gap over the window, in loss units (nats)
    REL_MEAN_GAP = "rel_mean_gap"  # mean_gap / the BF16 side's mean loss: a fraction (0.01 = 1%)
    END_GAP = "end_gap"  # mean gap over the last `compare.end_fraction` of the window, nats
    REL_END_GAP = "rel_end_gap"  # end_gap / the BF16 side's mean loss over the same steps
    MAX_ABS_GAP = "max_abs_gap"  # largest |gap| of any step (either direction), nats
    SLOPE = "slope"  # least-squares slope of the gap across the window, nats per step
    T_STAT = "t_stat"  # paired statistic: mean gap / its standard error (dimensionless)
    EVAL_GAP = "eval_gap"  # held-out loss gap at the window's end, nats (needs verify.eval_batches)
    REL_EVAL_GAP = "rel_eval_gap"  # eval_gap / the BF16 side's held-out loss


EVAL_METRICS = (Metric.EVAL_GAP, Metric.REL_EVAL_GAP)
EARLY_STOP_METRICS = (Metric.MEAN_GAP, Metric.REL_MEAN_GAP)  # a window's mean gap, which early stopping bounds


class ReplayPrecision(str, Enum):
    BF16 = "bf16"  # the reference precision FP8 is verified against


class OnSwitch(str, Enum):
    """How the main job continues in BF16 when the policy switches it."""

    BF16 = "bf16"  # keep the current state, train on in BF16 from the current step
    ROLLBACK = "rollback"  # reload the last verified checkpoint and re-train from there in BF16
    ADOPT_REPLAY = "adopt_replay"  # continue from the failing replay's BF16 end state (drops steps after its window)


class Mode(str, Enum):
    ENFORCE = "enforce"  # decisions are carried out: the main job switches precision
    OBSERVE = "observe"  # never act: what the policy would do is reported, the precision never changes


@dataclass
class ReplayResourcesConfig:
    """Ray resources of one replay worker (one replay rank)."""

    num_ranks: int = 1  # ranks of a replay; must divide the main job's micro-batches (num_ranks x grad_accum)
    num_cpus: float = 1.0  # CPUs per replay rank; on CPU this is also its thread count, keep it equal to the main job's
    num_gpus: float = 0.0  # GPUs per replay rank (fractions share a GPU)

    def problems(self):
        found = []
        if self.num_ranks < 1:
            found.append(("num_ranks", self.num_ranks, "a positive integer"))
        for name in ("num_cpus", "num_gpus"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                found.append((name, value, "a finite non-negative number"))
        return found


@dataclass
class EarlyStopConfig:
    """Windows that end once their paired per-step gaps decide them (docs/policies.md#early-stopping).

    After `min_steps` compared steps, and after every further step, two t-intervals at `confidence` (in
    `compare.metric`'s unit: divided by the BF16 side's mean loss for rel_mean_gap) are tested: that of
    the mean gap of the steps so far, and that of the whole window's mean gap projected from them by
    their trend. Both wholly within `thresholds.warn` (their size, when two-sided) end the window as
    clean, both wholly beyond `thresholds.switch` as a violation; otherwise the window goes on, at most to
    `window_steps`. Verification and probe windows of the cadence only: triggered windows run through
    the step that fired, noise windows measure the whole window. Needs compare.metric mean_gap or
    rel_mean_gap (the statistic is a mean).
    """

    min_steps: int = 0  # compared steps before a window may end early; 0 = every window runs its window_steps
    confidence: float = 0.99  # two-sided confidence of the intervals at each look (0.99: 0.5% per look per side)

    def problems(self):
        found = []
        if self.min_steps != 0 and self.min_steps < 3:
            found.append(("min_steps", self.min_steps, "0 (off) or at least 3 (a trend's interval needs three gaps)"))
        if not (math.isfinite(self.confidence) and 0.0 < self.confidence < 1.0):
            found.append(("confidence", self.confidence, "a fraction in (0, 1), e.g. 0.99"))
        return found


@dataclass
class VerifyConfig:
    """Verification replays: BF16 re-runs of a window of the FP8 main job from its checkpoint."""

    every_n_steps: int = 100  # cadence: one replay from the first checkpoint committed in each span of this many steps
    # adaptive cadence: after each clean verification window in FP8 the interval doubles, up to this many
    # steps; a warn, a violation, a trigger or a switch either way brings it back to every_n_steps.
    # 0 = a fixed cadence of every_n_steps
    max_every_n_steps: int = 0
    window_steps: int = 50  # W: steps each replay (verification or probe) re-trains from its checkpoint
    max_concurrent_replays: int = 1  # replays running at the same time, all purposes together
    replay_retries: int = 1  # a failed replay (worker died, error) is retried this often, then skipped
    replay_precision: ReplayPrecision = ReplayPrecision.BF16  # precision of verification replays
    eval_batches: int = 0  # held-out batches both sides evaluate at the window's end; 0 = no evaluation
    replay_resources: ReplayResourcesConfig = field(default_factory=ReplayResourcesConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)  # windows that end once decided

    def problems(self):
        found = []
        if self.max_every_n_steps != 0 and self.max_every_n_steps < self.every_n_steps:
            found.append(("max_every_n_steps", self.max_every_n_steps,
                          f"0 (a fixed cadence) or at least every_n_steps ({self.every_n_steps})"))
        if self.early_stop.min_steps >= self.window_steps >= 1:
            found.append(("early_stop.min_steps", self.early_stop.min_steps,
                          f"fewer than window_steps ({self.window_steps}), or 0 (off)"))
        if self.replay_retries < 0:
            found.append(("replay_retries", self.replay_retries, "a non-negative integer"))
        for name in ("every_n_steps", "window_steps", "max_concurrent_replays"):
            if getattr(self, name) < 1:
                found.append((name, getattr(self, name), "a positive integer"))
        if self.eval_batches < 0:
            found.append(("eval_batches", self.eval_batches, "0 (no evaluation) or a positive integer"))
        if self.every_n_steps >= 1 and self.window_steps > self.every_n_steps:
            found.append(("window_steps", self.window_steps,
                          f"at most every_n_steps ({self.every_n_steps}): windows must not overlap"))
        return found


@dataclass
class CompareConfig:
    """How a pair of trajectories becomes a verdict."""

    metric: Metric = Metric.REL_MEAN_GAP  # the verdict field tested against the thresholds; fixed for a run
    ignore_first_steps: int = 0  # leave the first steps of each window out of the comparison
    end_fraction: float = 0.25  # share of the window (its last steps) that end_gap averages over

    def problems(self):
        found = []
        if self.ignore_first_steps < 0:
            found.append(("ignore_first_steps", self.ignore_first_steps, "a non-negative integer"))
        if not 0.0 < self.end_fraction <= 1.0:
            found.append(("end_fraction", self.end_fraction, "a fraction in (0, 1]"))
        return found


@dataclass
class ThresholdsConfig:
    """Limits on `compare.metric`, in its unit (see `Metric`): a fraction for rel_*, nats otherwise."""

    warn: float = 0.01  # above this a window is reported as a warning
    switch: float = 0.03  # above this a window is a violation; `consecutive` of them switch the main job to BF16
    consecutive: int = 2  # violations in a row before switching (a window at or below `switch` resets the count)
    trend_windows: int = 0  # warn when the metric (its size when two-sided) grew in each of the last N verification windows; 0 = off
    # accumulated evidence (CUSUM over verification windows): each window adds metric - warn (its size
    # beyond warn) to a running sum floored at 0, a sum per sign when two-sided; once a sum is above this
    # over two or more windows in a row, the policy switches as on a violation. Clean windows only lower
    # it, so a run whose windows are all clean never switches on it. 0 = off
    evidence_limit: float = 0.0
    # judge gaps in FP8's favour (the BF16 side worse) by their size too: FP8 and BF16 disagree either way.
    # A model that came to depend on FP8's clipping does worse when BF16 replays it (an FP8 fault that
    # began before the window); false: only FP8-worse gaps count
    two_sided: bool = True

    def problems(self):
        found = []
        for name in ("warn", "switch"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                found.append((name, value, "a finite non-negative number"))
        if math.isfinite(self.switch) and self.warn > self.switch:
            found.append(("warn", self.warn, f"at most switch ({self.switch})"))
        if self.consecutive < 1:
            found.append(("consecutive", self.consecutive, "a positive integer"))
        if self.trend_windows < 0 or self.trend_windows == 1:
            found.append(("trend_windows", self.trend_windows, "0 (off) or at least 2"))
        if not (math.isfinite(self.evidence_limit) and self.evidence_limit >= 0):
            found.append(("evidence_limit", self.evidence_limit, "0 (off) or a finite positive number"))
        return found


@dataclass
class ReturnToFp8Config:
    """Going back to FP8 after a fallback: FP8 probe replays from BF16 checkpoints."""

    after_steps: int = 100  # BF16 steps before the first probe (probes start at checkpoints this far past the switch)
    clean_probes: int = 2  # probes in a row within `thresholds.warn` before switching back to FP8
    probation_windows: int = 2  # clean verification windows before FP8 is trusted again; 0 = none

    def problems(self):
        found = []
        if self.after_steps < 0:
            found.append(("after_steps", self.after_steps, "a non-negative integer"))
        if self.clean_probes < 1:
            found.append(("clean_probes", self.clean_probes, "a positive integer"))
        if self.probation_windows < 0:
            found.append(("probation_windows", self.probation_windows, "a non-negative integer"))
        return found


class PayAct(str, Enum):
    REPORT = "report"  # a WARN decision: FP8 does not pay on this job; nothing changes
    SWITCH = "switch"  # the main job switches to BF16 and stays there to the end (no probes)


@dataclass
class Fp8MustPayConfig:
    """Does FP8 pay on this job? Judged once per run, from the step times the run itself measured:
    FP8 steps against BF16 steps on the same kind of device and rank count (the main job's own BF16
    steps, or replays on its device and rank count; see docs/policies.md#the-ledger)."""

    min_speedup: float = 0.0  # FP8 must be this much faster per step (BF16 step time / FP8 step time); 0 = not judged
    act: PayAct = PayAct.REPORT  # when it is not: report, or switch the main job to BF16 to the end

    def problems(self):
        if not (math.isfinite(self.min_speedup) and self.min_speedup >= 0):
            return [("min_speedup", self.min_speedup, "0 (not judged) or a finite positive factor, e.g. 1.05")]
        return []


@dataclass
class ActionConfig:
    """What the controller does with violations."""

    mode: Mode = Mode.ENFORCE  # enforce, or observe (only report)
    on_switch: OnSwitch = OnSwitch.BF16  # how the main job continues in BF16: bf16, rollback or adopt_replay
    max_switches: int = 3  # FP8->BF16 fallbacks allowed; the one that reaches this number is final
    return_to_fp8: ReturnToFp8Config = field(default_factory=ReturnToFp8Config)
    fp8_must_pay: Fp8MustPayConfig = field(default_factory=Fp8MustPayConfig)  # act on the measured FP8 speedup

    def problems(self):
        if self.max_switches < 1:
            return [("max_switches", self.max_switches, "a positive integer (1 = the first fallback is final)")]
        return []


@dataclass
class NoiseConfig:
    """Noise-floor calibration: replays in the main job's own precision, compared with the main job.

    The main job and a same-precision replay from its checkpoint differ only by non-deterministic
    kernels and restore effects, the noise every verdict carries. Both thresholds are raised by
    `multiplier` x the largest such gap (the floor); a bit-exact (CPU) floor of 0 leaves them as
    configured. Violations are not counted until calibration is done. One replay per window, not
    two: the main job itself is the other run from that checkpoint.
    """

    enabled: bool = False  # measure the noise floor before trusting violations
    num_windows: int = 2  # same-precision windows to measure
    multiplier: float = 3.0  # warn and switch are raised by multiplier x the measured floor

    def problems(self):
        found = []
        if self.num_windows < 1:
            found.append(("num_windows", self.num_windows, "a positive integer"))
        if not (math.isfinite(self.multiplier) and self.multiplier > 0):
            found.append(("multiplier", self.multiplier, "a finite positive number"))
        return found


@dataclass
class TriggerRule:
    """One training signal to watch; crossing `above` or jumping `z_score` deviations fires the trigger."""

    signal: str = ""  # `loss`, `grad_norm` or a telemetry key (e.g. fp8/saturation_max; all keys: shadow/signals.py)
    above: float | None = None  # fire when the signal is above this value; null = no absolute threshold
    z_score: float | None = None  # fire when (value - mean) / std of the previous `window` values is above this
    window: int = 20  # observations of the signal in the rolling window; no z-score until it is full

    def problems(self):
        found = []
        if not is_signal(self.signal):
            found.append(("signal", self.signal, "loss, grad_norm or a telemetry key listed in shadow/signals.py "
                          "(e.g. fp8/saturation_max, act/kurtosis_max)"))
        if self.above is None and self.z_score is None:
            found.append(("above", None, "a number, or set z_score (a rule needs at least one test)"))
        if self.z_score is not None and not (math.isfinite(self.z_score) and self.z_score > 0):
            found.append(("z_score", self.z_score, "a finite positive number of standard deviations"))
        if self.above is not None and not math.isfinite(self.above):
            found.append(("above", self.above, "a finite number"))
        if self.window < 2:
            found.append(("window", self.window, "at least 2 (a standard deviation needs two values)"))
        return found


@dataclass
class TriggersConfig:
    """Extra verification replays when a training signal says FP8 may be in trouble, besides the cadence.

    The controller feeds every FP8 main-job step's signals to the rules (telemetry keys exist on the
    steps of the job's `telemetry.every_steps`). When one fires, a verification replay starts from
    the latest committed checkpoint at or before that step and runs through it (at least
    `verify.window_steps` steps), unless a verification window already covers the step. It takes the
    next free replay slot (`verify.max_concurrent_replays`), ahead of the cadence. Every firing is a
    `trigger_fired` event.
    """

    rules: list[TriggerRule] = field(default_factory=list)  # none = verify on the cadence only
    min_steps_between: int = 100  # rate limit per signal: after firing, a signal stays quiet this many steps

    def problems(self):
        if self.min_steps_between < 1:
            return [("min_steps_between", self.min_steps_between, "a positive number of steps")]
        return []


@dataclass
class Policy:
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    thresholds: ThresholdsConfig = field(default_factory=ThresholdsConfig)
    action: ActionConfig = field(default_factory=ActionConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    triggers: TriggersConfig = field(default_factory=TriggersConfig)

    def problems(self):
        found = []
        if self.compare.ignore_first_steps >= self.verify.window_steps >= 1:
            found.append(("compare.ignore_first_steps", self.compare.ignore_first_steps,
                          f"fewer than verify.window_steps ({self.verify.window_steps}) steps"))
        if self.compare.metric in EVAL_METRICS and self.verify.eval_batches < 1:
            found.append(("compare.metric", self.compare.metric.value,
                          "a training-loss metric, or verify.eval_batches > 0 for an eval metric"))
        if self.verify.early_stop.min_steps and self.compare.metric not in EARLY_STOP_METRICS:
            found.append(("verify.early_stop.min_steps", self.verify.early_stop.min_steps,
                          (f"0 with compare.metric {self.compare.metric.value} (early stopping tests a mean: "
                           "use compare.metric mean_gap or rel_mean_gap)")))
        return found


def load_policy(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Policy:
    """Load a policy file (or only the defaults when None) with `--set` overrides."""
    return load_config(Policy, path, overrides)


def policy_from_text(text: str, source: str, overrides: list[str] | None = None) -> Policy:
    """Build a policy from YAML text already read (the hot-reload watcher reads the file once)."""
    layers = [(source, parse_yaml_mapping(text, source))]
    if overrides:
        layers.append(("--set", parse_overrides(overrides)))
    return build_config(Policy, layers)
