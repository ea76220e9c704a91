"""Detection quality: false switches, detection rate and latency of the guard, over seeds x scenarios.

For each seed and scenario three runs go through the real commands: `shadow train --precision bf16`
(the baseline), `shadow train` in FP8 (unguarded) and `shadow run` under the policy (guarded). The
ground truth comes from the two `shadow train` runs only, never from shadow itself: a (scenario, seed)
is *degraded* when unguarded FP8's final held-out loss is worse than BF16's by more than the policy's
switch threshold (as a fraction of the BF16 loss), *healthy* otherwise. Then:
- false switch: a guarded run of a healthy (scenario, seed) switched to BF16 (goal 0);
- detection: a guarded run of a degraded one switched (goal 100%);
- latency: main-job step at which the switch was applied minus the onset of the fault (0 for
  scenarios degraded from the start; the drawn start step for the injected fault); goal <= one
  verification interval + one window (`every_n_steps + window_steps`);
- final-loss gap to BF16 of guarded and unguarded runs.
BF16 numerics do not depend on the FP8 settings, so the four scenarios at the job's learning rate share
one BF16 baseline per seed (the 10x learning-rate scenario has its own).

    python bench/detection_quality.py [--seeds 5] [--steps 300] [--policy policies/fixed.yaml] [--model ...]
"""

from __future__ import annotations

import argparse
import random
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import FAST, REPO, median, print_table, run_shadow, switch_step, write_result

from shadow.config.policy import load_policy

JOB = REPO / "jobs" / "tiny.yaml"
FAULT_SCALE = 1000.0  # FP8 scales multiplied by this from the onset to the end: operands saturate


def scenarios(steps: int, seed: int) -> dict[str, tuple[list[str], int]]:
    """name -> (job overrides, onset step). The fault's onset is drawn per seed, early enough that a
    verification window can still follow it."""
    onset = random.Random(seed).randint(steps // 6, steps * 7 // 12)
    return {
        "hybrid": ([], 0),  # healthy FP8: E4M3 forward, E5M2 gradients, delayed scaling
        "e5m2": (["precision.format=e5m2"], 0),  # E5M2 everywhere
        "noscale": (["precision.scaling=none"], 0),  # hybrid without scaling
        "fault": ([f"precision.fault.start_step={onset}", f"precision.fault.end_step={steps}",
                                  f"precision.fault.scale_factor={FAULT_SCALE}"], onset),
        "lr10x": (["optim.lr=3.0e-2", "optim.min_lr=3.0e-3"], 0),
    }


def chosen(args, seed: int) -> dict[str, tuple[list[str], int]]:
    return {k: v for k, v in scenarios(args.steps, seed).items() if k in args.scenarios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--policy", default="policies/fixed.yaml")
    parser.add_argument("--policy-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a policy setting (passed on to `shadow run`)")
    parser.add_argument("--scenarios", nargs="*", default=list(scenarios(300, 0)), help="subset (default: all)")
    parser.add_argument("--model", nargs="*", default=[],
                        help=f"model-size overrides (default: the job's own, 4x128; tests use {' '.join(FAST)})")
    parser.add_argument("--parallel", type=int, default=2, help="`shadow` commands at once (a thread each; "
                        "a guarded run's replays take a second one a quarter of the time)")
    parser.add_argument("--out")
    args = parser.parse_args()
    policy = load_policy(str(REPO / args.policy), args.policy_set)
    threshold = policy.thresholds.switch
    latency_goal = policy.verify.every_n_steps + policy.verify.window_steps
    base = args.model + [f"steps={args.steps}"]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        trains = {}  # (key) -> (cmd args, overrides, out dir)
        for seed in range(args.seeds):
            seeded = base + [f"seed={seed}", f"data.seed={seed}"]
            for name, (overrides, _) in chosen(args, seed).items():
                trains[("fp8", name, seed)] = (["train"], seeded + overrides, root / f"fp8-{seed}-{len(trains)}")
                lr = [o for o in overrides if o.startswith("optim.")]
                if ("bf16", tuple(lr), seed) not in trains:
                    trains[("bf16", tuple(lr), seed)] = (["train", "--precision", "bf16"], seeded + lr,
                                                         root / f"bf16-{seed}-{len(trains)}")
        print(f"{len(trains)} `shadow train` runs, {args.parallel} at a time ...", flush=True)
        with ThreadPoolExecutor(args.parallel) as pool:
            futures = {key: pool.submit(run_shadow, value[0], JOB, *value[1:]) for key, value in trains.items()}
            summaries = {key: future.result() for key, future in futures.items()}

        guarded_runs = {}  # (scenario, seed) -> (future of the summary, run dir)
        with ThreadPoolExecutor(args.parallel) as pool:
            for seed in range(args.seeds):
                seeded = base + [f"seed={seed}", f"data.seed={seed}"]
                for name, (overrides, _) in chosen(args, seed).items():
                    out = root / f"run-{name}-{seed}"
                    policy_sets = [a for o in args.policy_set for a in ("--policy-set", o)]
                    guarded_runs[(name, seed)] = (pool.submit(run_shadow, ["run", "--policy", args.policy, *policy_sets],
                                                              JOB, seeded + overrides, out), out)
            rows = []
            for seed in range(args.seeds):
                for name, (overrides, onset) in chosen(args, seed).items():
                    lr = tuple(o for o in overrides if o.startswith("optim."))
                    bf16 = summaries[("bf16", lr, seed)]["final_eval_loss"]
                    fp8 = summaries[("fp8", name, seed)]["final_eval_loss"]
                    future, out = guarded_runs[(name, seed)]
                    guarded = future.result()
                    degraded = fp8 / bf16 - 1 > threshold
                    switched_at = switch_step(out)
                    row = {"scenario": name, "seed": seed, "onset": onset, "bf16_eval": bf16, "fp8_eval": fp8,
                           "guarded_eval": guarded["final_eval_loss"], "unguarded_gap": fp8 / bf16 - 1,
                           "guarded_gap": guarded["final_eval_loss"] / bf16 - 1, "degraded": degraded,
                           "switched": guarded["num_precision_switches"] > 0, "switch_step": switched_at,
                           "latency": switched_at - onset if switched_at is not None else None,
                           "num_precision_switches": guarded["num_precision_switches"], "steps_fp8": guarded["steps_fp8"],
                           "steps_bf16": guarded["steps_bf16"], "verification_cost": guarded["verification_cost"],
                           "verdicts": [(v["window_start"], v["purpose"], round(v["value"], 5), v["level"])
                                        for v in guarded["verdicts"] if v["value"] is not None]}
                    rows.append(row)
                    print(f"seed {seed} {name:<26} unguarded {row['unguarded_gap']:+.2%}  guarded "
                          f"{row['guarded_gap']:+.2%}  {'degraded' if degraded else 'healthy '}  switch at "
                          f"{switched_at}", flush=True)

    table = []
    for name in chosen(args, 0):
        runs = [r for r in rows if r["scenario"] == name]
        bad = [r for r in runs if r["degraded"]]
        good = [r for r in runs if not r["degraded"]]
        latencies = [r["latency"] for r in bad if r["latency"] is not None]
        table.append({
            "scenario": name, "runs": len(runs), "degraded": f"{len(bad)}/{len(runs)}",
            "unguarded_gap": median([r["unguarded_gap"] for r in runs]) * 100,
            "guarded_gap": median([r["guarded_gap"] for r in runs]) * 100,
            "false_switches": f"{sum(r['switched'] for r in good)}/{len(good)}" if good else "-",
            "detected": f"{sum(r['switched'] for r in bad)}/{len(bad)}" if bad else "-",
            "latency_median": median(latencies) if latencies else None,
            "latency_max": max(latencies) if latencies else None,
        })
    good = [r for r in rows if not r["degraded"]]
    bad = [r for r in rows if r["degraded"]]
    latencies = [r["latency"] for r in bad if r["latency"] is not None]
    totals = {"false_switches": sum(r["switched"] for r in good), "healthy_runs": len(good),
              "detected": sum(r["switched"] for r in bad), "degraded_runs": len(bad),
              "latency_max": max(latencies) if latencies else None, "latency_goal": latency_goal}
    print_table([("scenario", "scenario", ""), ("runs", "runs", "d"), ("degraded", "degraded", ""),
                 ("unguarded_gap", "unguarded gap %", "+.2f"), ("guarded_gap", "guarded gap %", "+.2f"),
                 ("false_switches", "false switches", ""), ("detected", "detected", ""),
                 ("latency_median", "latency med", "g"), ("latency_max", "latency max", "g")], table,
                title=f"\nDetection quality: {args.seeds} seeds x {len(table)} scenarios, {args.steps} steps, "
                      f"model {' '.join(args.model) or 'as in the job'}, policy {args.policy} (switch at {threshold:.1%} "
                      f"held-out gap; latency goal {latency_goal} steps). Gaps: medians over seeds, vs BF16.")
    print(f"total: false switches {totals['false_switches']}/{totals['healthy_runs']} healthy runs, detected "
          f"{totals['detected']}/{totals['degraded_runs']} degraded runs, max latency {totals['latency_max']} "
          f"steps (goal <= {latency_goal})")
    write_result("detection_quality", {"seeds": args.seeds, "steps": args.steps, "model": args.model,
                                       "policy": args.policy, "policy_set": args.policy_set, "switch_threshold": threshold,
                                       "fault_scale": FAULT_SCALE, "table": table, "totals": totals, "rows": rows},
                 args.out)


if __name__ == "__main__":
    main()
