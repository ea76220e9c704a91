"""Telemetry cost on CPU: step time with telemetry on every step over step time without, side by side.

Two trainers of the tiny job in FP8 (the mode where telemetry does the most: per-operand underflow and
saturation counts), one recording telemetry every step and one never, timed in alternating rounds in
one process (so machine noise hits both alike); medians and their ratio. Telemetry every N steps costs
(ratio - 1) / N of the training time.

    python bench/telemetry_cost.py [--rounds 5] [--steps-per-round 4]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import print_table, write_result

from shadow.config import load_job
from shadow.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out")
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
        off_keys = len(trainers[0].train_step().telemetry)  # 0: the baseline records no telemetry
        rows.append({"model": "tiny (4x128)", "precision": mode, "telemetry_keys": keys, "off_telemetry_keys": off_keys,
                     "off_step_s": off, "every_step_s": on, "ratio": on / off,
                     "overhead_every_10_steps": (on / off - 1) / 10,
                     "off_step_times_s": times[0], "every_step_times_s": times[1]})
    print_table([("precision", "precision", ""), ("telemetry_keys", "keys", ""), ("off_step_s", "off s/step", ".3f"),
                 ("every_step_s", "on s/step", ".3f"), ("ratio", "ratio", ".3f"),
                 ("overhead_every_10_steps", "every 10", ".1%")], rows)
    write_result("telemetry_cost", {"torch": torch.__version__, "threads": args.threads, "rounds": args.rounds,
                                    "steps_per_round": args.steps_per_round, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
