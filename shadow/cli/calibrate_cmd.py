"""`shadow calibrate`: measure the noise floor of a window and write suggested thresholds into a policy."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from shadow.cli.common import add_job_args, load_job_from_args, repo_file

DEFAULT_POLICY = "policies/default.yaml"


def register(subparsers) -> None:
    parser = subparsers.add_parser("calibrate", help="measure the noise floor and suggest policy thresholds",
                                   description=__doc__)
    add_job_args(parser, job_required=True)
    parser.add_argument("--policy", default=DEFAULT_POLICY, help="base policy: its metric, and every field the "
                        "calibration does not set (default: %(default)s)")
    parser.add_argument("--start-step", type=int, default=100, help="first step of the window (default: %(default)s)")
    parser.add_argument("--window", type=int, help="window length W (default: the policy's verify.window_steps)")
    parser.add_argument("--repeats", type=int, default=2, help="same-precision replays of the window (default: 2)")
    parser.add_argument("--seeds", default="", help="comma-separated model-init seeds compared with the job's, "
                        "used when the repeats are bit-exact (CPU), e.g. 1,2,3")
    parser.add_argument("--multiplier", type=float, default=3.0, help="switch = multiplier x floor, at least 1 "
                        "(default: 3)")
    parser.add_argument("--out", required=True, help="policy YAML to write (the measurements in its header)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shadow.calibrate import calibrate
    from shadow.config.loader import to_yaml
    from shadow.config.policy import load_policy

    job = load_job_from_args(args)
    policy = load_policy(repo_file(args.policy))
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        print(f"--seeds: expected comma-separated integers, got {args.seeds!r}", file=sys.stderr)
        return 2
    if args.repeats < 1 or args.start_step < 0 or not args.multiplier >= 1:
        print("--repeats must be >= 1, --start-step >= 0 and --multiplier >= 1 (switch >= warn)", file=sys.stderr)
        return 2
    window = args.window or policy.verify.window_steps
    try:
        result = calibrate(job, policy, start_step=args.start_step, window_steps=window, repeats=args.repeats,
                           seeds=seeds, multiplier=args.multiplier)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(result.table())
    suggested = replace(policy, thresholds=result.thresholds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sets = "".join(f" --set {o}" for o in args.overrides)
    header = [f"# Written by `shadow calibrate --job {args.job}{sets}` from {args.policy}.",
              f"# Window [{result.start_step}, {result.start_step + result.window_steps}) in {result.precision}, "
              f"metric {result.metric}: noise floor {result.floor:.6g} from {result.source}",
              f"# (repeats: {[round(g, 8) for g in result.repeat_gaps]}, "
              f"seeds: {({s: round(g, 8) for s, g in result.seed_gaps.items()})}); {result.note}."]
    out.write_text("\n".join(header) + "\n" + to_yaml(suggested))
    print(f"-> {out}")
    return 0
