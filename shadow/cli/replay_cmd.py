"""`shadow replay`: load a checkpoint and re-train the next W steps on the same batches."""

from __future__ import annotations

import argparse
import sys
import time

from shadow.cli.common import add_job_args, check_memory_plan, default_out_dir, load_job_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser("replay", help="re-train a window from a checkpoint in a chosen precision",
                                   description=__doc__)
    add_job_args(parser)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory <root>/<run>/step-NNNNNNNNN")
    parser.add_argument("--steps", type=int, required=True, help="window length W: steps to replay")
    parser.add_argument("--precision", choices=["fp8", "bf16"], help="default: the checkpoint's precision")
    parser.add_argument("--out", help="run directory (default: runs/<job>-replay-<time>)")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="replay even if the checkpoint's weights or optimizer state hold NaN or Inf "
                        "(refused by default, naming the tensor and file), e.g. to reproduce a divergence")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shadow.checkpoint import CheckpointError, locate_checkpoint
    from shadow.launch import RankFailed, run_ranks

    job = load_job_from_args(args)
    if args.steps < 1:
        print("--steps: expected a positive window length", file=sys.stderr)
        return 2
    try:
        store, step = locate_checkpoint(args.checkpoint)
    except CheckpointError as exc:
        print(f"cannot replay: {exc}", file=sys.stderr)
        return 2
    # A step's batch is cut into the checkpoint's micro-batches whatever the number of ranks replaying it.
    # A checkpoint that cannot even say how many is refused by the ranks' full check, with its reason.
    num_ranks = job.resources.num_ranks
    num_micro_batches = _num_micro_batches(store, step) or num_ranks * job.resources.grad_accum
    if num_micro_batches % num_ranks:
        print(f"cannot replay: resources.num_ranks={num_ranks} cannot share the checkpoint's {num_micro_batches} "
              "micro-batches evenly; use a divisor of it", file=sys.stderr)
        return 2
    job.resources.grad_accum = num_micro_batches // num_ranks
    if not check_memory_plan(job, num_ranks, num_micro_batches, "replay"):
        return 2
    out = args.out or str(default_out_dir("replay", job))
    try:
        return run_ranks(num_ranks, num_micro_batches, _replay, job, args.checkpoint, args.steps, args.precision,
                         args.allow_nonfinite, out)
    except RankFailed as exc:
        print(f"replay failed: {exc}", file=sys.stderr)
        return 1


def _num_micro_batches(store, step: int) -> int | None:
    from shadow.checkpoint import CheckpointError

    try:
        return store.open(step).meta.get("num_micro_batches")
    except CheckpointError:
        return None


def _replay(layout, job, checkpoint_uri: str, num_steps: int, precision: str | None, allow_nonfinite: bool,
            out: str) -> int:
    """One rank of `shadow replay`; rank 0 writes the run directory."""
    # torch is imported here, not at module level, so `shadow policy check` starts fast
    from shadow.checkpoint import CheckpointError, NonFiniteCheckpoint, locate_checkpoint
    from shadow.cli.progress import Progress
    from shadow.loop import LoopSettings, run_steps
    from shadow.rundir import RunDir
    from shadow.trainer import Trainer

    leader = layout.rank == 0
    trainer = Trainer(job, layout)
    try:
        store, step = locate_checkpoint(checkpoint_uri)
        trainer.load_checkpoint(store.open(step, expected_job_hash=trainer.job_hash, layout=trainer.checkpoint_layout,
                                           allow_nonfinite=allow_nonfinite))
    except NonFiniteCheckpoint as exc:
        if leader:
            print(f"cannot replay: {exc} (--allow-nonfinite replays it anyway)", file=sys.stderr)
        return 2
    except CheckpointError as exc:
        if leader:
            print(f"cannot replay: {exc}", file=sys.stderr)
        return 2
    if precision:
        trainer.set_precision(precision)
    until_step = min(step + num_steps, job.steps)
    run_dir = RunDir(out) if leader else None
    progress = Progress(step, until_step, f"replay {trainer.precision.value} @ {step}") if leader else None
    started = time.perf_counter()

    def on_record(record):
        if leader:
            run_dir.append_record(record)
            progress.update(record)

    settings = LoopSettings(until_step=until_step, eval_at_end=True, eval_batches=job.eval.batches)
    records = run_steps(trainer, settings, on_record=on_record).records
    if not leader:
        return 0
    summary = {
        "job": job.name,
        "job_hash": trainer.job_hash,
        "checkpoint": store.step_uri(step),
        "precision": trainer.precision.value,
        "num_ranks": layout.world_size,
        "window_start": step,
        "num_steps": len(records),
        "final_loss": records[-1].loss if records else None,
        "final_eval_loss": records[-1].eval_loss if records else None,
        "wall_s": time.perf_counter() - started,
    }
    run_dir.write_summary(summary)
    run_dir.close()
    print(f"replayed steps [{step}, {until_step}) in {trainer.precision.value} -> {run_dir.path}")
    return 0
