"""Arguments and helpers shared by several subcommands."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from shadow.config import JobConfig, load_job

DEFAULT_JOB = "jobs/tiny.yaml"


def add_job_args(parser: argparse.ArgumentParser, job_required: bool = False) -> None:
    parser.add_argument("--job", required=job_required, default=None if job_required else DEFAULT_JOB,
                        help="job YAML (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a job setting, e.g. --set optim.lr=1e-3 (repeatable)")


def repo_file(path: str) -> str:
    """A default like `jobs/tiny.yaml` resolves against the shadow checkout when not found in the cwd."""
    if Path(path).exists() or Path(path).is_absolute():
        return path
    shipped = Path(__file__).resolve().parents[2] / path
    return str(shipped) if shipped.exists() else path


def load_job_from_args(args: argparse.Namespace) -> JobConfig:
    return load_job(repo_file(args.job), args.overrides)


def default_out_dir(kind: str, job: JobConfig) -> Path:
    return Path("runs") / f"{job.name}-{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_memory_plan(job: JobConfig, num_ranks: int, num_micro_batches: int, verb: str) -> bool:
    """Print the per-rank memory plan; False (after saying why) when it cannot fit the device."""
    import sys

    from shadow.memory_plan import MemoryPlanError, device_capacity, plan_memory
    from shadow.trainer import resolve_device

    device = resolve_device(job.resources.device)
    plan = plan_memory(job, num_ranks, num_micro_batches, device)
    print(plan.describe())
    try:
        plan.check(*device_capacity(device, ranks_on_host=num_ranks))
    except MemoryPlanError as exc:
        print(f"cannot {verb}: {exc}", file=sys.stderr)
        return False
    return True
