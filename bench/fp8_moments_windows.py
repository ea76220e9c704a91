"""FP8 Adam moments judged like a verification window: paired, from one state, on the same batches.

Independent trainings drift apart by chaos alone (see docs/benchmarks.md, "FP8 vs BF16 on the tiny job"), so an
end-of-run loss comparison mixes that drift with the effect of the moments. Here the tiny job trains
in FP8 with fp32 moments; at each start step the state is copied into a trainer with `optim.moments:
fp8` (its moments rounded into E4M3/E5M2 once) and both continue for W steps on the same batches. The
gap is the default policy's metric (rel_mean_gap, positive = FP8 moments worse; warn 0.005).

    python bench/fp8_moments_windows.py [--starts 100,200] [--window 25]
"""

from __future__ import annotations

import argparse
import time

from common import REPO, write_result

from shadow.compare import compare
from shadow.config import load_job
from shadow.config.policy import load_policy
from shadow.optim import optimizer_state_bytes
from shadow.trainer import Trainer

TINY_JOB = str(REPO / "jobs" / "tiny.yaml")


def _with_fp8_moments(source: Trainer) -> Trainer:
    """A trainer with moments fp8 in the state of `source` (fp32 moments rounded once)."""
    target = Trainer(load_job(TINY_JOB, ["optim.moments=fp8"]))
    target.model.load_state_dict(source.model.state_dict())
    params = dict(target.model.named_parameters())
    for name, param in source.model.named_parameters():
        state = source.optimizer.state[param]
        target.optimizer.set_state(params[name], step=state["step"], exp_avg=state["exp_avg"],
                                   exp_avg_sq=state["exp_avg_sq"])
    target.step = source.step
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", default="100,200")
    parser.add_argument("--window", type=int, default=25)
    parser.add_argument("--out")
    args = parser.parse_args()
    started = time.time()
    policy = load_policy(REPO / "policies" / "default.yaml")
    main_trainer = Trainer(load_job(TINY_JOB, ["telemetry.every_steps=0"]))
    rows = []
    for start in sorted(int(s) for s in args.starts.split(",")):
        while main_trainer.step < start:
            main_trainer.train_step()
        fp8 = _with_fp8_moments(main_trainer)
        reference = [main_trainer.train_step() for _ in range(args.window)]
        candidate = [fp8.train_step() for _ in range(args.window)]
        verdict = compare(candidate, reference)  # candidate in the "main" (FP8) role: positive = worse
        rows.append({"window": [start, start + args.window], "rel_mean_gap": verdict.rel_mean_gap,
                     "max_abs_gap": verdict.max_abs_gap,
                     "state_bytes": {"fp32": optimizer_state_bytes(main_trainer.optimizer),
                                     "fp8": optimizer_state_bytes(fp8.optimizer)}})
        print(rows[-1], flush=True)
    write_result("fp8_moments_windows", {"job": "jobs/tiny.yaml", "windows": rows, "warn": policy.thresholds.warn,
                                         "switch": policy.thresholds.switch,
                                         "wall_s": round(time.time() - started, 1)}, args.out)


if __name__ == "__main__":
    main()
