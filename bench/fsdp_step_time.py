"""FSDP2 step time on CPU: 2 ranks x 1 micro-batch against 1 rank x 2 micro-batches, the same global batch.

For each model size, rounds alternate the two layouts (1 rank first in odd rounds, 2 ranks first in even
ones). Each launch (`shadow.launch.run_ranks`: fresh rank processes, `resources.cpus_per_rank=1`) builds
the trainer and trains the job's first `--warmup` + `--steps` steps; the `--steps` after the warm-up are
timed (rank 0's `step_time_s`: the ranks meet in every step's collectives). The table reports each
layout's median over all its timed steps and the 2-rank median over the 1-rank one (ideal: 0.5).

The two layouts add the same two loss-scaled gradients (FSDP2's reduce-scatter sums; see
shadow/distributed.py), so every launch's losses must be equal bit for bit: the benchmark asserts it and
prints it.

On a 2-core machine the 2 ranks get one core each and the 1 rank gets one core: the ratio shows what a
second core buys against FSDP2's all-gathers and reduce-scatters (gloo over loopback) and the ranks
waiting for each other, on a machine that other processes may share. It says nothing of GPU scaling.

    python bench/fsdp_step_time.py [--rounds 3] [--steps 3] [--warmup 1] [--sizes ...]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from common import print_table, write_result

from shadow.config import load_job
from shadow.launch import run_ranks
from shadow.trainer import Trainer

TINY_JOB = Path(__file__).resolve().parents[1] / "jobs" / "tiny.yaml"
SIZES = {
    "tiny (4x128)": [],
    # ~57M parameters; batch 4 x 128 tokens keeps a 1-rank step at a few seconds on one core
    "57M (8x768, batch 4)": ["model.num_layers=8", "model.d_model=768", "model.num_heads=12", "batch_size=4"],
}
NUM_MICRO_BATCHES = 2
LAYOUTS = {"1 rank x 2": 1, "2 ranks x 1": 2}  # label -> world size


def _train(layout, overrides: list[str], num_steps: int) -> dict:
    job = load_job(str(TINY_JOB), [*overrides, "resources.cpus_per_rank=1", f"resources.num_ranks={layout.world_size}",
                                   f"resources.grad_accum={layout.micro_batches_per_rank}"])
    trainer = Trainer(job, layout)
    records = [trainer.train_step() for _ in range(num_steps)]
    return {"params": sum(p.numel() for p in trainer.model.parameters()),  # DTensors: the global count
            "losses": [r.loss for r in records], "step_s": [r.step_time_s for r in records]}


def measure(label: str, overrides: list[str], rounds: int, steps: int, warmup: int) -> list[dict]:
    step_s = {name: [] for name in LAYOUTS}
    losses: dict[str, list[list[float]]] = {name: [] for name in LAYOUTS}
    params = 0
    for round_index in range(rounds):
        order = list(LAYOUTS) if round_index % 2 == 0 else list(reversed(LAYOUTS))
        for name in order:
            result = run_ranks(LAYOUTS[name], NUM_MICRO_BATCHES, _train, overrides, warmup + steps)
            step_s[name] += result["step_s"][warmup:]
            losses[name].append(result["losses"])
            params = result["params"]
    reference = losses["1 rank x 2"][0]
    equal = all(run == reference for runs in losses.values() for run in runs)
    assert equal, f"{label}: losses differ between layouts or launches: {losses}"
    print(f"measured {label}: the losses of all {2 * rounds} launches are equal bit for bit", flush=True)
    one = statistics.median(step_s["1 rank x 2"])
    return [{"model": label, "params": params, "layout": name, "world_size": LAYOUTS[name],
             "step_s": statistics.median(step_s[name]), "over_one_rank": statistics.median(step_s[name]) / one,
             "losses_equal": equal, "losses": losses[name][0], "step_times_s": step_s[name]} for name in LAYOUTS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per launch")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first in each launch")
    parser.add_argument("--sizes", nargs="*", default=list(SIZES), help="subset of %(default)s")
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = [row for label in args.sizes for row in measure(label, SIZES[label], args.rounds, args.steps, args.warmup)]
    print_table([("model", "model", ""), ("params", "params", ","), ("layout", "layout", ""),
                 ("step_s", "step s", ".3f"), ("over_one_rank", "vs 1 rank", ".3f"),
                 ("losses_equal", "losses equal", "")], rows,
                "FSDP2 step time, the same global batch (median over timed steps, 1 core per rank)")
    write_result("fsdp_step_time", {"torch": torch.__version__, "rounds": args.rounds, "steps": args.steps,
                                    "warmup": args.warmup, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
