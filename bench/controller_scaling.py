"""Scaling of the controller: its time per decision and per replay scheduling as runs grow longer and
more replays run at once. It should stay flat (O(1) per step), not grow with the run's history.

The real controller, Ray actors, checkpoint store and policy run; only the trainers inside the actors
are stand-ins (`DummyTrainer`): a real `Trainer` of a 1-layer, width-8 model, so snapshots, commits and
restores are real, whose step computes nothing and returns a loss that is a fixed function of the
step, equal in both precisions (every verdict is clean, the run stays in FP8). A main step sleeps
`--main-step-ms`, a replay step `--replay-step-ms`, so replays fall behind and fill their slots.
The stand-ins are swapped in by patching the names the controller builds its actors from, in this
process and in the actors' own processes; shadow/ is not changed for the benchmark.

Timed on the controller thread: `_decision_point` (policy poll, verdicts judged and decisions applied),
`_schedule` (which windows are due, replays started) and `_judge` (compare + decide, per
verdict), each reported as the median per call over the first and the last quarter of the steps the
main job trained, and their ratio (late / early; ~1 means flat). Then the brain alone (`due_replays`,
`decide`) at history sizes a simulation cannot reach in minutes, to show how a call grows with it.

    python bench/controller_scaling.py [--lengths 1000 10000 100000] [--concurrency 1 2 4 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import cloudpickle
import ray
from common import REPO, median, print_table, write_result

from shadow.config import load_job
from shadow.config.policy import load_policy
from shadow.controller import actors, main_job, replays
from shadow.compare import compare
from shadow.controller.controller import Controller
from shadow.policy import PolicyState, Purpose, ReplayRequest, decide, due_replays
from shadow.records import StepRecord
from shadow.trainer import Trainer, lr_at

# chunks end at checkpoints anyway; one chunk per checkpoint keeps Ray round trips (~0.1 s on a loaded
# 2-core machine) from making a 100k-step simulation take half an hour
DUMMY_JOB = ["run.chunk_steps=50", "checkpoint.every_steps=50", "model.num_layers=1", "model.d_model=8",
             "model.num_heads=1", "model.seq_len=8", "batch_size=1", "eval.batches=1"]
TIMED = ("_decision_point", "_schedule", "_judge")


class DummyTrainer(Trainer):
    """A real Trainer whose step costs `step_s` of sleep and nothing else."""

    step_s = 0.0

    def train_step(self) -> StepRecord:
        step = self.step
        time.sleep(self.step_s)
        self.step = step + 1
        return StepRecord(step=step, loss=2.0 + 1.0 / (1.0 + step / 100.0), precision=self.precision.value,
                          tokens=self.job.batch_size * self.job.model.seq_len, step_time_s=self.step_s,
                          grad_norm=1.0, lr=lr_at(self.job.optim, step, self.job.steps))


class FastMainTrainer(actors.MainTrainer):
    """The main trainer actor with the stand-in; the patch is in this actor's own process only."""

    def setup(self, *args) -> None:
        actors.Trainer = type("MainDummy", (DummyTrainer,), {"step_s": MAIN_STEP_S})
        super().setup(*args)


class FastReplayWorker(actors.ReplayWorker):
    """A replay actor with the stand-in (fresh per window, as the real one)."""

    def setup(self, *args) -> None:
        actors.Trainer = type("ReplayDummy", (DummyTrainer,), {"step_s": REPLAY_STEP_S})
        super().setup(*args)


MAIN_STEP_S = 0.0005  # set from the command line before any actor is created (pickled with the classes)
REPLAY_STEP_S = 0.002


class TimedController(Controller):
    """The controller with a stopwatch on the methods that run once per decision / scheduling / verdict.
    A decision point's own time excludes the verdicts it judged (timed apart, per verdict); only calls
    while the main job is still training count (the drain at the end judges a backlog at once)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.timings: dict[str, list[tuple[int, float]]] = {name: [] for name in TIMED}
        self.max_in_flight = 0
        self._judged_s = 0.0

    def _timed(self, name, *args):
        main_running = self.main.step < self.job.steps
        judged_before = self._judged_s
        started = time.perf_counter()
        result = getattr(super(), name)(*args)
        seconds = time.perf_counter() - started
        if name == "_judge":
            self._judged_s += seconds
        elif name == "_decision_point":
            seconds -= self._judged_s - judged_before
        if main_running:
            self.timings[name].append((self.main.step, seconds))
        self.max_in_flight = max(self.max_in_flight, self.verification.num_running)
        return result

    def _decision_point(self):
        return self._timed("_decision_point")

    def _schedule(self):
        return self._timed("_schedule")

    def _judge(self, replay):
        return self._timed("_judge", replay)


def pure_calls(num_checkpoints: int, every_steps: int = 50, repeats: int = 20) -> dict:
    """The brain alone at a given history size, called as the controller calls it: `due_replays` with
    `num_checkpoints` committed checkpoints (checkpoint.keep: 0 keeps all) and the newest settled window
    per purpose; `decide` in the state left by as many earlier verification windows as the run had, under
    a policy that watches the trend (`trend_windows: 3`)."""
    policy = load_policy(str(REPO / "policies/fixed.yaml"), ["thresholds.trend_windows=3"])
    main_step = num_checkpoints * every_steps
    committed = list(range(0, main_step + 1, every_steps))
    state = PolicyState()
    earlier = range(0, max(main_step - 200, 100), 100)
    for start in earlier:
        state = decide(policy, state, _verdict(start), main_step=start + 25).state
    settled = [ReplayRequest(max(earlier), 25, "bf16", Purpose.VERIFY)]
    new = _verdict(main_step - 100)
    timings = {"due_replays": [], "decide": []}
    for _ in range(repeats):
        started = time.perf_counter()
        due_replays(policy, state, main_step=main_step, committed_steps=committed, in_flight=[],
                    total_steps=main_step + 1000, settled=settled)
        timings["due_replays"].append(time.perf_counter() - started)
        started = time.perf_counter()
        decide(policy, state, new, main_step=main_step)
        timings["decide"].append(time.perf_counter() - started)
    return {"checkpoints": num_checkpoints, "verdicts": len(earlier),
            **{f"{k}_us": median(v) * 1e6 for k, v in timings.items()}}


def _verdict(start: int):
    main = [StepRecord(s, 2.0, "fp8", 8, 0.0, 1.0, 1e-3) for s in range(start, start + 25)]
    replay = [StepRecord(s, 2.0, "bf16", 8, 0.0, 1.0, 1e-3) for s in range(start, start + 25)]
    return compare(main, replay, window=(start, start + 25))


def simulate(steps: int, concurrency: int, every: int, window: int, root: Path) -> dict:
    job = load_job(str(REPO / "jobs/tiny.yaml"), DUMMY_JOB + [f"steps={steps}"])
    policy = load_policy(str(REPO / "policies/fixed.yaml"),
                         [f"verify.every_n_steps={every}", f"verify.window_steps={window}",
                          f"verify.max_concurrent_replays={concurrency}"])
    ray.init(address="local", num_cpus=1 + concurrency, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    try:
        with mock.patch.object(main_job, "MainTrainer", FastMainTrainer), \
                mock.patch.object(replays, "ReplayWorker", FastReplayWorker):
            controller = TimedController(job=job, policy=policy, watcher=None, run="scaling",
                                         store_uri=str(root / "checkpoints"), callbacks=[])
            started = time.perf_counter()
            summary = controller.run()
            wall_s = time.perf_counter() - started
    finally:
        ray.shutdown()
    assert summary["phase"] == "finished" and summary["num_precision_switches"] == 0, summary["phase"]
    row = {"steps": steps, "concurrency": concurrency, "wall_s": wall_s, "max_in_flight": controller.max_in_flight,
           "num_verifications": summary["num_verifications"], "checkpoints": len(controller.ledger.committed)}
    quarter = max(s for s, _ in controller.timings["_schedule"]) // 4  # of the steps trained while timed
    for name, samples in controller.timings.items():
        early = [s for step, s in samples if step <= quarter]
        late = [s for step, s in samples if step >= 3 * quarter]
        key = name.strip("_")
        row[f"{key}_calls"] = len(samples)
        row[f"{key}_early_us"] = median(early) * 1e6 if early else None
        row[f"{key}_late_us"] = median(late) * 1e6 if late else None
        row[f"{key}_late_over_early"] = median(late) / median(early) if early and late else None
    row["controller_us_per_step"] = 1e6 * sum(s for name in TIMED for _, s in controller.timings[name]) / steps
    return row


def main() -> None:
    global MAIN_STEP_S, REPLAY_STEP_S
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", nargs="*", type=int, default=[1000, 10000, 100000],
                        help="run lengths in steps, at concurrency 1")
    parser.add_argument("--concurrency", nargs="*", type=int, default=[1, 2, 4, 8],
                        help="max concurrent replays, at the middle length")
    parser.add_argument("--history", nargs="*", type=int, default=[100, 1000, 10000],
                        help="committed checkpoints for the brain alone (x50 steps)")
    parser.add_argument("--every", type=int, default=100, help="verify.every_n_steps (checkpoints every 50)")
    parser.add_argument("--window", type=int, default=25)
    parser.add_argument("--main-step-ms", type=float, default=0.5)
    parser.add_argument("--replay-step-ms", type=float, default=2.0)
    parser.add_argument("--out")
    args = parser.parse_args()
    MAIN_STEP_S, REPLAY_STEP_S = args.main_step_ms / 1000, args.replay_step_ms / 1000
    if __name__ != "__main__":  # imported (tests): the stand-ins must travel to the actors by value too
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    middle = sorted(args.lengths)[len(args.lengths) // 2]
    configs = [(n, 1) for n in args.lengths] + [(middle, c) for c in args.concurrency if c != 1]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (steps, concurrency) in enumerate(configs):
            rows.append(simulate(steps, concurrency, args.every, args.window, Path(tmp) / str(index)))
            print(f"simulated {steps} steps, {concurrency} concurrent: {rows[-1]['wall_s']:.1f} s", flush=True)
    print_table([("steps", "steps", ","), ("concurrency", "max conc", "d"), ("max_in_flight", "in flight", "d"),
                 ("num_verifications", "verdicts", "d"),
                 ("decision_point_early_us", "decision us early", ".0f"),
                 ("decision_point_late_us", "late", ".0f"), ("decision_point_late_over_early", "late/early", ".2f"),
                 ("schedule_early_us", "schedule us early", ".0f"),
                 ("schedule_late_us", "late", ".0f"),
                 ("schedule_late_over_early", "late/early", ".2f"),
                 ("judge_early_us", "judge us early", ".0f"), ("judge_late_us", "late", ".0f"),
                 ("controller_us_per_step", "ctrl us/step", ".1f"), ("wall_s", "wall s", ".1f")], rows,
                title=f"\nController scaling: dummy trainer (main step {args.main_step_ms} ms, replay step "
                      f"{args.replay_step_ms} ms), verify every {args.every} steps, window {args.window}; median "
                      f"us per call over the first and last quarter of the run")
    pure = [pure_calls(n) for n in args.history]
    print_table([("checkpoints", "committed checkpoints", ","), ("verdicts", "earlier verdicts", ","),
                 ("due_replays_us", "due_replays us", ".0f"), ("decide_us", "decide us", ".0f")], pure,
                title="\nThe brain alone at a history size (checkpoint.keep: 0 keeps every checkpoint; trend_windows 3)")
    write_result("controller_scaling", {"every": args.every, "window": args.window,
                                        "main_step_ms": args.main_step_ms, "replay_step_ms": args.replay_step_ms,
                                        "rows": rows, "pure": pure}, args.out)


if __name__ == "__main__":
    main()
