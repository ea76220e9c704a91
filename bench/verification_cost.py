"""Cost of verification: replay steps per main step for each shipped policy, and what it leaves of FP8's speedup.

Each policy in `policies/` guards a healthy FP8 run (`shadow run`, the tiny job's data and schedule,
small model by default); from its summary come the replay steps (BF16 verification, FP8 probes, noise
windows) per main-job step, and the effective speedup of `shadow/controller/summary.py` is evaluated
with FP8 step speedups of 1.2x, 1.3x and 1.5x (the range published for Hopper):
    wall    = kept steps / (fp8 steps / s + bf16 steps)                 replays on their own resources
    compute = kept steps / (main cost + bf16 replay steps + fp8 replay steps / s)   accelerator-hours
The nominal cost `window_steps / every_n_steps` is shown beside the measured one (the last spans of a
run get no window when it would reach past the end); replays started by telemetry triggers (policies
with `triggers.rules`, e.g. policies/triggered.yaml) are counted in the measured cost and shown apart.
"switches when" shows |metric| for two-sided thresholds. A ratio of counts, not of times; but which
windows run depends on timing: a replay slower than the main job (a loaded machine) makes the scheduler
skip the spans it fell behind on, which lowers the measured cost below the nominal one.

    python bench/verification_cost.py [--steps 300] [--policies policies/*.yaml]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import FAST, REPO, print_table, run_shadow, write_result

from shadow.config.policy import load_policy
from shadow.controller.summary import effective_speedup

SPEEDUPS = (1.2, 1.3, 1.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--policies", nargs="*", default=sorted(str(p.relative_to(REPO))
                                                                for p in (REPO / "policies").glob("*.yaml")))
    parser.add_argument("--model", nargs="*", default=FAST, help="model-size overrides (default: %(default)s)")
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = [{"policy": "unguarded FP8", "replay_per_main": 0.0,
             **{f"wall_{s}": s for s in SPEEDUPS}, **{f"compute_{s}": s for s in SPEEDUPS}}]
    with tempfile.TemporaryDirectory() as tmp:
        for index, path in enumerate(args.policies):
            policy = load_policy(str(REPO / path), [])
            summary = run_shadow(["run", "--policy", path], REPO / "jobs/tiny.yaml", args.model + [f"steps={args.steps}"],
                                 Path(tmp) / str(index))
            replay = summary["replay_steps"]
            trained = summary["steps_fp8"] + summary["steps_bf16"] + summary["steps_discarded"]
            fp8_trained = summary["steps_fp8"]  # healthy run: no switch, every kept step is FP8
            assert summary["num_precision_switches"] == 0, f"{path}: the healthy run switched; the cost would include it"
            speeds = {s: effective_speedup(kept_steps=summary["final_step"], trained_fp8=fp8_trained,
                                           trained_bf16=trained - fp8_trained, replay_bf16=replay.get("bf16", 0),
                                           replay_fp8=replay.get("fp8", 0), fp8_speedup=s) for s in SPEEDUPS}
            verify, thresholds = policy.verify, policy.thresholds
            metric = policy.compare.metric.value
            rows.append({
                "policy": Path(path).stem, "every": verify.every_n_steps, "window": verify.window_steps,
                "judges": f"{f'|{metric}|' if thresholds.two_sided else metric} > {thresholds.switch:g} "
                          f"x{thresholds.consecutive}",
                "trigger_rules": len(policy.triggers.rules),
                "num_triggered_replays": summary["num_triggered_replays"],
                "action": policy.action.mode.value if policy.action.mode.value == "observe" else policy.action.on_switch.value,
                "latency_bound": verify.every_n_steps * thresholds.consecutive + verify.window_steps,
                "nominal": verify.window_steps / verify.every_n_steps, "replay_per_main": summary["verification_cost"],
                "replay_steps": replay, "main_steps": trained, "num_verifications": summary["num_verifications"],
                "num_noise_windows": summary["num_noise_windows"],
                **{f"wall_{s}": speeds[s]["wall"] for s in SPEEDUPS},
                **{f"compute_{s}": speeds[s]["compute"] for s in SPEEDUPS}})
            print(f"ran {path}", flush=True)
    print_table([("policy", "policy", ""), ("every", "every", "d"), ("window", "W", "d"), ("judges", "switches when", ""),
                 ("action", "action", ""), ("latency_bound", "detects within", "d"), ("trigger_rules", "triggers", "d"),
                 ("num_triggered_replays", "triggered", "d"), ("nominal", "W/every", ".2f"),
                 ("replay_per_main", "replay/main", ".2f"),
                 *[(f"wall_{s}", f"wall@{s}x", ".2f") for s in SPEEDUPS],
                 *[(f"compute_{s}", f"compute@{s}x", ".2f") for s in SPEEDUPS]], rows,
                title=f"\nCost of verification: healthy FP8 runs of {args.steps} steps ({' '.join(args.model)}); "
                      f"speedups over an all-BF16 run for FP8 = 1.2x/1.3x/1.5x BF16 per step")
    write_result("verification_cost", {"steps": args.steps, "model": args.model, "speedups": SPEEDUPS, "rows": rows},
                 args.out)


if __name__ == "__main__":
    main()
