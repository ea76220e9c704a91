"""Emulation cost on CPU: emulated-FP8 step time over emulated-BF16 step time, side by side.

For the tiny job and a ~10x larger model, both precisions are timed in alternating rounds in one
process (so machine noise hits both alike); the table reports medians and their ratio.

    python bench/emulation_cost.py [--rounds 5] [--steps-per-round 4]
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
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "emulation_cost.json"))
    args = parser.parse_args()
    rows = []
    for label, overrides in SIZES.items():
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
    print(f"{'model':<14} {'params':>10} {'bf16 s/step':>12} {'fp8 s/step':>11} {'fp8/bf16':>9}")
    for row in rows:
        print(f"{row['model']:<14} {row['params']:>10,} {row['bf16_step_s']:>12.3f} {row['fp8_step_s']:>11.3f} "
              f"{row['fp8_over_bf16']:>9.2f}")
    result = {"benchmark": "emulation_cost", "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "threads": args.threads, "rows": rows,
              "time_unix": round(time.time())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
