"""`shadow sweep`: short trainings in several number formats and learning rates, each against BF16;
a table and a heatmap of the final-loss gap, to pick a format and learning rate before a long run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shadow.cli.common import add_job_args, default_out_dir, load_job_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser("sweep", help="final-loss gap vs BF16 across number formats and learning rates",
                                   description=__doc__)
    add_job_args(parser, job_required=True)
    parser.add_argument("--formats", default="e4m3,e5m2,e8m3,e8m5", help="comma-separated eXmY formats "
                        "(default: %(default)s)")
    parser.add_argument("--lr-scale", default="1,10", help="comma-separated factors on optim.lr and optim.min_lr "
                        "(default: %(default)s)")
    parser.add_argument("--fp8-layers", action="append", default=[], metavar="SELECTION",
                        help="try each format with this FP8 layer selection (repeatable): all, auto, or a YAML "
                        "mapping of precision.fp8_layers fields, e.g. '{bf16_first_layers: 1}' (default: the job's)")
    parser.add_argument("--seeds", default="0", help="comma-separated model-init seeds (default: %(default)s)")
    parser.add_argument("--steps", type=int, help="steps per training (default: the job's steps)")
    parser.add_argument("--out", help="output directory (default: runs/<job>-sweep-<time>)")
    parser.set_defaults(func=run)


def _list(text: str, kind, name: str):
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise ValueError(f"--{name}: expected a comma-separated list, got {text!r}")
    return values


def run(args: argparse.Namespace) -> int:
    from shadow.config.job import FORMAT_PATTERN
    from shadow.sweep import as_rows, heatmap, parse_selection, sweep, table

    overrides = list(args.overrides) + ([f"steps={args.steps}"] if args.steps is not None else [])
    args.overrides = overrides
    job = load_job_from_args(args)
    try:
        formats = _list(args.formats, str, "formats")
        scales = _list(args.lr_scale, float, "lr-scale")
        seeds = _list(args.seeds, int, "seeds")
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    bad = [f for f in formats if f not in ("e4m3", "e5m2") and not FORMAT_PATTERN.match(f)]
    if bad or any(s <= 0 for s in scales):
        print(f"--formats: eXmY with 1<=X<=8, 0<=Y<=22 (bad: {bad}); --lr-scale: positive factors", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else default_out_dir("sweep", job)
    out.mkdir(parents=True, exist_ok=True)

    def progress(r):
        gap = "" if r.rel_gap is None else f"  gap {100 * r.rel_gap:+.2f}%"
        label = f"{r.format} [{r.fp8_layers}]" if r.fp8_layers else r.format
        print(f"lr x{r.lr_scale:g} seed {r.seed} {label:<5} final loss {r.final_loss:.4f}"
              f"{'  DIVERGED' if r.diverged else ''}{gap}", flush=True)

    selections = [parse_selection(spec) for spec in args.fp8_layers]  # a bad one: ConfigError, exit 2
    runs, cells = sweep(job, formats, scales, seeds, selections=selections, progress=progress)
    text = table(cells)
    size = f"{job.model.num_layers}x{job.model.d_model}, {job.steps} steps, batch {job.batch_size}"
    heatmap(cells, out / "heatmap.png", f"{job.name} ({size}), seeds {','.join(map(str, seeds))}")
    (out / "sweep.md").write_text(f"# shadow sweep: {job.name} ({size})\n\n{text}\n")
    (out / "sweep.json").write_text(json.dumps({"job": job.name, "size": size, "formats": formats,
                                                "fp8_layers": [label for label, _ in selections],
                                                "lr_scales": scales, "seeds": seeds, "runs": as_rows(runs),
                                                "cells": as_rows(cells)}, indent=1) + "\n")
    print(text)
    print(f"-> {out}/heatmap.png, sweep.md, sweep.json")
    return 0
