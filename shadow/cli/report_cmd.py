"""`shadow report RUN_DIR`: the run as a PNG (loss curves, replays, precision bands, verdicts) and
tables of verifications and decisions; logged to the run's MLflow parent run when it has one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("report", help="plot and tabulate a run directory (PNG + tables)",
                                   description=__doc__)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a `shadow run` output directory")
    parser.add_argument("--out", metavar="FILE.png", help="where to write the plot (default: RUN_DIR/report.png)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI, if the run's own (mlflow.json) is not "
                        "reachable as stored, e.g. because it held credentials")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shadow.report import format_tables, load_report, render_png

    run_dir = Path(args.run_dir)
    try:
        report = load_report(run_dir)
    except FileNotFoundError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    out = render_png(run_dir, Path(args.out) if args.out else run_dir / "report.png", report)
    print(format_tables(report))
    print(f"\nplot: {out}")
    if (run_dir / "mlflow.json").exists():
        from shadow.tracking.backfill import send_to_attached_run

        print(send_to_attached_run(run_dir, [out], args.tracking_uri))
    return 0
