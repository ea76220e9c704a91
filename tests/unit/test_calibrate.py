"""Calibration's arithmetic on synthetic windows: a metric it cannot measure is an error that names it,
never a NaN floor; the policy header says which thresholds were applied."""

import pytest

from shadow.calibrate import Calibration, _gap, calibrate
from shadow.config import load_job
from shadow.config.policy import load_policy
from shadow.records import StepRecord


def _window(losses, start=100):
    return [StepRecord(step=start + i, loss=loss, precision="bf16", tokens=1, step_time_s=0.1, grad_norm=1.0,
                       lr=1e-3) for i, loss in enumerate(losses)]


@pytest.mark.parametrize("metric", ["eval_gap", "rel_eval_gap"])
def test_eval_metrics_are_rejected_before_any_training(metric):
    policy = load_policy(None, [f"compare.metric={metric}", "verify.eval_batches=1"])
    with pytest.raises(ValueError, match=f"compare.metric {metric} .*one of mean_gap, rel_mean_gap"):
        calibrate(load_job(None), policy, start_step=0, window_steps=1, repeats=1, seeds=[], multiplier=3.0)


def test_a_bit_exact_window_is_a_zero_gap_in_t_stat():
    window = _window([2.5, 2.4, 2.3])
    assert _gap(load_policy(None, ["compare.metric=t_stat"]), window, window) == 0.0


@pytest.mark.parametrize("metric", ["t_stat", "slope"])
def test_a_metric_the_window_cannot_give_is_an_error_naming_it(metric):
    window = _window([2.5])  # one compared step: no spread, no slope
    with pytest.raises(ValueError, match=f"no {metric} for the calibration window \\[100, 101\\).*--window"):
        _gap(load_policy(None, [f"compare.metric={metric}"]), window, window)


def test_a_diverged_window_is_an_error_not_a_nan_floor():
    with pytest.raises(ValueError, match="not finite"):
        _gap(load_policy(None), _window([2.5, float("nan")]), _window([2.5, 2.4]))


def test_the_note_says_which_thresholds_were_applied():
    base = load_policy(None).thresholds
    calibration = Calibration("rel_mean_gap", 100, 8, "bf16", [0.0], {4: 0.0}, 0.0, "seeds", base, 3.0)
    assert calibration.note == "the thresholds are the base policy's: the floor from seeds is 0"
    calibration = Calibration("rel_mean_gap", 100, 8, "bf16", [0.0], {}, 0.0, "none", base, 3.0)
    assert "no --seeds were given" in calibration.note
    calibration = Calibration("rel_mean_gap", 100, 8, "bf16", [0.0], {4: 0.01}, 0.01, "seeds", base, 2.0)
    assert calibration.note == "thresholds.warn = the floor, thresholds.switch = 2 x the floor"
