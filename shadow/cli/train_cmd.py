"""`shadow train`: train a job in one precision, writing trajectory, checkpoints and a summary.

With `resources.num_ranks` > 1 the job runs on that many local processes (FSDP2, sharded checkpoints);
rank 0 writes the run directory and prints.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from shadow.cli.common import add_job_args, check_memory_plan, default_out_dir, load_job_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a job in one precision (no verification)",
                                   description=__doc__)
    add_job_args(parser)
    parser.add_argument("--precision", choices=["fp8", "bf16"], help="overrides precision.mode")
    parser.add_argument("--steps", type=int, help="steps to run now (default: the job's steps); "
                        "the LR schedule always follows the job's `steps`")
    parser.add_argument("--out", help="run directory (default: runs/<job>-train-<time>)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shadow.launch import RankFailed, run_ranks

    job = load_job_from_args(args)
    if args.precision:
        job.precision.mode = type(job.precision.mode)(args.precision)
    if args.steps is not None and args.steps < 1:
        print("--steps: expected a positive number of steps", file=sys.stderr)
        return 2
    out = args.out or str(default_out_dir("train", job))
    resources = job.resources
    if not check_memory_plan(job, resources.num_ranks, resources.num_ranks * resources.grad_accum, "train"):
        return 2
    try:
        return run_ranks(resources.num_ranks, resources.num_ranks * resources.grad_accum, _train, job, args.steps, out)
    except RankFailed as exc:
        print(f"train failed: {exc}", file=sys.stderr)
        return 1


def _train(layout, job, steps: int | None, out: str) -> int:
    """One rank of `shadow train`; rank 0 writes the run directory."""
    # torch is imported here, not at module level, so `shadow policy check` starts fast
    from shadow.checkpoint import AsyncPersister, CheckpointError, CheckpointFailed, CommitInfo, open_store
    from shadow.cli.progress import Progress
    from shadow.controller.summary import checkpoint_waits
    from shadow.loop import LoopSettings, run_steps
    from shadow.rundir import RunDir
    from shadow.trainer import Trainer

    leader = layout.rank == 0
    until_step = job.steps if steps is None else min(steps, job.steps)
    out_path = Path(out)
    try:
        store = open_store(job.checkpoint.uri or str(out_path / "checkpoints"), out_path.name,
                           keep_last=job.checkpoint.keep)
        if leader:
            store.check()
    except CheckpointError as exc:
        print(f"cannot train: {exc}", file=sys.stderr)
        return 2
    trainer = Trainer(job, layout)
    if leader:
        print(trainer.fp8_selection.describe())
    run_dir = RunDir(out_path) if leader else None
    progress = Progress(0, until_step, f"train {job.precision.mode.value}") if leader else None
    started = time.perf_counter()

    def on_record(record):
        if leader:
            run_dir.append_record(record)
            progress.update(record)

    settings = LoopSettings(
        until_step=until_step,
        checkpoint_every=job.checkpoint.every_steps,
        checkpoint_at_start=True,
        checkpoint_at_end=True,
        eval_every=job.eval.every_steps,
        eval_at_end=True,
        eval_batches=job.eval.batches,
    )

    def on_checkpoint(event):
        if not leader:
            return
        run_dir.sync()
        if isinstance(event, CheckpointFailed):
            print(f"checkpoint failed: {event.error}", file=sys.stderr)

    # checkpoints are written in the background; the loop blocks only for the staging copy
    persister = AsyncPersister(store, trainer.checkpoint_group, leader=leader)
    result = run_steps(trainer, settings, on_record=on_record, on_checkpoint=on_checkpoint, persister=persister)
    late_events = persister.close()
    for event in late_events:
        on_checkpoint(event)
    events = result.checkpoint_events + late_events
    failed = any(isinstance(e, CheckpointFailed) for e in events)
    if not leader:
        return 1 if failed else 0
    wall_s = time.perf_counter() - started
    records = result.records
    summary = {
        "job": job.name,
        "job_hash": trainer.job_hash,
        "precision": job.precision.mode.value,
        "num_ranks": layout.world_size,
        "final_step": trainer.step,
        "final_loss": records[-1].loss,
        "final_eval_loss": records[-1].eval_loss,
        "num_steps": len(records),
        "tokens": sum(r.tokens for r in records),
        "mean_step_time_s": sum(r.step_time_s for r in records) / len(records),
        "wall_s": wall_s,
        "checkpoints": [e.uri for e in events if isinstance(e, CommitInfo)],
        "max_checkpoint_block_s": max(result.checkpoint_block_s, default=0.0),
        "checkpoint_waits": checkpoint_waits([e.wait_s for e in events if isinstance(e, CommitInfo)]),
    }
    run_dir.write_summary(summary)
    run_dir.close()
    print(f"final step {trainer.step}  loss {summary['final_loss']:.4f}  "
          f"held-out {summary['final_eval_loss']:.4f}  wall {wall_s:.1f}s  -> {run_dir.path}")
    return 1 if failed else 0
