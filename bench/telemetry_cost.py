"""Telemetry cost on CPU: step time with telemetry on every step over step time without, side by side.

Two trainers of the tiny job in FP8 (the mode where telemetry does the most: per-operand underflow and
saturation counts), one recording telemetry every step and one never, timed in alternating rounds in
one process (so machine noise hits both alike); medians and their ratio. Telemetry every N steps costs
(ratio - 1) / N of the training time.

    python bench/telemetry_cost.py [--rounds 5] [--steps-per-round 4]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from shadow.config import load_job
from shadow.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "telemetry_cost.json"))
    args = parser.parse_args()
    rows = []
    for mode in ("fp8", "bf16"):
        trainers = {}
        for every in (1, 0):
            job = load_job(None, [f"precision.mode={mode}", f"telemetry.every_steps={every}",
                                  f"resources.cpus_per_rank={args.threads}"])
            trainers[every] = Trainer(job)
            trainers[every].train_step()  # warm-up
        times = {1: [], 0: []}
        for _ in range(args.rounds):
            for every, trainer in trainers.items():
                times[every].extend(trainer.train_step().step_time_s for _ in range(args.steps_per_round))
        on, off = statistics.median(times[1]), statistics.median(times[0])
        keys = len(trainers[1].train_step().telemetry)
        rows.append({"model": "tiny (4x128)", "precision": mode, "telemetry_keys": keys, "off_step_s": off,
                     "every_step_s": on, "ratio": on / off, "overhead_every_10_steps": (on / off - 1) / 10})
    print(f"{'precision':<10} {'keys':>5} {'off s/step':>11} {'on s/step':>10} {'ratio':>6} {'every 10':>9}")
    for row in rows:
        print(f"{row['precision']:<10} {row['telemetry_keys']:>5} {row['off_step_s']:>11.3f} "
              f"{row['every_step_s']:>10.3f} {row['ratio']:>6.3f} {row['overhead_every_10_steps']:>8.1%}")
    result = {"benchmark": "telemetry_cost", "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "threads": args.threads, "rounds": args.rounds,
              "steps_per_round": args.steps_per_round, "rows": rows, "time_unix": round(time.time())}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
