"""The end-of-run figures (`summary.json`) and the table `shadow run` prints.

Effective speedup, in units of one BF16 step (s = the FP8 speedup factor per step):
    baseline      = kept steps                        (an all-BF16 run trains each step once)
    main cost     = fp8 steps / s + bf16 steps        (every step the main job trained, discarded ones too)
    replay cost   = bf16 replay steps + fp8 replay steps / s   (the steps replays actually ran)
    wall speedup     = baseline / main cost                  (replays on their own resources, overlapped)
    compute speedup  = baseline / (main cost + replay cost)  (accelerator-hours, verification included)
s is the speedup the run measured (`shadow/controller/speed.py`: FP8 and BF16 step times on the main
job's kind of device and rank count) when it measured one: `effective_speedup.basis` is then
"measured" and `effective_speedup.measured` says what it rests on; otherwise the assumed
`run.fp8_speedup`, with `basis` "assumed", `measured` null and `assumed.why` saying what was missing.
"""

from __future__ import annotations

import statistics

from shadow.controller.speed import describe
from shadow.records import StepRecord


def effective_speedup(*, kept_steps: int, trained_fp8: int, trained_bf16: int, replay_bf16: int,
                      replay_fp8: int, fp8_speedup: float) -> dict:
    """Wall and compute speedups over an all-BF16 run, for FP8 steps `fp8_speedup` x as fast as BF16 ones."""
    main_cost = trained_fp8 / fp8_speedup + trained_bf16
    replay_cost = replay_bf16 + replay_fp8 / fp8_speedup
    return {
        "wall": kept_steps / main_cost if main_cost else None,
        "compute": kept_steps / (main_cost + replay_cost) if main_cost + replay_cost else None,
    }


def speedup_ledger(counts: dict, *, measured: dict | None, assumed: float, not_measured: str) -> dict:
    """`effective_speedup` of summary.json: the figures from the measured speedup where there is one,
    else from the assumed one, labelled which."""
    if measured is not None:
        figures = effective_speedup(**counts, fp8_speedup=measured["fp8_speedup"])
        return {"basis": "measured", "fp8_speedup": measured["fp8_speedup"], **figures,
                "measured": {**measured, **figures}, "assumed": None}
    figures = effective_speedup(**counts, fp8_speedup=assumed)
    return {"basis": "assumed", "fp8_speedup": assumed, **figures, "measured": None,
            "assumed": {"fp8_speedup": assumed, **figures, "why": f"nothing comparable measured: {not_measured}"}}


def checkpoint_waits(waits_s: list[float]) -> dict:
    """How long the training loop waited for a previous save before the next could start, over the
    committed checkpoints: often non-zero means the checkpoint interval is shorter than one save."""
    return {"total_s": sum(waits_s), "max_s": max(waits_s, default=0.0),
            "num_waited": sum(1 for w in waits_s if w > 0), "num_saves": len(waits_s)}


def build_summary(*, history: list[StepRecord], trained: list[StepRecord], replay_steps: dict[str, int],
                  verdicts: list[dict], triggers: list[dict], num_triggered_replays: int,
                  num_precision_switches: int, final_eval_loss: float | None, checkpoint_waits_s: list[float],
                  fp8_speedup: float, measured: dict | None, not_measured: str, wall_s: float, phase: str,
                  policy_state: dict) -> dict:
    trained_fp8 = sum(1 for r in trained if r.precision == "fp8")
    trained_bf16 = len(trained) - trained_fp8
    purposes = [v["purpose"] for v in verdicts]
    kept = {(r.step, r.lineage) for r in history}
    step_times = {p: [r.step_time_s for r in trained if r.precision == p] for p in ("fp8", "bf16")}
    return {
        "phase": phase,
        "final_step": history[-1].step + 1 if history else 0,
        "final_loss": history[-1].loss if history else None,
        "final_eval_loss": final_eval_loss,
        "steps_fp8": sum(1 for r in history if r.precision == "fp8"),
        "steps_bf16": sum(1 for r in history if r.precision == "bf16"),
        "steps_discarded": sum(1 for r in trained if (r.step, r.lineage) not in kept),
        "num_verifications": purposes.count("verify"),
        "num_probes": purposes.count("probe"),
        "num_noise_windows": purposes.count("noise"),
        "num_precision_switches": num_precision_switches,  # applied to the main job, either direction
        "num_fallbacks": policy_state.get("num_fallbacks", 0),  # FP8 -> BF16 fallbacks enforced (action.max_switches bounds them)
        "num_triggers_fired": len(triggers),  # signals that fired (several may fire at one step)
        "num_trigger_steps": len({t["step"] for t in triggers}),
        "num_triggered_replays": num_triggered_replays,  # replays started for a firing
        "triggers": triggers,
        "verdicts": verdicts,
        "replay_steps": replay_steps,
        "verification_cost": sum(replay_steps.values()) / len(trained) if trained else 0.0,
        "effective_speedup": speedup_ledger(
            {"kept_steps": len(history), "trained_fp8": trained_fp8, "trained_bf16": trained_bf16,
             "replay_bf16": replay_steps.get("bf16", 0), "replay_fp8": replay_steps.get("fp8", 0)},
            measured=measured, assumed=fp8_speedup, not_measured=not_measured),
        "measured_step_time_s": {p: statistics.median(t) if t else None for p, t in step_times.items()},
        "checkpoint_waits": checkpoint_waits(checkpoint_waits_s),
        "wall_s": wall_s,
        "policy_state": policy_state,
    }


def format_summary(summary: dict) -> str:
    speed = summary["effective_speedup"]
    lines = [
        f"phase            {summary['phase']}",
        f"final step       {summary['final_step']}   loss {_num(summary['final_loss'])}   "
        f"held-out {_num(summary['final_eval_loss'])}",
        f"steps            fp8 {summary['steps_fp8']}   bf16 {summary['steps_bf16']}   "
        f"discarded {summary['steps_discarded']}",
        f"verifications    {summary['num_verifications']}   probes {summary['num_probes']}   "
        f"noise windows {summary['num_noise_windows']}   precision switches {summary['num_precision_switches']}"
        f"   fallbacks {summary['num_fallbacks']}",
        f"triggers fired   {summary['num_triggers_fired']}   triggered replays {summary['num_triggered_replays']}",
        f"verification cost {summary['verification_cost']:.2f} replay steps per main step",
        f"checkpoint waits {summary['checkpoint_waits']['num_waited']} of {summary['checkpoint_waits']['num_saves']} "
        f"saves waited for the previous one, {summary['checkpoint_waits']['total_s']:.2f} s in all",
        f"effective speedup wall {_num(speed['wall'], '.2f')}x   compute {_num(speed['compute'], '.2f')}x   "
        + (f"(measured: {describe(speed['measured'])})" if speed["measured"] else
           f"(assumed: FP8 = {speed['fp8_speedup']:g}x BF16 per step, run.fp8_speedup; {speed['assumed']['why']})"),
        f"wall time        {summary['wall_s']:.1f} s",
    ]
    if summary["verdicts"]:
        lines.append("")
        lines.append(f"{'window':<16}{'purpose':<9}{'metric':<14}{'value':>10}  level")
        for verdict in summary["verdicts"]:
            window = f"[{verdict['window_start']}, {verdict['window_end']})"
            stopped = verdict.get("stopped_early")
            lines.append(f"{window:<16}{verdict['purpose']:<9}{verdict['metric']:<14}"
                         f"{_num(verdict['value'], '+.4f'):>10}  {verdict['level']}"
                         + (f" (stopped early at {stopped['steps']} of {stopped['planned_steps']} steps)"
                            if stopped else ""))
    return "\n".join(lines)


def _num(value, fmt: str = ".4f") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    return format(value, fmt)
