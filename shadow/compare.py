"""Paired trajectories -> `Verdict`: how far one loss trajectory is from another over a window.

Pure (no torch, Ray, MLflow or I/O) so it is testable in milliseconds. Both sides start from the
same weights and see the same batches, so the per-step difference `d_i = loss_main_i - loss_replay_i`
is caused by precision (plus kernel noise), and statistics over `d` are paired statistics.

Orientation: every gap in a Verdict is signed so that positive means the FP8 side is worse than the
BF16 side. For a verification replay (main FP8, replay BF16) that is `d`; for a probe (main BF16,
replay FP8) it is `-d`. Same-precision pairs (noise measurements) keep `d`. One set of thresholds
therefore serves both directions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import Enum
from functools import lru_cache
from typing import Sequence

from shadow.jsonl import jsonable
from shadow.records import StepRecord

FP8, BF16, MIXED = "fp8", "bf16", "mixed"

# Names of the Verdict fields a policy may test (`compare.metric`); see shadow.config.policy.Metric.
METRIC_NAMES = ("mean_gap", "rel_mean_gap", "end_gap", "rel_end_gap", "max_abs_gap", "slope", "t_stat",
                "eval_gap", "rel_eval_gap")


class VerdictKind(str, Enum):
    COMPARED = "compared"  # statistics computed over the paired steps
    NONFINITE = "nonfinite"  # a loss on either side is NaN or infinite: statistics are not computed
    NO_OVERLAP = "no_overlap"  # no step is present on both sides (after ignore_first_steps)


@dataclass(frozen=True)
class Verdict:
    kind: VerdictKind
    main_precision: str  # "fp8", "bf16" or "mixed" over the paired steps of the main side
    replay_precision: str  # same for the replay side
    fp8_side: str | None  # "main" or "replay" when exactly one side ran FP8, else None
    window_start: int  # first step of the compared window
    window_end: int  # one past its last step
    steps: tuple[int, ...]  # the paired steps, ascending
    gaps: tuple[float, ...]  # oriented per-step gaps (positive = FP8 worse), one per paired step
    missing_in_main: tuple[int, ...]  # window steps the main side lacks
    missing_in_replay: tuple[int, ...]  # window steps the replay side lacks
    nonfinite_main: tuple[int, ...]  # steps whose main loss is NaN/inf
    nonfinite_replay: tuple[int, ...]  # steps whose replay loss is NaN/inf
    reference_mean_loss: float | None  # mean loss of the BF16 side (the replay side if both match)
    mean_gap: float | None = None
    rel_mean_gap: float | None = None
    end_gap: float | None = None
    rel_end_gap: float | None = None
    max_abs_gap: float | None = None
    slope: float | None = None  # gap change per step (least squares); None below 2 steps
    t_stat: float | None = None  # mean / standard error; 0 when all gaps are 0, +-inf when constant and nonzero
    eval_gap: float | None = None
    rel_eval_gap: float | None = None

    @property
    def fp8_nonfinite(self) -> bool:
        """The FP8 side blew up while the BF16 side stayed finite: FP8's fault."""
        fp8, bf16 = (self.nonfinite_main, self.nonfinite_replay) if self.fp8_side == "main" else (
            self.nonfinite_replay, self.nonfinite_main)
        return self.fp8_side is not None and bool(fp8) and not bf16

    def metric(self, name: str) -> float | None:
        if name not in METRIC_NAMES:
            raise KeyError(f"unknown verdict metric {name!r}; known: {', '.join(METRIC_NAMES)}")
        return getattr(self, name)

    def to_dict(self) -> dict:
        """Plain JSON-ready data for events: non-finite floats become strings, like StepRecord rows."""
        return {key: jsonable(value) for key, value in asdict(self).items()}


@dataclass(frozen=True)
class Trend:
    """How a metric moved across consecutive windows (oldest first)."""

    values: tuple[float, ...]  # the metric per window, windows without a value left out
    window_starts: tuple[int, ...]
    slope_per_step: float | None  # least-squares change of the metric per main-job step; None below 2
    growing: bool  # at least 2 windows and the metric rose from each window to the next

    def to_dict(self) -> dict:
        return {key: jsonable(value) for key, value in asdict(self).items()}


def compare(
    main_records: Sequence[StepRecord],
    replay_records: Sequence[StepRecord],
    *,
    window: tuple[int, int] | None = None,
    ignore_first_steps: int = 0,
    end_fraction: float = 0.25,
    main_eval_loss: float | None = None,
    replay_eval_loss: float | None = None,
) -> Verdict:
    """Compare the main job's records with a replay's over `window` = [start, end).

    `window` defaults to the replay's step range, so the main side may be the whole trajectory. A
    later row for the same step replaces an earlier one (a rolled-back main job re-trains steps).
    Steps missing on either side are listed in the verdict, never silently dropped. Eval losses
    default to the `eval_loss` both sides report at the window's last paired step.
    """
    main = _by_step(main_records)
    replay = _by_step(replay_records)
    if window is None:
        window = (min(replay), max(replay) + 1) if replay else (0, 0)
    start, end = window
    first_compared = start + max(ignore_first_steps, 0)
    in_window = range(start, end)
    missing_in_main = tuple(s for s in in_window if s not in main)
    missing_in_replay = tuple(s for s in in_window if s not in replay)
    steps = tuple(s for s in in_window if s >= first_compared and s in main and s in replay)

    main_precision = _precision([main[s] for s in steps])
    replay_precision = _precision([replay[s] for s in steps])
    fp8_side = _fp8_side(main_precision, replay_precision)
    sign = -1.0 if fp8_side == "replay" else 1.0
    reference = main if fp8_side == "replay" else replay
    base = dict(main_precision=main_precision, replay_precision=replay_precision, fp8_side=fp8_side,
                window_start=start, window_end=end, steps=steps, missing_in_main=missing_in_main,
                missing_in_replay=missing_in_replay,
                nonfinite_main=tuple(s for s in steps if not math.isfinite(main[s].loss)),
                nonfinite_replay=tuple(s for s in steps if not math.isfinite(replay[s].loss)))
    if not steps:
        return Verdict(VerdictKind.NO_OVERLAP, gaps=(), reference_mean_loss=None, **base)
    if base["nonfinite_main"] or base["nonfinite_replay"]:
        return Verdict(VerdictKind.NONFINITE, gaps=(), reference_mean_loss=None, **base)

    gaps = tuple(sign * (main[s].loss - replay[s].loss) for s in steps)
    reference_losses = [reference[s].loss for s in steps]
    num_end = max(1, math.ceil(end_fraction * len(steps)))
    mean_gap = _mean(gaps)
    end_gap = _mean(gaps[-num_end:])
    if main_eval_loss is None and replay_eval_loss is None:
        main_eval_loss, replay_eval_loss = main[steps[-1]].eval_loss, replay[steps[-1]].eval_loss
    eval_gap = rel_eval_gap = None
    if main_eval_loss is not None and replay_eval_loss is not None:
        eval_gap = sign * (main_eval_loss - replay_eval_loss)
        rel_eval_gap = _ratio(eval_gap, main_eval_loss if fp8_side == "replay" else replay_eval_loss)
    return Verdict(
        VerdictKind.COMPARED,
        gaps=gaps,
        reference_mean_loss=_mean(reference_losses),
        mean_gap=mean_gap,
        rel_mean_gap=_ratio(mean_gap, _mean(reference_losses)),
        end_gap=end_gap,
        rel_end_gap=_ratio(end_gap, _mean(reference_losses[-num_end:])),
        max_abs_gap=max(abs(g) for g in gaps),
        slope=_least_squares_slope(steps, gaps),
        t_stat=_paired_t(gaps),
        eval_gap=eval_gap,
        rel_eval_gap=rel_eval_gap,
        **base,
    )


def trend_of(windows: Sequence[tuple[int, float | None]]) -> Trend:
    """Is the metric growing from window to window? (window start, value) pairs in window order,
    oldest first; missing and non-finite values are left out."""
    pairs = [(start, value) for start, value in windows if value is not None and math.isfinite(value)]
    starts = tuple(start for start, _ in pairs)
    values = tuple(value for _, value in pairs)
    growing = len(values) >= 2 and all(b > a for a, b in zip(values, values[1:]))
    return Trend(values, starts, _least_squares_slope(starts, values), growing)


def mean_interval(verdict: Verdict, metric: str, confidence: float) -> tuple[float, float] | None:
    """The two-sided `confidence` interval of the window's mean gap, in `metric`'s unit (mean_gap, or
    rel_mean_gap: divided by the BF16 side's mean loss over the same steps, as the metric is).

    Student's t over the n paired per-step gaps: mean +- t_{(1+confidence)/2, n-1} x s / sqrt(n), with s
    their sample standard deviation. Replays are exact, so the gaps are the precision's effect on each
    step, not measurement noise; the interval treats them as a sample of the window's gaps around one
    mean (`projected_mean_interval` allows for a gap that drifts). None below two gaps, or when the
    verdict has no statistics (non-finite, no overlap).
    """
    gaps = verdict.gaps
    if verdict.kind is not VerdictKind.COMPARED or len(gaps) < 2:
        return None
    mean = _mean(gaps)
    spread = math.sqrt(math.fsum((g - mean) ** 2 for g in gaps) / (len(gaps) - 1) / len(gaps))
    half = t_quantile((1 + confidence) / 2, len(gaps) - 1) * spread
    return _in_unit(verdict, metric, mean - half, mean + half)


def projected_mean_interval(verdict: Verdict, metric: str, confidence: float,
                            num_steps: int) -> tuple[float, float] | None:
    """The two-sided `confidence` interval of the mean gap over the first `num_steps` steps of the window
    (its planned length) projected from the n steps compared so far by their least-squares line.

    With gaps d_i at positions x_i = 0..n-1 and the line's residual spread s_r (n - 2 degrees of freedom),
    the mean over positions 0..N-1 is the line at x* = (N - 1) / 2: prediction +- t_{(1+confidence)/2, n-2}
    x s_r x sqrt(1/n + (x* - mean x)^2 / Sxx). A gap that grows within the window (FP8 damage that builds
    up from the checkpoint on) projects higher than the mean of the steps seen so far, and the distance
    from the steps seen widens it. Same unit as `mean_interval`; None below three gaps.
    """
    gaps = verdict.gaps
    if verdict.kind is not VerdictKind.COMPARED or len(gaps) < 3:
        return None
    n = len(gaps)
    mean, centre = _mean(gaps), (n - 1) / 2
    sxx = math.fsum((x - centre) ** 2 for x in range(n))
    slope = math.fsum((x - centre) * (g - mean) for x, g in enumerate(gaps)) / sxx
    residuals = math.fsum((g - mean - slope * (x - centre)) ** 2 for x, g in enumerate(gaps))
    target = (max(num_steps, n) - 1) / 2
    half = (t_quantile((1 + confidence) / 2, n - 2) * math.sqrt(residuals / (n - 2))
            * math.sqrt(1 / n + (target - centre) ** 2 / sxx))
    projected = mean + slope * (target - centre)
    return _in_unit(verdict, metric, projected - half, projected + half)


def _in_unit(verdict: Verdict, metric: str, low: float, high: float) -> tuple[float, float] | None:
    """An interval of the mean gap in nats, in `metric`'s unit."""
    if metric == "mean_gap":
        return low, high
    if metric != "rel_mean_gap":
        raise KeyError(f"no interval for {metric!r}: only mean_gap and rel_mean_gap are means")
    reference = verdict.reference_mean_loss
    if not reference:
        return None
    return (low / reference, high / reference) if reference > 0 else (high / reference, low / reference)


@lru_cache(maxsize=1024)
def t_quantile(p: float, df: int) -> float:
    """Student's t quantile (inverse CDF) at probability `p` in (0, 1) with `df` degrees of freedom,
    by bisection on the CDF (the regularized incomplete beta function): pure Python, within 1e-8 of scipy."""
    if not 0.0 < p < 1.0 or df < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df >= 1, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    tail = 1.0 - p
    low, high = 0.0, 1.0
    while _t_upper_tail(high, df) > tail:
        low, high = high, 2.0 * high
    for _ in range(200):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        low, high = (middle, high) if _t_upper_tail(middle, df) > tail else (low, middle)
    return (low + high) / 2


def _t_upper_tail(t: float, df: int) -> float:
    """P(T > t) for t >= 0: half the regularized incomplete beta I_x(df/2, 1/2) at x = df / (df + t^2)."""
    return 0.5 * _incomplete_beta(df / 2, 0.5, df / (df + t * t))


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this point: use the symmetry
        return 1.0 - _incomplete_beta(b, a, 1.0 - x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    value = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            value *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * value / a


def _by_step(records: Sequence[StepRecord]) -> dict[int, StepRecord]:
    return {record.step: record for record in records}


def _precision(records: list[StepRecord]) -> str:
    found = {record.precision for record in records}
    return found.pop() if len(found) == 1 else MIXED


def _fp8_side(main_precision: str, replay_precision: str) -> str | None:
    if (main_precision, replay_precision) == (FP8, BF16):
        return "main"
    if (main_precision, replay_precision) == (BF16, FP8):
        return "replay"
    return None


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _ratio(gap: float, reference: float | None) -> float | None:
    return gap / reference if reference else None


def _least_squares_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    if len(xs) < 2:
        return None
    mean_x, mean_y = _mean(xs), _mean(ys)
    sxx = math.fsum((x - mean_x) ** 2 for x in xs)
    if sxx == 0:
        return None
    return math.fsum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx


def _paired_t(gaps: Sequence[float]) -> float | None:
    """Mean gap over its standard error. A zero spread is exact agreement (0) or a constant gap (+-inf)."""
    if len(gaps) < 2:
        return None
    mean = _mean(gaps)
    variance = math.fsum((g - mean) ** 2 for g in gaps) / (len(gaps) - 1)
    if variance == 0:
        return 0.0 if mean == 0 else math.copysign(math.inf, mean)
    return mean / math.sqrt(variance / len(gaps))
