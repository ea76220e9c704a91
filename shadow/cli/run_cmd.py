"""`shadow run`: the FP8 main job under BF16 verification, on a local Ray or a Ray cluster.

With no arguments it runs jobs/tiny.yaml under policies/default.yaml on a local Ray with local
checkpoints. Inside `ray job submit` (RAY_ADDRESS set) or with --ray-address it joins that cluster.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from shadow.cli.common import add_job_args, load_job_from_args, repo_file

DEFAULT_POLICY = "policies/default.yaml"


def register(subparsers) -> None:
    parser = subparsers.add_parser("run", help="run the FP8 main job with BF16 shadow verification (Ray)",
                                   description=__doc__)
    add_job_args(parser)
    parser.add_argument("--policy", default=None, help="policy YAML, re-read during the run "
                        f"(default: {DEFAULT_POLICY}; with --resume, the policy file the run last (re)started with)")
    parser.add_argument("--policy-set", dest="policy_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a policy setting (kept on every reload)")
    parser.add_argument("--out", help="run directory (default: runs/<job>-<time>)")
    parser.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR after its driver died")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else a sqlite "
                        "store in the run directory)")
    parser.add_argument("--experiment", help="MLflow experiment (default: the job's name)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Heavy imports (torch, ray) happen here so other subcommands start fast.
    import ray

    from shadow.checkpoint import CheckpointError
    from shadow.cli.run_console import ConsoleProgress
    from shadow.config import load_job, to_yaml
    from shadow.config.policy import load_policy
    from shadow.config.policy_watch import PolicyWatcher
    from shadow.controller.callbacks import RunDirWriter
    from shadow.controller.controller import Controller
    from shadow.controller.resume import ResumeError, load_resume_point
    from shadow.controller.summary import format_summary
    from shadow.rundir import RunDir, read_events
    from shadow.tracking.tracker import MlflowTracker
    from shadow.trainer import job_hash

    resume = None
    if args.resume:
        run_dir = RunDir(args.resume)
        started = [e for e in read_events(run_dir.path) if e["event"] == "run_started"]
        if not started or not (run_dir.path / "job.yaml").exists():
            print(f"--resume: {run_dir.path} is not a shadow run directory (no run_started event or job.yaml)",
                  file=sys.stderr)
            return 2
        job = load_job(str(run_dir.path / "job.yaml"))
        # the policy in force when the driver died: the one the latest (re)start was given
        policy_path = started[-1]["policy_path"] if args.policy is None else repo_file(args.policy)
        store_uri = started[0]["store_uri"]
    else:
        job = load_job_from_args(args)
        policy_path = repo_file(args.policy or DEFAULT_POLICY)
        run_dir = RunDir(args.out or Path("runs") / f"{job.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        store_uri = job.checkpoint.uri or str(run_dir.path.absolute() / "checkpoints")
    policy = load_policy(policy_path, args.policy_overrides)
    if args.resume:
        try:
            resume = load_resume_point(run_dir.path, run_dir.name, store_uri, job_hash(job), _layout_here(job))
        except (ResumeError, CheckpointError) as exc:  # CheckpointError: the store cannot be reached or used
            print(f"--resume: {exc}", file=sys.stderr)
            return 2
    else:
        (run_dir.path / "job.yaml").write_text(to_yaml(job))

    started_ray = not ray.is_initialized()
    if started_ray:
        if args.ray_address or _in_cluster():
            ray.init(address=args.ray_address, configure_logging=False, log_to_driver=False)
        else:  # "local": a fresh Ray of our own, never some other cluster that happens to run here
            ray.init(address="local", num_cpus=_local_cpus(job, policy), include_dashboard=False,
                     configure_logging=False, log_to_driver=False)
    watcher = PolicyWatcher(policy_path, policy, args.policy_overrides)
    # after RunDirWriter: the tracker uploads files that writer has just written
    tracker = MlflowTracker(run_dir.path, experiment=args.experiment or job.name, tracking_uri=args.tracking_uri,
                            resumed=resume is not None)
    controller = Controller(job=job, policy=policy, watcher=watcher, run=run_dir.name, store_uri=store_uri,
                            callbacks=[RunDirWriter(run_dir), ConsoleProgress(job.steps), tracker], resume=resume)
    tracker.bind(controller.emit)
    controller.emit("run_started", job=job.name, run=run_dir.name, policy_path=str(policy_path),
                    store_uri=store_uri, precision=job.precision.mode.value, resumed=resume is not None)
    received: list[int] = []
    previous = {sig: signal.signal(sig, _stop_handler(controller, received)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        summary = controller.run()
    except KeyboardInterrupt:  # a second signal while stopping
        print(f"shadow run stopped at once (second signal)\nrun directory: {run_dir.path}", file=sys.stderr)
        return 128 + received[0]
    except Exception as exc:  # the controller has recorded the failure; say it in one line
        print(f"shadow run failed: {exc}\nrun directory: {run_dir.path}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if started_ray:
            ray.shutdown()
    print(format_summary(summary))
    print(f"run directory: {run_dir.path}")
    if received:
        return 128 + received[0]  # the shell convention for "ended by this signal" (130 SIGINT, 143 SIGTERM)
    return 0 if summary["phase"] == "finished" else 1


def _layout_here(job):
    """The layout resume checks checkpoints against; None where the job's precision backend cannot be built
    on this driver (TE without a GPU): the main trainer then checks the checkpoint against its own model."""
    from shadow.layout import expected_layout
    from shadow.precision import BackendUnavailable

    try:
        return expected_layout(job)
    except BackendUnavailable:
        return None


def _stop_handler(controller, received: list[int]):
    """First signal: stop after the running chunk with a final checkpoint. Second: stop at once."""
    def handler(signum, _frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        controller.stop_requested = f"received {signal.Signals(signum).name}"
    return handler


def _in_cluster() -> bool:
    import os

    return bool(os.environ.get("RAY_ADDRESS"))


def _local_cpus(job, policy) -> int:
    """Logical CPUs for a local Ray: every main rank plus every concurrent replay's ranks, even when the
    machine has fewer cores (the ranks then share them; each still runs its fixed thread count)."""
    import math
    import os

    replay = policy.verify.replay_resources
    needed = job.resources.num_ranks * job.resources.cpus_per_rank + policy.verify.max_concurrent_replays * (
        replay.num_ranks * math.ceil(replay.num_cpus))
    return max(needed, os.cpu_count() or 1)
