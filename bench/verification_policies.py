"""Verification policies on long runs: replay cost, false switches, detections, latency, rollbacks, final gap.

For each seed and scenario (healthy FP8, the shipped degradations, the injected faults of
docs/precision.md) the real commands run: `shadow train --precision bf16` (the baseline), `shadow train`
in FP8 (unguarded) and `shadow run` under each policy (guarded; every `shadow run` joins one local Ray
head started for the benchmark). The ground truth comes from the `shadow train` runs only, never from
shadow itself:
- the *seed spread* is how far BF16 runs of different seeds (`seed` and `data.seed`) end from each
  other: the largest ratio of their final held-out losses, minus 1;
- a (scenario, seed) is *degraded* when unguarded FP8's final held-out loss is worse than BF16's (same
  seed) by more than the seed spread, *healthy* otherwise.
Per policy, scenario and seed: replay steps per main-job step (replay steps run / main steps trained,
discarded ones included), the main-job steps at which it switched to BF16 (any switch on a healthy run is
a false switch; on a degraded one the first switch judged on a window holding a faulty step is the
detection, one judged on an earlier window is counted apart), the latency (main-job step of the detection
minus the onset; for a drift, the start of its ramp),
the steps discarded by rollbacks and the guarded run's final held-out gap to BF16.
`totals` per policy: replay steps per main step over the healthy scenario's runs, false switches out of
healthy runs, detections out of degraded runs, and the largest excess of its guarded gap over the first
policy's (`fixed.yaml`, the default before issue 18) on the same run, judged against the seed spread (the
goal of issue 18).

    python bench/verification_policies.py [--steps 3000] [--seeds 3] [--spread-seeds 5] [--scenarios ...]
        [--policies NAME=PATH ...] [--model ...] [--parallel 2] [--cache DIR]

A full run takes about two hours on 2 cores. With `--cache DIR` each command's figures are kept in DIR,
keyed by its arguments, the policy in force (not the file's name or comments) and the source of `shadow/`;
a rerun (after an interruption, with one policy edited, or with a policy renamed) runs only the commands
whose key changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import shutil
import signal
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import REPO, print_table, ray_head, run_shadow, switches_to_bf16, write_result

from shadow.config.policy import load_policy

JOB = REPO / "jobs" / "tiny.yaml"
# 2 layers x 64, sequences of 32: ~25 ms per FP8 step on this CPU, so 3000 steps take about 1.5 minutes
SMALL = ["model.num_layers=2", "model.d_model=64", "model.seq_len=32", "batch_size=8"]
# each data seed draws its own held-out batches; 256 of them keep that draw's share of the spread small
EVAL_BATCHES = 256
POLICIES = ["fixed=policies/fixed.yaml", "default=policies/default.yaml",
            "triggered=policies/triggered.yaml"]
GOAL_REPLAY_PER_MAIN = 0.05  # issue 18: replay steps per main step over a long healthy run


def _fault(start: int, end: int, factor: float, *more: str) -> list[str]:
    return [f"precision.fault.start_step={start}", f"precision.fault.end_step={end}",
            f"precision.fault.scale_factor={factor}", *more]


def scenarios(steps: int, seed: int) -> dict[str, tuple[list[str], int | None]]:
    """name -> (job overrides, onset step; None for healthy FP8). Onsets are drawn per seed."""
    rng = random.Random(seed)
    fault_onset = rng.randint(steps // 6, steps * 7 // 12)
    drift_onset = rng.randint(steps // 3, steps // 2)
    grad_onset = rng.randint(steps // 6, steps * 7 // 12)
    # 50 steps from 30 past a multiple of 100: between two windows of the 100-step cadence (and of 200)
    transient_onset = 100 * rng.randint(steps // 400, steps // 200) + 30
    return {
        "healthy": ([], None),  # hybrid FP8 with delayed scaling, as jobs/tiny.yaml
        "noscale": (["precision.scaling=none"], 0),  # jobs/tiny_noscale.yaml: no scaling from step 0
        "fault": (_fault(fault_onset, steps, 1000.0), fault_onset),  # jobs/tiny_fault.yaml's fault, to the end
        "drift": (_fault(drift_onset, steps, 10.0, f"precision.fault.ramp_steps={steps // 3}"), drift_onset),
        "grad": (_fault(grad_onset, steps, 30.0, "precision.fault.roles=[grad_output]"), grad_onset),
        "transient": (_fault(transient_onset, transient_onset + 50, 1000.0), transient_onset),
    }


def _source_digest() -> str:
    """sha256 of what decides a command's figures besides its arguments: shadow's source and the job."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "shadow").rglob("*.py")) + [JOB]:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def policy_in_force(path: Path) -> str:
    """The policy a file puts in force, as text: what a guarded run's cache key holds instead of the
    file's name and comments."""
    return json.dumps(dataclasses.asdict(load_policy(path)), sort_keys=True, default=str)


def cached(cache: Path | None, name: str, key: list, compute):
    """compute(), or its figures from an earlier run of the same command (same name, key and source)."""
    if cache is None:
        return compute()
    path = cache / f"{name}-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]}.json"
    if path.is_file():
        figures = json.loads(path.read_text())
        print(f"{name}: from {path}", flush=True)
        return figures
    figures = compute()
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(figures))
    partial.replace(path)
    return figures


def _train(precision: str, overrides: list[str], out: Path) -> float:
    """Final held-out loss of a `shadow train` run; its directory (checkpoints) is removed after."""
    summary = run_shadow(["train", "--precision", precision], JOB, overrides, out)
    shutil.rmtree(out)
    print(f"{out.name}: final held-out loss {summary['final_eval_loss']:.4f}", flush=True)
    return summary["final_eval_loss"]


def _guarded(policy: str, address: str, env: dict, overrides: list[str], out: Path) -> dict:
    """The figures of a `shadow run` under `policy`, joined to the benchmark's Ray head."""
    summary = run_shadow(["run", "--policy", policy, "--ray-address", address], JOB, overrides, out, env)
    switches = switches_to_bf16(out)
    shutil.rmtree(out)
    print(f"{out.name}: switches to BF16 at {[step for step, _ in switches]}, replay steps "
          f"{sum(summary['replay_steps'].values())}, {summary['wall_s']:.0f} s", flush=True)
    return {"final_eval_loss": summary["final_eval_loss"], "switch_steps": [step for step, _ in switches],
            "switch_windows": [window for _, window in switches],
            "replay_steps": sum(summary["replay_steps"].values()),
            "main_steps": summary["steps_fp8"] + summary["steps_bf16"] + summary["steps_discarded"],
            "steps_discarded": summary["steps_discarded"], "num_verifications": summary["num_verifications"],
            "num_triggered_replays": summary["num_triggered_replays"], "num_fallbacks": summary["num_fallbacks"],
            "wall_s": summary["wall_s"]}


def _policies(entries: list[str], parser) -> tuple[dict[str, str], dict[str, str]]:
    """NAME=PATH entries -> (policies to run, skipped ones with the reason)."""
    chosen, skipped = {}, {}
    for entry in entries:
        name, sep, path = entry.partition("=")
        if not sep or not name or not path or name in chosen or name in skipped:
            parser.error(f"--policies: {entry!r}: expected distinct NAME=PATH entries, e.g. {POLICIES[0]}")
        if (REPO / path).is_file():
            chosen[name] = path
        else:
            skipped[name] = f"{path} not found"
            print(f"skipped policy {name}: {path} not found", flush=True)
    if not chosen:
        parser.error("--policies: none of the policy files exists")
    return chosen, skipped


def _totals(rows: list[dict], reference: dict[tuple, float], spread: float) -> dict:
    healthy_scenario = [r for r in rows if r["scenario"] == "healthy"]
    good = [r for r in rows if not r["degraded"]]
    bad = [r for r in rows if r["degraded"]]
    latencies = [r["latency"] for r in bad if r["detection_step"] is not None]
    replay = sum(r["replay_steps"] for r in healthy_scenario)
    main = sum(r["main_steps"] for r in healthy_scenario)
    over_reference = max(r["guarded_gap"] - reference[(r["scenario"], r["seed"])] for r in rows)
    totals = {
        "replay_steps_per_main_step": replay / main if main else None, "healthy_scenario_runs": len(healthy_scenario),
        "false_switches": sum(r["switched"] for r in good), "healthy_runs": len(good),
        "detected": sum(r["detection_step"] is not None for r in bad), "degraded_runs": len(bad),
        "early_switches": sum(r["early_switch"] for r in bad),  # degraded runs switched on a window before the onset
        "latency_median": statistics.median(latencies) if latencies else None,
        "latency_max": max(latencies) if latencies else None,
        "steps_discarded": sum(r["steps_discarded"] for r in rows),
        "max_gap_over_reference": over_reference,
    }
    totals["meets_goal"] = {
        "replay": totals["replay_steps_per_main_step"] is not None
        and totals["replay_steps_per_main_step"] <= GOAL_REPLAY_PER_MAIN,
        "no_false_switch": totals["false_switches"] == 0,
        "all_detected": totals["detected"] == totals["degraded_runs"],
        "gap": over_reference <= spread,
    }
    return totals


def _run_commands(args, policies: dict[str, str], plan: dict[int, dict]) -> tuple[dict, dict, dict]:
    """Every `shadow` command, `args.parallel` at a time: (BF16's final held-out loss per seed, unguarded
    FP8's per (scenario, seed), the guarded run's figures per (policy, scenario, seed))."""
    base = args.model + [f"steps={args.steps}", f"eval.batches={EVAL_BATCHES}"]

    def seeded(seed: int) -> list[str]:
        return base + [f"seed={seed}", f"data.seed={seed}"]

    train_only = [f"checkpoint.every_steps={args.steps}"]  # no checkpoint of a `shadow train` is read back
    cache = Path(args.cache) if args.cache else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    source = _source_digest()

    def train(name: str, precision: str, overrides: list[str]):
        return pool.submit(cached, cache, name, [precision, overrides, source],
                           lambda: _train(precision, overrides, root / name))

    def guarded_run(policy: str, name: str, seed: int, overrides: list[str]):
        path = policies[policy]
        key = [policy_in_force(REPO / path), seeded(seed) + overrides, source]
        return pool.submit(cached, cache, f"run-{name}-{seed}", key,
                           lambda: _guarded(path, address, env, seeded(seed) + overrides,
                                            root / f"run-{policy}-{name}-{seed}"))

    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.parallel) as pool:
        root = Path(tmp)
        try:
            bf16 = {seed: train(f"bf16-{seed}", "bf16", seeded(seed) + train_only) for seed in range(args.spread_seeds)}
            fp8 = {(name, seed): train(f"fp8-{name}-{seed}", "fp8", seeded(seed) + overrides + train_only)
                   for seed, chosen in plan.items() for name, (overrides, _) in chosen.items()}
            with ray_head(2 * args.parallel, root / "ray-head.log") as (address, env):  # starts while trains run
                guarded = {(policy, name, seed): guarded_run(policy, name, seed, overrides)
                           for policy in policies for seed, chosen in plan.items()
                           for name, (overrides, _) in chosen.items()}
                return ({key: future.result() for key, future in bf16.items()},
                        {key: future.result() for key, future in fp8.items()},
                        {key: future.result() for key, future in guarded.items()})
        except BaseException:  # a command failed: queued ones do not start, running ones are waited for
            pool.shutdown(cancel_futures=True)
            raise


def _row(policy: str, name: str, seed: int, onset: int | None, bf16: float, fp8: float, run: dict,
         spread: float) -> dict:
    """A switch detects the fault when the window it was judged on holds a faulty step (ends after the
    onset); one judged on an earlier window (or any on healthy FP8) cannot."""
    unguarded_gap = fp8 / bf16 - 1
    judged = list(zip(run["switch_steps"], run["switch_windows"]))
    detections = [step for step, window in judged if onset is not None and window and window[1] > onset]
    return {"policy": policy, "scenario": name, "seed": seed, "onset": onset, "bf16_eval": bf16, "fp8_eval": fp8,
            "guarded_eval": run["final_eval_loss"], "unguarded_gap": unguarded_gap,
            "guarded_gap": run["final_eval_loss"] / bf16 - 1, "degraded": unguarded_gap > spread,
            "switched": bool(judged), "detection_step": detections[0] if detections else None,
            "early_switch": onset is not None and len(detections) < len(judged),
            "latency": detections[0] - onset if detections else None,
            "replay_per_main": run["replay_steps"] / run["main_steps"], **run}


def _print_tables(args, rows: list[dict], totals: dict, spread: float, reference_name: str) -> list[dict]:
    table = []
    for policy in totals:
        for name in args.scenarios:
            runs = [r for r in rows if r["policy"] == policy and r["scenario"] == name]
            latencies = [r["latency"] for r in runs if r["degraded"] and r["detection_step"] is not None]
            table.append({
                "policy": policy, "scenario": name, "degraded": f"{sum(r['degraded'] for r in runs)}/{len(runs)}",
                "switched": f"{sum(r['switched'] for r in runs)}/{len(runs)}",
                "latency_max": max(latencies) if latencies else None,
                "discarded": sum(r["steps_discarded"] for r in runs),
                "replay_per_main": sum(r["replay_steps"] for r in runs) / sum(r["main_steps"] for r in runs),
                "unguarded_gap": statistics.median(r["unguarded_gap"] for r in runs) * 100,
                "guarded_gap": statistics.median(r["guarded_gap"] for r in runs) * 100})
    print_table([("policy", "policy", ""), ("scenario", "scenario", ""), ("degraded", "degraded", ""),
                 ("switched", "switched", ""), ("latency_max", "latency max", "g"), ("discarded", "discarded", "d"),
                 ("replay_per_main", "replay/main", ".3f"), ("unguarded_gap", "unguarded gap %", "+.2f"),
                 ("guarded_gap", "guarded gap %", "+.2f")], table,
                title=f"\nVerification policies: {args.seeds} seeds x {len(args.scenarios)} scenarios, {args.steps} "
                      f"steps, model {' '.join(args.model)}; degraded = unguarded FP8 ends > {spread:.2%} (the BF16 "
                      f"seed spread over {args.spread_seeds} seeds) above BF16. Gaps: medians over seeds.")
    print_table([("policy", "policy", ""), ("replay", "replay/main (healthy)", ".4f"), ("false", "false switches", ""),
                 ("detected", "detected", ""), ("latency_max", "latency max", "g"), ("discarded", "discarded", "d"),
                 ("over", f"gap over {reference_name} %", "+.2f"), ("goal", "meets goal", "")],
                [{"policy": policy, "replay": t["replay_steps_per_main_step"],
                  "false": f"{t['false_switches']}/{t['healthy_runs']}",
                  "detected": f"{t['detected']}/{t['degraded_runs']}",
                  "latency_max": t["latency_max"], "discarded": t["steps_discarded"],
                  "over": t["max_gap_over_reference"] * 100, "goal": "yes" if all(t["meets_goal"].values()) else
                  "no: " + ", ".join(k for k, ok in t["meets_goal"].items() if not ok)}
                 for policy, t in totals.items()], title="\nTotals")
    return table


def _stop(signum, _frame):
    """SIGTERM (a `kill` of a background run): unwind, so queued commands are cancelled and the Ray head
    is stopped."""
    raise SystemExit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _stop)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per scenario and policy")
    parser.add_argument("--spread-seeds", type=int, default=5, help="BF16 seeds the spread is measured over "
                        "(at least --seeds: the scenarios' baselines are among them)")
    parser.add_argument("--scenarios", nargs="*", default=list(scenarios(3000, 0)), help="subset (default: all)")
    parser.add_argument("--policies", nargs="*", default=POLICIES, metavar="NAME=PATH",
                        help="policies to compare, the first is the reference (default: %(default)s); "
                        "a missing file is skipped with a message")
    parser.add_argument("--model", nargs="*", default=SMALL, help="model-size overrides (default: %(default)s)")
    parser.add_argument("--parallel", type=int, default=2, help="`shadow` commands at once (a thread each)")
    parser.add_argument("--cache", help="keep each command's figures here and reuse them on a rerun")
    parser.add_argument("--out")
    args = parser.parse_args()
    unknown = set(args.scenarios) - set(scenarios(args.steps, 0))
    if unknown or not args.scenarios:
        parser.error(f"--scenarios: expected some of {', '.join(scenarios(args.steps, 0))}")
    if args.spread_seeds < max(args.seeds, 2):
        parser.error("--spread-seeds: at least 2 and at least --seeds")
    policies, skipped = _policies(args.policies, parser)
    started = time.monotonic()
    plan = {seed: {k: v for k, v in scenarios(args.steps, seed).items() if k in args.scenarios}
            for seed in range(args.seeds)}
    bf16, fp8, guarded = _run_commands(args, policies, plan)
    spread = max(bf16.values()) / min(bf16.values()) - 1
    rows = [_row(policy, name, seed, plan[seed][name][1], bf16[seed], fp8[(name, seed)], run, spread)
            for (policy, name, seed), run in guarded.items()]
    reference_name = next(iter(policies))
    reference = {(r["scenario"], r["seed"]): r["guarded_gap"] for r in rows if r["policy"] == reference_name}
    totals = {policy: _totals([r for r in rows if r["policy"] == policy], reference, spread) for policy in policies}
    table = _print_tables(args, rows, totals, spread, reference_name)
    write_result("verification_policies", {
        "steps": args.steps, "seeds": args.seeds, "spread_seeds": args.spread_seeds, "model": args.model,
        "eval_batches": EVAL_BATCHES, "scenarios": args.scenarios, "policies": policies, "skipped_policies": skipped,
        "reference_policy": reference_name, "goal_replay_per_main": GOAL_REPLAY_PER_MAIN,
        "bf16_eval": {str(seed): loss for seed, loss in bf16.items()}, "seed_spread": spread,
        "totals": totals, "table": table, "rows": rows, "wall_s": time.monotonic() - started}, args.out)


if __name__ == "__main__":
    main()
