"""The comparator on synthetic trajectories: one test per verdict field, orientation, edge cases."""

import math
import subprocess
import sys

import pytest

from shadow.compare import METRIC_NAMES, VerdictKind, compare, trend_of
from shadow.config.policy import Metric
from shadow.records import StepRecord


def traj(start, losses, precision, eval_loss=None):
    """Records for steps start, start+1, ... with the given losses; eval_loss on the last step."""
    rows = [StepRecord(step=start + i, loss=loss, precision=precision, tokens=2048, step_time_s=0.1,
                       grad_norm=1.0, lr=1e-3) for i, loss in enumerate(losses)]
    if eval_loss is not None:
        rows[-1].eval_loss = eval_loss
    return rows


def test_identical_trajectories_give_zero_everything():
    losses = [2.5, 2.4, 2.41, 2.3]
    v = compare(traj(100, losses, "fp8"), traj(100, losses, "bf16"))
    assert v.kind is VerdictKind.COMPARED
    assert (v.mean_gap, v.rel_mean_gap, v.end_gap, v.max_abs_gap, v.slope, v.t_stat) == (0, 0, 0, 0, 0, 0)
    assert v.steps == (100, 101, 102, 103) and (v.window_start, v.window_end) == (100, 104)


def test_mean_and_relative_gap():
    v = compare(traj(0, [2.2, 2.4], "fp8"), traj(0, [2.0, 2.0], "bf16"))
    assert v.gaps == pytest.approx((0.2, 0.4))
    assert v.mean_gap == pytest.approx(0.3)
    assert v.rel_mean_gap == pytest.approx(0.3 / 2.0)
    assert v.reference_mean_loss == pytest.approx(2.0)


def test_end_gap_averages_the_last_fraction_of_the_window():
    main = traj(0, [2.0] * 6 + [2.5, 2.7], "fp8")
    replay = traj(0, [2.0] * 8, "bf16")
    v = compare(main, replay, end_fraction=0.25)  # last 2 of 8 steps
    assert v.end_gap == pytest.approx(0.6)
    assert v.rel_end_gap == pytest.approx(0.3)
    assert compare(main, replay, end_fraction=1.0).end_gap == pytest.approx(v.mean_gap)


def test_max_abs_gap_sees_either_direction():
    v = compare(traj(0, [2.0, 1.5, 2.1], "fp8"), traj(0, [2.0, 2.0, 2.0], "bf16"))
    assert v.max_abs_gap == pytest.approx(0.5)
    assert v.mean_gap < 0


def test_slope_of_a_linearly_growing_gap():
    main = traj(10, [2.0 + 0.01 * i for i in range(20)], "fp8")
    v = compare(main, traj(10, [2.0] * 20, "bf16"))
    assert v.slope == pytest.approx(0.01)


def test_paired_statistic():
    gaps = [0.1, 0.3, 0.2, 0.4]
    v = compare(traj(0, [2 + g for g in gaps], "fp8"), traj(0, [2.0] * 4, "bf16"))
    mean = sum(gaps) / 4
    std = math.sqrt(sum((g - mean) ** 2 for g in gaps) / 3)
    assert v.t_stat == pytest.approx(mean / (std / 2), rel=1e-6)


@pytest.mark.parametrize("gap, expected", [(0.0, 0.0), (0.5, math.inf), (-0.5, -math.inf)])
def test_paired_statistic_with_zero_spread(gap, expected):
    v = compare(traj(0, [2.0 + gap] * 5, "fp8"), traj(0, [2.0] * 5, "bf16"))
    assert v.t_stat == expected


def test_single_step_has_no_slope_or_statistic():
    v = compare(traj(7, [2.1], "fp8"), traj(7, [2.0], "bf16"))
    assert v.slope is None and v.t_stat is None and v.mean_gap == pytest.approx(0.1)


def test_eval_gap_from_records_and_from_arguments():
    v = compare(traj(0, [2.0, 2.0], "fp8", eval_loss=2.2), traj(0, [2.0, 2.0], "bf16", eval_loss=2.0))
    assert v.eval_gap == pytest.approx(0.2) and v.rel_eval_gap == pytest.approx(0.1)
    v = compare(traj(0, [2.0], "fp8"), traj(0, [2.0], "bf16"), main_eval_loss=3.3, replay_eval_loss=3.0)
    assert v.eval_gap == pytest.approx(0.3)
    assert compare(traj(0, [2.0], "fp8", eval_loss=2.2), traj(0, [2.0], "bf16")).eval_gap is None


def test_probe_orientation_positive_means_fp8_worse():
    """Main BF16, replay FP8 worse by 0.1: the same +0.1 as a verification where main FP8 is worse."""
    probe = compare(traj(0, [2.0] * 4, "bf16", eval_loss=2.0), traj(0, [2.1] * 4, "fp8", eval_loss=2.2))
    verify = compare(traj(0, [2.1] * 4, "fp8"), traj(0, [2.0] * 4, "bf16"))
    assert probe.fp8_side == "replay" and verify.fp8_side == "main"
    assert probe.mean_gap == pytest.approx(0.1) == pytest.approx(verify.mean_gap)
    assert probe.rel_mean_gap == pytest.approx(0.1 / 2.0)  # relative to the BF16 side, the main job here
    assert probe.eval_gap == pytest.approx(0.2) and probe.rel_eval_gap == pytest.approx(0.1)


def test_same_precision_pair_keeps_main_minus_replay():
    v = compare(traj(0, [2.0, 2.0], "bf16"), traj(0, [2.1, 2.1], "bf16"))
    assert v.fp8_side is None and v.mean_gap == pytest.approx(-0.1)


def test_mixed_precision_side_is_reported_as_mixed():
    main = traj(0, [2.0, 2.0], "fp8") + traj(2, [2.0, 2.0], "bf16")
    v = compare(main, traj(0, [2.0] * 4, "bf16"))
    assert v.main_precision == "mixed" and v.fp8_side is None


def test_missing_steps_are_listed_not_dropped_silently():
    main = [r for r in traj(0, [2.0] * 10, "fp8") if r.step not in (3, 4)]
    replay = [r for r in traj(0, [2.0] * 10, "bf16") if r.step != 7]
    v = compare(main, replay, window=(0, 10))
    assert v.missing_in_main == (3, 4) and v.missing_in_replay == (7,)
    assert v.steps == (0, 1, 2, 5, 6, 8, 9)


def test_window_defaults_to_the_replay_range_of_a_whole_main_trajectory():
    main = traj(0, [3.0] * 100 + [2.5] * 20 + [9.0] * 80, "fp8")
    v = compare(main, traj(100, [2.0] * 20, "bf16"))
    assert (v.window_start, v.window_end) == (100, 120) and v.mean_gap == pytest.approx(0.5)
    assert v.missing_in_main == () and v.missing_in_replay == ()


def test_a_replay_that_stopped_early_shows_missing_steps_against_an_explicit_window():
    v = compare(traj(100, [2.0] * 50, "fp8"), traj(100, [2.0] * 30, "bf16"), window=(100, 150))
    assert v.missing_in_replay == tuple(range(130, 150)) and len(v.steps) == 30


def test_later_rows_for_a_step_replace_earlier_ones():
    main = traj(0, [5.0, 5.0], "fp8") + traj(0, [2.1, 2.1], "fp8")  # steps re-trained after a rollback
    v = compare(main, traj(0, [2.0, 2.0], "bf16"))
    assert v.mean_gap == pytest.approx(0.1)


def test_ignore_first_steps():
    main = traj(0, [9.0, 9.0, 2.1, 2.1], "fp8")
    v = compare(main, traj(0, [2.0] * 4, "bf16"), ignore_first_steps=2)
    assert v.steps == (2, 3) and v.mean_gap == pytest.approx(0.1)
    assert v.missing_in_main == () and v.missing_in_replay == ()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_is_a_verdict_not_a_crash(bad):
    v = compare(traj(0, [2.0, bad, 2.0], "fp8"), traj(0, [2.0] * 3, "bf16"))
    assert v.kind is VerdictKind.NONFINITE
    assert v.nonfinite_main == (1,) and v.nonfinite_replay == ()
    assert v.fp8_nonfinite and v.mean_gap is None
    assert v.to_dict()["kind"] == "nonfinite"


def test_nonfinite_bf16_side_is_not_blamed_on_fp8():
    v = compare(traj(0, [2.0, 2.0], "fp8"), traj(0, [2.0, math.nan], "bf16"))
    assert v.kind is VerdictKind.NONFINITE and not v.fp8_nonfinite


def test_no_overlap():
    v = compare(traj(0, [2.0] * 5, "fp8"), traj(50, [2.0] * 5, "bf16"))
    assert v.kind is VerdictKind.NO_OVERLAP and v.missing_in_main == tuple(range(50, 55))
    assert compare(traj(0, [2.0], "fp8"), []).kind is VerdictKind.NO_OVERLAP


def test_to_dict_is_plain_json():
    import json

    v = compare(traj(0, [2.5] * 3, "fp8"), traj(0, [2.0] * 3, "bf16"))
    data = json.loads(json.dumps(v.to_dict(), allow_nan=False))
    assert data["t_stat"] == "inf" and data["fp8_side"] == "main" and data["steps"] == [0, 1, 2]


def _windows(verdicts, metric="mean_gap"):
    return [(v.window_start, v.metric(metric)) for v in verdicts]


def test_trend_across_windows():
    windows = [compare(traj(s, [2.0 + g] * 5, "fp8"), traj(s, [2.0] * 5, "bf16"))
               for s, g in ((0, 0.01), (100, 0.02), (200, 0.04))]
    t = trend_of(_windows(windows))
    assert t.growing and t.window_starts == (0, 100, 200)
    assert t.slope_per_step == pytest.approx(1.5e-4)  # least squares through (0, .01), (100, .02), (200, .04)
    assert not trend_of(_windows(windows[::-1])).growing
    flat = _windows([compare(traj(s, [2.01] * 5, "fp8"), traj(s, [2.0] * 5, "bf16")) for s in (0, 100)])
    assert not trend_of(flat).growing and trend_of(flat).slope_per_step == pytest.approx(0.0, abs=1e-15)
    assert not trend_of(_windows(windows[:1])).growing and trend_of(_windows(windows[:1])).slope_per_step is None
    assert trend_of([(0, 0.01), (100, None), (200, math.nan), (300, 0.02)]).window_starts == (0, 300)


def test_metric_names_match_the_policy_enum():
    assert set(METRIC_NAMES) == {m.value for m in Metric}
    with pytest.raises(KeyError):
        compare(traj(0, [2.0], "fp8"), traj(0, [2.0], "bf16")).metric("loss")


def test_brain_modules_import_no_heavy_or_io_dependencies():
    code = ("import sys, shadow.compare, shadow.policy; "
            "bad = [m for m in ('torch', 'ray', 'mlflow', 'boto3', 'numpy') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
