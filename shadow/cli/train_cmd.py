"""`shadow train`: train a job in one precision, writing trajectory, checkpoints and a summary."""

from __future__ import annotations

import argparse
import sys
import time

from shadow.cli.common import add_job_args, default_out_dir, load_job_from_args


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
    # torch is imported here, not at module level, so `shadow policy check` starts fast
    from shadow.checkpoint import AsyncPersister, CheckpointError, CheckpointFailed, CommitInfo, open_store
    from shadow.cli.progress import Progress
    from shadow.controller.summary import checkpoint_waits
    from shadow.loop import LoopSettings, run_steps
    from shadow.rundir import RunDir
    from shadow.trainer import Trainer

    job = load_job_from_args(args)
    if args.precision:
        job.precision.mode = type(job.precision.mode)(args.precision)
    if args.steps is not None and args.steps < 1:
        print("--steps: expected a positive number of steps", file=sys.stderr)
        return 2
    until_step = job.steps if args.steps is None else min(args.steps, job.steps)
    run_dir = RunDir(args.out or default_out_dir("train", job))
    try:
        store = open_store(job.checkpoint.uri or str(run_dir.path / "checkpoints"), run_dir.name,
                           keep_last=job.checkpoint.keep)
        store.check()
    except CheckpointError as exc:
        print(f"cannot train: {exc}", file=sys.stderr)
        return 2
    trainer = Trainer(job)
    progress = Progress(0, until_step, f"train {job.precision.mode.value}")
    started = time.perf_counter()

    def on_record(record):
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
        run_dir.sync()
        if isinstance(event, CheckpointFailed):
            print(f"checkpoint failed: {event.error}", file=sys.stderr)

    # checkpoints are written in the background; the loop blocks only for the CPU snapshot
    persister = AsyncPersister(store)
    result = run_steps(trainer, settings, on_record=on_record, on_checkpoint=on_checkpoint, persister=persister)
    late_events = persister.close()
    for event in late_events:
        on_checkpoint(event)
    events = result.checkpoint_events + late_events
    wall_s = time.perf_counter() - started
    records = result.records
    summary = {
        "job": job.name,
        "job_hash": trainer.job_hash,
        "precision": job.precision.mode.value,
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
    return 1 if any(isinstance(e, CheckpointFailed) for e in events) else 0
