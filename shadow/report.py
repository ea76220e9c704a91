"""`shadow report`: a run directory as one picture and two tables.

The PNG has the main job's loss over its kept history (rows discarded by a rollback drawn faint),
each replay's loss over its window, the steps the main job ran in FP8 or BF16 shaded, and every
verdict as a marker coloured by its level; a second panel has each window's verdict metric against
the policy's warn and switch thresholds. The tables list the verifications (one row per judged
window) and the decisions with their reasons. Reads only the run directory (no MLflow, no torch).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from shadow.records import StepRecord
from shadow.rundir import read_events, read_history, read_trajectory

PRECISION_COLOURS = {"fp8": "#f4a259", "bf16": "#5b8fd9"}  # bands and replay curves
LEVEL_COLOURS = {"clean": "#2a9d4b", "warn": "#e9a100", "violation": "#d62828"}
OTHER_LEVEL_COLOUR = "#777777"


@dataclass
class Replay:
    name: str
    purpose: str
    precision: str
    start_step: int
    num_steps: int
    records: list[StepRecord]
    level: str = "not judged"


@dataclass
class RunReport:
    run_dir: Path
    kept: list[StepRecord]
    discarded: list[StepRecord]
    replays: list[Replay]
    verdicts: list[dict]  # `verdict` events
    decisions: list[dict]  # `decision` events
    rollbacks: list[dict]  # `rollback`, `replay_adopted` and `main_restarted` events: rows discarded
    thresholds: dict[str, float] = field(default_factory=dict)  # warn / switch of the first policy
    two_sided: bool = False  # the first policy also judges gaps in FP8's favour by their size
    metric: str = "rel_mean_gap"


def load_report(run_dir: str | os.PathLike) -> RunReport:
    run_dir = Path(run_dir)
    if not (run_dir / "events.jsonl").exists() and not (run_dir / "trajectory.jsonl").exists():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no events.jsonl or trajectory.jsonl); "
                                f"give the --out directory of a `shadow run`")
    events = read_events(run_dir)
    kept, discarded = read_history(run_dir) if (run_dir / "trajectory.jsonl").exists() else ([], [])
    verdicts = [e for e in events if e["event"] == "verdict"]
    levels = {v["name"]: v["level"] for v in verdicts}
    replays = []
    for event in events:
        if event["event"] != "replay_started":
            continue
        path = run_dir / "replays" / f"{event['name']}.jsonl"
        records = read_trajectory(path) if path.exists() else []
        replays.append(Replay(event["name"], event["purpose"], event["precision"], event["start_step"],
                              event["num_steps"], records, levels.get(event["name"], "not judged")))
    report = RunReport(run_dir, kept, discarded, replays, verdicts,
                       decisions=[e for e in events if e["event"] == "decision"],
                       rollbacks=[e for e in events if e["event"] in ("rollback", "replay_adopted", "main_restarted")])
    policy_path = run_dir / "policy-v1.yaml"
    if policy_path.exists():
        policy = yaml.safe_load(policy_path.read_text()) or {}
        report.thresholds = {k: v for k, v in (policy.get("thresholds") or {}).items() if k in ("warn", "switch")}
        report.two_sided = bool((policy.get("thresholds") or {}).get("two_sided", False))
        report.metric = (policy.get("compare") or {}).get("metric", report.metric)
    return report


def precision_spans(rows: list[StepRecord]) -> list[tuple[str, int, int]]:
    """Contiguous runs of one precision in the kept history: (precision, first step, end step)."""
    spans: list[tuple[str, int, int]] = []
    for row in rows:
        if spans and spans[-1][0] == row.precision and spans[-1][2] == row.step:
            spans[-1] = (row.precision, spans[-1][1], row.step + 1)
        else:
            spans.append((row.precision, row.step, row.step + 1))
    return spans


def render_png(run_dir: str | os.PathLike, out: str | os.PathLike, report: RunReport | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    report = report or load_report(run_dir)
    fig, (loss_ax, gap_ax) = plt.subplots(2, 1, figsize=(13, 7.5), sharex=True,
                                          gridspec_kw={"height_ratios": [3, 1.3]})
    for ax in (loss_ax, gap_ax):
        for precision, first, end in precision_spans(report.kept):
            ax.axvspan(first, end, color=PRECISION_COLOURS.get(precision, "#cccccc"), alpha=0.13, lw=0)
    if report.discarded:
        loss_ax.plot([r.step for r in report.discarded], [r.loss for r in report.discarded], ".", ms=2,
                     color="#999999", alpha=0.45, label="discarded by rollback")
    loss_ax.plot([r.step for r in report.kept], [r.loss for r in report.kept], lw=0.9, color="#222222",
                 label="main job (kept history)")
    for replay in report.replays:
        if replay.records:
            loss_ax.plot([r.step for r in replay.records], [r.loss for r in replay.records], lw=1.3,
                         color=PRECISION_COLOURS.get(replay.precision, "#888888"), alpha=0.95)
    _verdict_markers(loss_ax, gap_ax, report)
    loss_ax.set_ylabel("training loss")
    loss_ax.set_title(f"{report.run_dir.name}: main job, replays and verdicts")
    handles, _ = loss_ax.get_legend_handles_labels()
    handles += [Patch(color=PRECISION_COLOURS["fp8"], alpha=0.35, label="FP8 (band: main job; line: FP8 replay)"),
                Patch(color=PRECISION_COLOURS["bf16"], alpha=0.35, label="BF16 (band: main job; line: BF16 replay)")]
    handles += [Patch(color=c, label=f"verdict {level}") for level, c in LEVEL_COLOURS.items()]
    loss_ax.legend(handles=handles, loc="upper right", fontsize=8, ncol=2)
    gap_ax.axhline(0.0, color="#444444", lw=0.6)
    for name, value in report.thresholds.items():
        colour = LEVEL_COLOURS["warn" if name == "warn" else "violation"]
        gap_ax.axhline(value, ls="--", lw=0.8, color=colour, label=f"{name} {'±' if report.two_sided else ''}{value:g}")
        if report.two_sided:
            gap_ax.axhline(-value, ls="--", lw=0.8, color=colour)
    # symlog: the thresholds (~1e-2) and a violation ten times larger both readable
    linthresh = min(report.thresholds.values(), default=1e-3)
    values = [v["value"] for v in report.verdicts if isinstance(v.get("value"), (int, float))
              and math.isfinite(v["value"])] + list(report.thresholds.values())
    values += [-v for v in report.thresholds.values()] if report.two_sided else []
    gap_ax.set_yscale("symlog", linthresh=linthresh)
    gap_ax.set_ylim(min([-linthresh, *values]) * 3, max([linthresh, *values]) * 3)
    gap_ax.set_ylabel(report.metric)
    gap_ax.set_xlabel("global step")
    shapes = [Line2D([], [], ls="", marker=m, color="#555555", label=f"{purpose} window")
              for purpose, m in (("verify", "o"), ("probe", "s"))]
    gap_ax.legend(handles=gap_ax.get_legend_handles_labels()[0] + shapes, loc="upper right", fontsize=8, ncol=2)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _verdict_markers(loss_ax, gap_ax, report: RunReport) -> None:
    """A triangle over each judged window's last step on the loss panel, and its value on the gap panel."""
    by_step = {r.step: r.loss for r in report.kept}
    losses = [r.loss for r in report.kept if math.isfinite(r.loss)]
    top = max(losses) if losses else 1.0
    for verdict in report.verdicts:
        colour = LEVEL_COLOURS.get(verdict["level"], OTHER_LEVEL_COLOUR)
        last = verdict["window_end"] - 1
        y = by_step.get(last, top)
        loss_ax.scatter([last], [y if math.isfinite(y) else top], marker="v", s=70, color=colour,
                        edgecolors="black", linewidths=0.5, zorder=5)
        value = verdict.get("value")
        if isinstance(value, (int, float)) and math.isfinite(value):
            gap_ax.scatter([last], [value], marker="o" if verdict["purpose"] == "verify" else "s", s=36,
                           color=colour, edgecolors="black", linewidths=0.5, zorder=5)


def format_tables(report: RunReport) -> str:
    lines = [f"run {report.run_dir}: {len(report.kept)} kept steps, {len(report.discarded)} discarded, "
             f"{len(report.replays)} replays", "", "verifications"]
    header = f"{'window':<14}{'purpose':<9}{'replay':<7}{'metric':<14}{'value':>10}  {'level':<10}name"
    lines.append(header)
    precision_of = {r.name: r.precision for r in report.replays}
    for verdict in report.verdicts:
        window = f"[{verdict['window_start']}, {verdict['window_end']})"
        value = verdict.get("value")
        shown = f"{value:+.4f}" if isinstance(value, (int, float)) else str(value)
        lines.append(f"{window:<14}{verdict['purpose']:<9}{precision_of.get(verdict['name'], '?'):<7}"
                     f"{verdict['metric']:<14}{shown:>10}  {verdict['level']:<10}{verdict['name']}")
    if not report.verdicts:
        lines.append("(none)")
    lines += ["", "decisions"]
    lines.append(f"{'kind':<16}{'state after':<16}reason")
    for decision in report.decisions:
        machine = decision.get("state", {}).get("policy_state", {}).get("machine", "")
        lines.append(f"{decision['kind']:<16}{machine:<16}{decision.get('reason', '')}")
    if not report.decisions:
        lines.append("(none)")
    for event in report.rollbacks:
        first, end = event["discarded"]
        back_to = event.get("new_step", event.get("step"))
        lines.append(f"{event['event']}: steps [{first}, {end}) discarded, main job back to step {back_to}")
    return "\n".join(lines)
