"""Emulation cost on CPU: emulated-FP8 step time over emulated-BF16 step time, side by side.

For the tiny job and a ~10x larger model, both precisions are timed in alternating rounds in one
process (so machine noise hits both alike); the table reports medians and their ratio.

    python bench/emulation_cost.py [--rounds 5] [--steps-per-round 4]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import print_table, write_result

from shadow.config import load_job
from shadow.trainer import Trainer

SIZES = {
    "tiny (4x128)": [],
    "10x (6x352)": ["model.num_layers=6", "model.d_model=352", "model.num_heads=4"],
}


def _step_times(trainer: Trainer, num_steps: int) -> list[float]:
    return [trainer.train_step().step_time_s for _ in range(num_steps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", nargs="*", default=list(SIZES), help="subset of %(default)s")
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = []
    for label, overrides in {k: SIZES[k] for k in args.sizes}.items():
        trainers = {}
        for mode in ("bf16", "fp8"):
            job = load_job(None, overrides + [f"precision.mode={mode}", f"resources.cpus_per_rank={args.threads}"])
            trainers[mode] = Trainer(job)
            trainers[mode].train_step()  # warm-up
        times = {"bf16": [], "fp8": []}
        for _ in range(args.rounds):
            for mode in ("bf16", "fp8"):
                times[mode].extend(_step_times(trainers[mode], args.steps_per_round))
        params = sum(p.numel() for p in trainers["bf16"].model.parameters())
        bf16, fp8 = statistics.median(times["bf16"]), statistics.median(times["fp8"])
        rows.append({"model": label, "params": params, "bf16_step_s": bf16, "fp8_step_s": fp8, "fp8_over_bf16": fp8 / bf16})
    print_table([("model", "model", ""), ("params", "params", ","), ("bf16_step_s", "bf16 s/step", ".3f"),
                 ("fp8_step_s", "fp8 s/step", ".3f"), ("fp8_over_bf16", "fp8/bf16", ".2f")], rows)
    write_result("emulation_cost", {"torch": torch.__version__, "threads": args.threads, "rounds": args.rounds,
                                    "steps_per_round": args.steps_per_round, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
