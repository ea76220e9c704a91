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


def load_job_from_args(args: argparse.Namespace) -> JobConfig:
    job_path = args.job
    if job_path == DEFAULT_JOB and not Path(job_path).exists():
        job_path = str(Path(__file__).resolve().parents[2] / DEFAULT_JOB)
    return load_job(job_path, args.overrides)


def default_out_dir(kind: str, job: JobConfig) -> Path:
    return Path("runs") / f"{job.name}-{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
