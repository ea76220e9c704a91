"""Noise-floor calibration before a run (like Megatron's rerun `report_stats` mode): how large is the
gap between two trajectories that differ by nothing that matters, in the policy's metric?

The job trains to `start_step` in its own precision, then the window [start_step, start_step + W) is
replayed `repeats` times from that state in the same precision and compared with the first pass: the
gap is what non-deterministic kernels add (on GPU), and exactly 0 where training is deterministic (on
CPU). Where it is 0, the spread across model-initialisation `seeds` stands in: each seed trains to the
window's end on the same batches, and is compared with the job's own seed over the window. That is a
deliberately generous floor: FP8 damage smaller than the difference between two healthy initialisations
is not worth a switch.

Suggested thresholds: warn = floor, switch = multiplier x floor (a floor of 0 keeps the base policy's).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

from shadow.compare import compare
from shadow.config.job import JobConfig
from shadow.config.policy import EVAL_METRICS, Metric, Policy, ThresholdsConfig
from shadow.records import StepRecord
from shadow.trainer import Trainer


@dataclass
class Calibration:
    metric: str  # the policy's compare.metric
    start_step: int
    window_steps: int
    precision: str
    repeat_gaps: list[float]  # |metric| of each same-precision replay against the first pass
    seed_gaps: dict[int, float]  # |metric| of each other seed's window against the job's seed
    floor: float  # the noise floor the thresholds are built on
    source: str  # where the floor came from: "repeats", "seeds" or "none"
    thresholds: ThresholdsConfig  # suggested
    multiplier: float  # switch = multiplier x floor, when the floor is above 0

    @property
    def note(self) -> str:
        """What the suggested thresholds are, said from what was applied (the written policy's header)."""
        if self.floor > 0:
            return f"thresholds.warn = the floor, thresholds.switch = {self.multiplier:g} x the floor"
        if self.source == "none":
            return "the thresholds are the base policy's: the repeats were bit-exact and no --seeds were given"
        return f"the thresholds are the base policy's: the floor from {self.source} is 0"

    def table(self) -> str:
        lines = [f"window [{self.start_step}, {self.start_step + self.window_steps}) in {self.precision}, "
                 f"metric {self.metric}", f"{'run':<22}{'|' + self.metric + '|':>16}"]
        lines += [f"{'repeat ' + str(i + 1):<22}{gap:>16.6g}" for i, gap in enumerate(self.repeat_gaps)]
        lines += [f"{'seed ' + str(seed):<22}{gap:>16.6g}" for seed, gap in self.seed_gaps.items()]
        lines.append(f"noise floor {self.floor:.6g} (from {self.source}) -> warn {self.thresholds.warn:.6g}, "
                     f"switch {self.thresholds.switch:.6g}")
        return "\n".join(lines)


def _window(trainer: Trainer, num_steps: int) -> list[StepRecord]:
    return [trainer.train_step() for _ in range(num_steps)]


def _gap(policy: Policy, reference: list[StepRecord], other: list[StepRecord]) -> float:
    """|metric| of `other` against `reference`. A bit-exact pair is 0 in every training-loss metric
    (t_stat included: zero spread and zero mean is exact agreement). A metric the window cannot give is
    an error: as NaN it would make the floor NaN, and the base thresholds would be kept without a word."""
    name = policy.compare.metric.value
    verdict = compare(reference, other, ignore_first_steps=policy.compare.ignore_first_steps,
                      end_fraction=policy.compare.end_fraction)
    value = verdict.metric(name)
    if value is None:
        window = f"[{verdict.window_start}, {verdict.window_end})"
        if verdict.nonfinite_main or verdict.nonfinite_replay:
            raise ValueError(f"no {name} for the calibration window {window}: a loss in it is not finite "
                             f"(the job diverges); calibrate an earlier --start-step")
        raise ValueError(f"no {name} for the calibration window {window}: {len(verdict.steps)} steps compared "
                         f"after compare.ignore_first_steps={policy.compare.ignore_first_steps} are too few; "
                         f"use a longer --window")
    return abs(value)


def calibrate(job: JobConfig, policy: Policy, *, start_step: int, window_steps: int, repeats: int,
              seeds: list[int], multiplier: float) -> Calibration:
    if policy.compare.metric in EVAL_METRICS:
        training_metrics = ", ".join(m.value for m in Metric if m not in EVAL_METRICS)
        raise ValueError(f"compare.metric {policy.compare.metric.value} compares held-out losses, which "
                         f"calibrate does not measure (it replays training-loss windows); calibrate with a "
                         f"--policy whose compare.metric is one of {training_metrics}")
    if start_step + window_steps > job.steps:
        raise ValueError(f"the window [{start_step}, {start_step + window_steps}) reaches past the job's "
                         f"steps ({job.steps}); use a smaller --start-step or --window")
    base = Trainer(job)
    _window(base, start_step)
    snapshot = base.snapshot()
    reference = _window(base, window_steps)
    repeat_gaps = []
    for _ in range(repeats):
        replay = Trainer(job)
        replay.restore(snapshot)
        repeat_gaps.append(_gap(policy, reference, _window(replay, window_steps)))
    seed_gaps = {}
    for seed in (s for s in seeds if s != job.seed):
        other = Trainer(replace(copy.deepcopy(job), seed=seed))
        seed_gaps[seed] = _gap(policy, reference, _window(other, start_step + window_steps)[start_step:])
    if max(repeat_gaps, default=0.0) > 0:
        floor, source = max(repeat_gaps), "repeats"
    elif seed_gaps:
        floor, source = max(seed_gaps.values()), "seeds"
    else:
        floor, source = 0.0, "none"
    thresholds = policy.thresholds
    if floor > 0:
        thresholds = replace(thresholds, warn=floor, switch=multiplier * floor)
    return Calibration(policy.compare.metric.value, start_step, window_steps, job.precision.mode.value,
                       repeat_gaps, seed_gaps, floor, source, thresholds, multiplier)
