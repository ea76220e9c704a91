"""`shadow compare MAIN_TRAJ REPLAY_TRAJ [--policy FILE]`: the verdict for one window, and what the
policy would decide about it from a fresh state (FP8 for a verification pair, BF16 fallback for a
probe), so a user can see what a policy does with a given pair of trajectories."""

from __future__ import annotations

import argparse
import math
import sys

from shadow.compare import Verdict, compare
from shadow.config.policy import load_policy
from shadow.jsonl import read_jsonl
from shadow.policy import Machine, PolicyState, Purpose, decide, purpose_of
from shadow.records import StepRecord


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare", help="compare a main trajectory with a replay's",
        description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("main", metavar="MAIN_TRAJ", help="trajectory.jsonl of the main job (whole run or window)")
    parser.add_argument("replay", metavar="REPLAY_TRAJ", help="trajectory.jsonl of a replay; its steps are the window")
    parser.add_argument("--policy", metavar="FILE", help="policy YAML (default: the built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a policy field (repeatable)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    policy = load_policy(args.policy, args.overrides)
    try:
        main_records = _read_trajectory(args.main)
        replay_records = _read_trajectory(args.replay)
    except ValueError as exc:
        print(f"shadow compare: {exc}", file=sys.stderr)
        return 2
    if not replay_records:
        print(f"shadow compare: {args.replay}: no step records: nothing to compare", file=sys.stderr)
        return 2
    verdict = compare(main_records, replay_records, ignore_first_steps=policy.compare.ignore_first_steps,
                      end_fraction=policy.compare.end_fraction)
    print(_describe(verdict))
    state = PolicyState(machine=Machine.BF16_FALLBACK if purpose_of(verdict) is Purpose.PROBE else Machine.FP8,
                        noise_floor=0.0 if policy.noise.enabled else None)
    main_step = max(r.step for r in main_records) if main_records else verdict.window_end
    outcome = decide(policy, state, verdict, main_step=main_step)
    print(f"policy {args.policy or '(defaults)'}: from state {state.machine.value}"
          + (" (noise floor taken as 0)" if policy.noise.enabled else ""))
    for decision in outcome.decisions:
        print(f"  {decision.kind.value.upper()}: {decision.reason}")
    print(f"  next state: {outcome.state.machine.value}")
    return 0


def _read_trajectory(path: str) -> list[StepRecord]:
    """Rows of a trajectory file; a message naming the file and line for anything unreadable."""
    try:
        rows = list(read_jsonl(path))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 JSON-lines file") from None
    records = []
    for number, row in enumerate(rows, start=1):
        try:
            records.append(_record(row))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: record {number} is not a step record ({exc})") from None
    return records


def _record(row) -> StepRecord:
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    record = StepRecord.from_dict(row)
    if not isinstance(record.step, int) or isinstance(record.step, bool):
        raise ValueError(f"step {record.step!r} is not an integer")
    if not isinstance(record.loss, (int, float)) or isinstance(record.loss, bool):
        raise ValueError(f"loss {record.loss!r} is not a number")
    if record.precision not in ("fp8", "bf16"):
        raise ValueError(f"precision {record.precision!r} is not 'fp8' or 'bf16'")
    return record


def _describe(verdict: Verdict) -> str:
    lines = [f"verdict: {verdict.kind.value}, window [{verdict.window_start}, {verdict.window_end}), "
             f"{len(verdict.steps)} paired steps, main {verdict.main_precision} vs replay {verdict.replay_precision}"
             + (f", FP8 side: {verdict.fp8_side} (gaps: positive = FP8 worse)" if verdict.fp8_side else
                " (gaps: main - replay)")]
    for label, steps in (("steps missing in main", verdict.missing_in_main),
                         ("steps missing in replay", verdict.missing_in_replay),
                         ("non-finite main loss at steps", verdict.nonfinite_main),
                         ("non-finite replay loss at steps", verdict.nonfinite_replay)):
        if steps:
            lines.append(f"  {label}: {_ranges(steps)}")
    for name in ("mean_gap", "rel_mean_gap", "end_gap", "rel_end_gap", "max_abs_gap", "slope", "t_stat",
                 "eval_gap", "rel_eval_gap"):
        value = verdict.metric(name)
        shown = "n/a" if value is None else (f"{value:+.6g}" if math.isfinite(value) else str(value))
        lines.append(f"  {name:<13} {shown}")
    return "\n".join(lines)


def _ranges(steps) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    spans, start, prev = [], steps[0], steps[0]
    for s in list(steps[1:]) + [None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        spans.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = s
    return ", ".join(spans)
