"""Smooth-SwiGLU and FP8 Adam moments on the tiny job: what changes, measured.

Runs of jobs/tiny.yaml (300 steps, telemetry every 10 steps), all in one process:
- BF16, plain SwiGLU and Smooth-SwiGLU: the losses must be identical (the function is unchanged);
- FP8, plain vs Smooth-SwiGLU: SwiGLU-output outliers (amax, crest), what w_down's input quantizer
  sees (amax, underflow, saturation) and the final loss;
- FP8 with fp32 moments vs FP8 moments: optimizer-state bytes and the loss gap, in the default
  policy's metric (rel_mean_gap; healthy below warn = 0.005).

    python bench/fp8_options.py [--steps 300] [--bf16-steps 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common import REPO, write_result

from shadow.config import load_job
from shadow.config.policy import load_policy
from shadow.optim import optimizer_state_bytes
from shadow.trainer import Trainer

TINY_JOB = str(REPO / "jobs" / "tiny.yaml")


def _train(overrides: list[str], steps: int):
    trainer = Trainer(load_job(TINY_JOB, ["telemetry.every_steps=10", *overrides]))
    return trainer, [trainer.train_step() for _ in range(steps)]


def _outliers(records) -> dict:
    """Largest value over the run (and at the last telemetry step) of the outlier signals."""
    rows = [r.telemetry for r in records if r.telemetry]
    w_down = lambda t, stat: max(v for k, v in t.items() if ".ffn.w_down/input/" + stat in k)  # noqa: E731
    signals = {"swiglu_amax": lambda t: t["swiglu/amax_max"], "swiglu_crest": lambda t: t["swiglu/crest_max"],
               "act_kurtosis": lambda t: t["act/kurtosis_max"], "w_down_input_amax": lambda t: w_down(t, "amax"),
               "w_down_input_underflow": lambda t: w_down(t, "underflow"),
               "w_down_input_saturation": lambda t: w_down(t, "saturation")}
    return {name: {"max": max(f(t) for t in rows), "last": f(rows[-1])} for name, f in signals.items()}


def _rel_gap(records, reference) -> float:
    return statistics.fmean(r.loss - b.loss for r, b in zip(records, reference)) / statistics.fmean(
        b.loss for b in reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--bf16-steps", type=int, default=50)
    parser.add_argument("--out")
    args = parser.parse_args()
    started = time.time()
    _, bf16_plain = _train(["precision.mode=bf16"], args.bf16_steps)
    _, bf16_smooth = _train(["precision.mode=bf16", "model.smooth_swiglu=true"], args.bf16_steps)
    fp32_moments, fp8_plain = _train([], args.steps)
    _, fp8_smooth = _train(["model.smooth_swiglu=true"], args.steps)
    fp8_moments, fp8_mom = _train(["optim.moments=fp8"], args.steps)
    tail = slice(-args.steps // 4, None)
    result = {
        "job": "jobs/tiny.yaml", "steps": args.steps,
        "smooth_swiglu": {
            "bf16_steps": args.bf16_steps,
            "bf16_losses_identical": [r.loss for r in bf16_plain] == [r.loss for r in bf16_smooth],
            "bf16_max_abs_loss_diff": max(abs(a.loss - b.loss) for a, b in zip(bf16_plain, bf16_smooth)),
            "fp8_plain": _outliers(fp8_plain), "fp8_smooth": _outliers(fp8_smooth),
            "fp8_final_loss_plain": statistics.fmean(r.loss for r in fp8_plain[tail]),
            "fp8_final_loss_smooth": statistics.fmean(r.loss for r in fp8_smooth[tail]),
        },
        "fp8_moments": {
            "state_bytes_fp32_moments": optimizer_state_bytes(fp32_moments.optimizer),
            "state_bytes_fp8_moments": optimizer_state_bytes(fp8_moments.optimizer),
            "rel_mean_gap_all_steps": _rel_gap(fp8_mom, fp8_plain),
            "rel_mean_gap_last_quarter": _rel_gap(fp8_mom[tail], fp8_plain[tail]),
            "healthy_threshold_warn": load_policy(REPO / "policies" / "default.yaml").thresholds.warn,
        },
        "wall_s": round(time.time() - started, 1),
    }
    moments = result["fp8_moments"]
    moments["memory_ratio"] = moments["state_bytes_fp8_moments"] / moments["state_bytes_fp32_moments"]
    print(json.dumps(result, indent=1))
    write_result("fp8_options", result, args.out)


if __name__ == "__main__":
    main()
