"""Overhead on the main job: `shadow run` (replays on their own Ray actor) over `shadow train`, same job.

1. Rounds alternate `shadow train` and `shadow run` of the same job and steps, each in a fresh process
   with one torch thread for the main job (`resources.cpus_per_rank=1`); `shadow run`'s replays run on
   their own actor with their own thread. Reported per command, medians over rounds, and their ratios:
   the process's wall time (start-up included: Ray, actors, MLflow), the run's own wall time
   (`summary.json` wall_s: the loop to the last checkpoint) and the main job's median step time (does
   a replay beside it slow its steps?). The machine must have a core per thread for "own resources"
   to hold: the figures say what this one gave.
2. The main loop's blocking time per checkpoint over the mean step time, sync vs async persist, from
   `checkpoint_blocking.py` (tiny model by default).

    python bench/overhead.py [--rounds 2] [--steps 300] [--job jobs/tiny.yaml] [--policy policies/fixed.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import checkpoint_blocking
from common import REPO, median, print_table, write_result

from shadow.rundir import read_trajectory


def timed_command(args: list[str], overrides: list[str], out: Path) -> dict:
    """A `shadow` subcommand in a fresh process: its wall time, summary.json and main-job step times."""
    sets = [a for o in overrides for a in ("--set", o)]
    cmd = [sys.executable, "-m", "shadow", *args, *sets, "--out", str(out)]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    process_s = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    steps = [r.step_time_s for r in read_trajectory(out)]
    return {"process_s": process_s, "wall_s": summary["wall_s"], "median_step_s": median(steps),
            "num_steps": len(steps), "verification_cost": summary.get("verification_cost", 0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--job", default="jobs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--policy", default="policies/fixed.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="job override for both commands (e.g. a smaller model)")
    parser.add_argument("--blocking-sizes", nargs="*", default=["tiny (4x128)"],
                        help=f"checkpoint-blocking sizes, of {list(checkpoint_blocking.SIZES)}")
    parser.add_argument("--out")
    args = parser.parse_args()
    overrides = args.overrides + [f"steps={args.steps}", "resources.cpus_per_rank=1"]
    job = ["--job", str(REPO / args.job)]
    commands = {"train": ["train", *job], "run": ["run", *job, "--policy", args.policy]}
    samples: dict[str, list[dict]] = {name: [] for name in commands}
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.rounds):
            for name, command in commands.items():
                samples[name].append(timed_command(command, overrides, Path(tmp) / f"{name}-{index}"))
                print(f"round {index + 1} {name}: {samples[name][-1]['process_s']:.1f} s", flush=True)
    keys = ("process_s", "wall_s", "median_step_s")
    rows = [{"command": f"shadow {name}", **{k: median([s[k] for s in samples[name]]) for k in keys},
             "verification_cost": samples[name][0]["verification_cost"]} for name in commands]
    # ratios per round (train and run of a round ran back to back), then the median over rounds
    ratios = {k: median([r[k] / t[k] for r, t in zip(samples["run"], samples["train"])]) for k in keys}
    rows.append({"command": "run / train", **ratios})
    print_table([("command", "command", ""), ("process_s", "process s", ".2f"), ("wall_s", "run wall s", ".2f"),
                 ("median_step_s", "main step s", ".4f"), ("verification_cost", "replay/main steps", ".2f")], rows,
                title=f"\nOverhead: {args.job} {' '.join(args.overrides)} {args.steps} steps, policy {args.policy}, "
                      f"{args.rounds} rounds alternating, 1 thread for the main job (goal: run/train <= 1.05)")
    blocking = checkpoint_blocking.measure({k: checkpoint_blocking.SIZES[k] for k in args.blocking_sizes},
                                           rounds=3, every=3, checkpoints=2)
    print_table(checkpoint_blocking.COLUMNS, blocking,
                title="\nBlocking per checkpoint over the mean step time (goal: async <= 0.05 of a step)")
    write_result("overhead", {"job": args.job, "overrides": args.overrides, "steps": args.steps,
                              "policy": args.policy, "rounds": args.rounds, "load_avg_1m_at_end": os.getloadavg()[0],
                              "rows": rows, "ratios": ratios, "samples": samples, "blocking": blocking}, args.out)


if __name__ == "__main__":
    main()
