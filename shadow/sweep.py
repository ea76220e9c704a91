"""Precision sweep (as "To FP8 and Back Again", 2024, simulates reduced exponent and mantissa bits):
short trainings of a job in several number formats and learning rates, each against BF16.

For every seed and learning-rate scale, one BF16 run is the reference; each format trains the same
steps from the same initialisation on the same batches, with every GEMM operand in that format (one
format for forward and backward). A format with 8 exponent bits has BF16's range and runs unscaled
(scaling none), as in the paper; narrower formats use the job's scaling. A run diverged when a loss
went non-finite or its final loss is above its first step's loss. The final loss is the mean training
loss over the last `final_fraction` of the steps; the gap is relative to BF16's (0.01 = FP8 1% worse).

Each format can also be tried with several FP8 layer selections (`precision.fp8_layers`): a row per
format and selection, so a sweep shows what keeping some layers in BF16 buys back.
"""

from __future__ import annotations

import copy
import math
import statistics
from dataclasses import asdict, dataclass

from shadow.config.job import Fp8LayersConfig, JobConfig, PrecisionMode, Scaling
from shadow.precision.formats import parse_format
from shadow.trainer import Trainer


@dataclass
class SweepRun:
    format: str  # "bf16" for the reference
    fp8_layers: str  # the selection's label ("" = the job's own selection, and for the reference)
    lr_scale: float
    seed: int
    scaling: str
    final_loss: float
    diverged: bool
    rel_gap: float | None = None  # (final - BF16 final) / BF16 final; None for the reference


@dataclass
class SweepCell:
    format: str
    fp8_layers: str
    lr_scale: float
    scaling: str
    mean_rel_gap: float | None  # over the seeds where neither this format nor BF16 diverged (None if none)
    max_rel_gap: float | None
    num_diverged: int
    num_seeds: int

    @property
    def label(self) -> str:
        return f"{self.format} [{self.fp8_layers}]" if self.fp8_layers else self.format


def scaling_for(fmt: str, job: JobConfig) -> Scaling:
    return Scaling.NONE if parse_format(fmt).exp_bits >= 8 else job.precision.scaling


Selection = tuple[str, Fp8LayersConfig]  # (label, precision.fp8_layers)


def _run(job: JobConfig, fmt: str, selection: Selection, lr_scale: float, seed: int,
         final_fraction: float) -> SweepRun:
    job = copy.deepcopy(job)
    job.precision.fp8_layers = selection[1]
    job.seed = seed
    job.optim.lr *= lr_scale
    job.optim.min_lr *= lr_scale
    if fmt == "bf16":
        job.precision.mode = PrecisionMode.BF16
    else:
        job.precision.mode, job.precision.format = PrecisionMode.FP8, fmt
        job.precision.scaling = scaling_for(fmt, job)
    trainer = Trainer(job)
    losses = []
    for _ in range(job.steps):
        losses.append(trainer.train_step().loss)
        if not math.isfinite(losses[-1]):
            break
    final = statistics.fmean(losses[-max(1, int(len(losses) * final_fraction)):])
    diverged = not all(math.isfinite(x) for x in losses) or final > losses[0]
    scaling = job.precision.scaling.value if fmt != "bf16" else "-"
    return SweepRun(fmt, selection[0] if fmt != "bf16" else "", lr_scale, seed, scaling, final, diverged)


def sweep(job: JobConfig, formats: list[str], lr_scales: list[float], seeds: list[int], *,
          selections: list[Selection] | None = None, final_fraction: float = 0.1,
          progress=lambda run: None) -> tuple[list[SweepRun], list[SweepCell]]:
    """`selections`: FP8 layer selections to try each format with (default: the job's own, unlabelled)."""
    selections = selections or [("", job.precision.fp8_layers)]
    variants = [("bf16", selections[0])] + [(fmt, selection) for fmt in formats for selection in selections]
    runs: list[SweepRun] = []
    for lr_scale in lr_scales:
        for seed in seeds:
            reference = _run(job, "bf16", selections[0], lr_scale, seed, final_fraction)
            runs.append(reference)
            progress(reference)
            for fmt, selection in variants[1:]:
                run = _run(job, fmt, selection, lr_scale, seed, final_fraction)
                if not (run.diverged or reference.diverged):
                    run.rel_gap = (run.final_loss - reference.final_loss) / reference.final_loss
                runs.append(run)
                progress(run)
    cells = []
    for fmt, (label, _) in variants:
        label = label if fmt != "bf16" else ""
        for lr_scale in lr_scales:
            group = [r for r in runs if (r.format, r.fp8_layers, r.lr_scale) == (fmt, label, lr_scale)]
            gaps = [r.rel_gap for r in group if r.rel_gap is not None]
            cells.append(SweepCell(fmt, label, lr_scale, group[0].scaling, statistics.fmean(gaps) if gaps else None,
                                   max(gaps) if gaps else None, sum(r.diverged for r in group), len(group)))
    return runs, cells


def table(cells: list[SweepCell]) -> str:
    """A Markdown table: one row per format and learning-rate scale."""
    lines = ["| format | lr scale | scaling | mean final-loss gap vs BF16 | max gap | diverged |",
             "| --- | --- | --- | --- | --- | --- |"]
    for cell in cells:
        gap = "reference" if cell.format == "bf16" else gap_label(cell, cell.mean_rel_gap)
        worst = "" if cell.format == "bf16" else gap_label(cell, cell.max_rel_gap)
        lines.append(f"| {cell.label} | {cell.lr_scale:g} | {cell.scaling} | {gap} | {worst} | "
                     f"{cell.num_diverged}/{cell.num_seeds} |")
    return "\n".join(lines)


def heatmap(cells: list[SweepCell], path, title: str) -> None:
    """Formats x learning-rate scales, colour = mean final-loss gap vs BF16; diverged cells marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = [c for c in cells if c.format != "bf16"]
    formats = list(dict.fromkeys(c.label for c in cells))
    scales = list(dict.fromkeys(c.lr_scale for c in cells))
    grid = np.full((len(formats), len(scales)), np.nan)
    for c in cells:
        if c.mean_rel_gap is not None:
            grid[formats.index(c.label), scales.index(c.lr_scale)] = 100 * c.mean_rel_gap
    limit = max(1.0, float(np.nanmax(np.abs(grid)))) if np.isfinite(grid).any() else 1.0
    fig, ax = plt.subplots(figsize=(1.6 * len(scales) + 2.5, 0.7 * len(formats) + 1.6))
    image = ax.imshow(grid, cmap="RdYlGn_r", vmin=-limit, vmax=limit, aspect="auto")
    for c in cells:
        i, j = formats.index(c.label), scales.index(c.lr_scale)
        text = gap_label(c, c.mean_rel_gap).replace(" (", "\n(")  # two lines fit a heatmap cell
        if 0 < c.num_diverged < c.num_seeds:
            text += f"\n{c.num_diverged}/{c.num_seeds} diverged"
        ax.text(j, i, text, ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(scales)), [f"lr x{s:g}" for s in scales])
    ax.set_yticks(range(len(formats)), formats)
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="final-loss gap vs BF16 (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_selection(spec: str) -> Selection:
    """`all` (every block linear layer), `auto`, or a YAML mapping of `precision.fp8_layers` fields,
    e.g. `{bf16_first_layers: 1, bf16_last_layers: 1}`; the spec is the selection's label."""
    from shadow.config.loader import build_config, parse_yaml_mapping

    if spec == "all":
        return spec, Fp8LayersConfig()
    if spec == "auto":
        return spec, Fp8LayersConfig(auto=True)
    return spec, build_config(Fp8LayersConfig, [("--fp8-layers", parse_yaml_mapping(spec, "--fp8-layers"))])


def as_rows(items) -> list[dict]:
    return [asdict(item) for item in items]


def gap_label(cell: SweepCell, value: float | None) -> str:
    """A gap in percent or, without one, why: the format's own runs all diverged, or BF16's did (a
    format that trained fine has nothing to be compared with, which is not its divergence)."""
    if value is not None:
        return f"{100 * value:+.2f}%"
    return "diverged" if cell.num_diverged == cell.num_seeds else "no reference (BF16 diverged)"
