"""What MLflow tracking costs the controller: tracked vs untracked, side by side in one process.

1. Real runs: the fault job (small model, all of FP8 -> rollback -> probes -> FP8) under the
   controller, alternately with and without the MLflow tracker (embedded sqlite store). Reported: the
   median main-job step time, the controller's wall time, and the time spent inside the tracker's
   callbacks on the controller thread.
2. Callback cost alone: a synthetic 2,000-step run (chunks of 10 rows, a 25-step replay every 100
   steps) fed to the tracker against a sqlite store, against a server that is down (every send
   fails: the degraded path), and to `RunDirWriter` for reference; plus how fast the worker empties
   the spool into sqlite.

    python bench/tracking_cost.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
from pathlib import Path

import ray
from common import FAST, REPO, write_result

from shadow.config import load_job, to_yaml
from shadow.config.policy import load_policy
from shadow.controller.callbacks import RunCallback, RunDirWriter
from shadow.controller.controller import Controller
from shadow.records import StepRecord
from shadow.rundir import RunDir, read_trajectory
from shadow.tracking import tracker as tracker_module
from shadow.tracking.tracker import MlflowTracker


class Timed(RunCallback):
    """Delegates to a callback and adds up the time its methods take on the calling thread."""

    def __init__(self, inner: RunCallback):
        self.inner = inner
        self.seconds: dict[str, float] = {}
        self.calls = 0

    def _timed(self, name, *args):
        started = time.perf_counter()
        getattr(self.inner, name)(*args)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
        self.calls += 1

    @property
    def loop_s(self) -> float:
        """Time on the controller thread while the run was going (everything but on_finish)."""
        return sum(s for name, s in self.seconds.items() if name != "on_finish")

    def on_event(self, event): self._timed("on_event", event)
    def on_main_records(self, records): self._timed("on_main_records", records)
    def on_replay_finished(self, name, records): self._timed("on_replay_finished", name, records)
    def on_commit_point(self): self._timed("on_commit_point")
    def on_policy(self, version, policy_yaml): self._timed("on_policy", version, policy_yaml)
    def on_finish(self, summary): self._timed("on_finish", summary)


def real_run(out: Path, tracked: bool) -> dict:
    job = load_job(str(REPO / "jobs/tiny_fault.yaml"), FAST)
    policy = load_policy(str(REPO / "policies/fixed.yaml"), [])
    run_dir = RunDir(out)
    (out / "job.yaml").write_text(to_yaml(job))
    callbacks: list[RunCallback] = [RunDirWriter(run_dir)]
    tracker = Timed(MlflowTracker(out, experiment=job.name)) if tracked else None
    if tracker is not None:
        callbacks.append(tracker)
    controller = Controller(job=job, policy=policy, watcher=None, run=run_dir.name,
                            store_uri=str(out / "checkpoints"), callbacks=callbacks)
    if tracker is not None:
        tracker.inner.bind(controller.emit)
    started = time.perf_counter()
    controller.run()
    wall_s = time.perf_counter() - started
    rows = read_trajectory(out)
    return {"tracked": tracked, "wall_s": wall_s, "median_step_s": statistics.median(r.step_time_s for r in rows),
            "num_rows": len(rows), "tracker_calls": tracker.calls if tracker else 0,
            "tracker_loop_s": tracker.loop_s if tracker else 0.0,  # on the controller thread during the run
            "tracker_finish_s": tracker.seconds.get("on_finish", 0.0) if tracker else 0.0}  # report + last sends


def synthetic_run(callback: RunCallback, num_steps: int = 2000, chunk: int = 10) -> None:
    for start in range(0, num_steps, chunk):
        callback.on_main_records([StepRecord(step=s, loss=3.0, precision="fp8", tokens=512, step_time_s=0.05,
                                             grad_norm=1.0, lr=1e-3, lineage=0) for s in range(start, start + chunk)])
        if start % 100 == 0:
            name = f"{start // 100:03d}-verify-bf16-at-{start:09d}"
            callback.on_event({"event": "replay_started", "name": name, "start_step": start, "num_steps": 25,
                               "precision": "bf16", "purpose": "verify"})
            callback.on_replay_finished(name, [StepRecord(step=s, loss=3.0, precision="bf16", tokens=512,
                                                          step_time_s=0.05, grad_norm=1.0, lr=1e-3)
                                               for s in range(start, start + 25)])
            callback.on_event({"event": "verdict", "name": name, "purpose": "verify", "window_start": start,
                               "window_end": start + 25, "metric": "rel_mean_gap", "value": 0.001, "level": "clean",
                               "kind": "compared", "verdict": {"rel_mean_gap": 0.001, "mean_gap": 0.002}})
            callback.on_commit_point()


def callback_cost(label: str, make, drain_timeout_s: float, num_steps: int = 2000) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        timed = Timed(make(run_dir))
        synthetic_run(timed, num_steps)
        calls, loop_s = timed.calls, timed.loop_s
        drain_started = time.perf_counter()
        inner = timed.inner
        left = inner.worker.close(drain_timeout_s) if isinstance(inner, MlflowTracker) else 0
        drain_s = time.perf_counter() - drain_started
        num_replays = num_steps // 100  # main rows: 6 values, replay rows: 5, a verdict: 3 on each of 2 runs
        num_metrics = num_steps * 6 + num_replays * (25 * 5 + 2 * 3)
        return {"callback": label, "calls": calls, "per_call_us": 1e6 * loop_s / calls,
                "per_step_us": 1e6 * loop_s / num_steps, "drain_s": drain_s, "ops_left": left,
                "metrics_per_s_sent": num_metrics / drain_s if isinstance(inner, MlflowTracker) and not left else None}


def _dead_uri() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--synthetic-steps", type=int, default=2000)
    parser.add_argument("--out")
    args = parser.parse_args()

    ray.init(address="local", num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):  # alternate, so machine noise hits both alike
            for tracked in (False, True):
                runs.append(real_run(Path(tmp) / f"r{round_index}-{'tracked' if tracked else 'plain'}", tracked))
    ray.shutdown()
    side = {t: [r for r in runs if r["tracked"] is t] for t in (False, True)}
    # each round's tracked run over the untracked run just before it; the median of those ratios
    # per trained row: when a decision lands depends on timing, so runs differ in how many rows they train
    wall_ratio = statistics.median((t["wall_s"] / t["num_rows"]) / (u["wall_s"] / u["num_rows"])
                                   for u, t in zip(side[False], side[True]))
    step_ratio = statistics.median(t["median_step_s"] / u["median_step_s"] for u, t in zip(side[False], side[True]))
    tracked_loop_s = statistics.median(r["tracker_loop_s"] for r in side[True])
    tracked_finish_s = statistics.median(r["tracker_finish_s"] for r in side[True])

    tracker_module.CLOSE_TIMEOUT_S = 0.0
    dead = _dead_uri()
    costs = [
        callback_cost("RunDirWriter (reference)", lambda d: RunDirWriter(RunDir(d)), 0.0, args.synthetic_steps),
        callback_cost("MlflowTracker, sqlite", lambda d: MlflowTracker(d, experiment="bench",
                                                                      tracking_uri=f"sqlite:///{d}/m.db"), 120.0,
                      args.synthetic_steps),
        callback_cost("MlflowTracker, server down", lambda d: MlflowTracker(d, experiment="bench", tracking_uri=dead),
                      0.0, args.synthetic_steps),
    ]

    print("real runs (fault job, small model): wall time and median main-job step time")
    print(f"{'round':<7}{'untracked: rows':>16}{'wall s':>8}{'step s':>9}{'tracked: rows':>15}{'wall s':>8}{'step s':>9}")
    for index, (plain, tracked_run) in enumerate(zip(side[False], side[True])):
        print(f"{index:<7}{plain['num_rows']:>16}{plain['wall_s']:>8.2f}{plain['median_step_s']:>9.4f}"
              f"{tracked_run['num_rows']:>15}{tracked_run['wall_s']:>8.2f}{tracked_run['median_step_s']:>9.4f}")
    print(f"median of the rounds' ratios tracked/untracked: wall per trained row {wall_ratio:.3f}   "
          f"median step time {step_ratio:.3f}")
    print(f"tracker callbacks on the controller thread: {tracked_loop_s:.3f} s during the run "
          f"({100 * tracked_loop_s / statistics.median(r['wall_s'] for r in side[True]):.2f}% of its wall time), "
          f"{tracked_finish_s:.2f} s at the end (report plot, last sends)")
    print()
    print(f"{'callback (synthetic 2,000 steps)':<34}{'us/call':>9}{'us/step':>9}{'drain s':>9}{'metrics/s':>11}")
    print("(us on the calling thread; with sqlite the worker thread sending the backlog competes for the GIL)")
    for row in costs:
        rate = f"{row['metrics_per_s_sent']:>11,.0f}" if row["metrics_per_s_sent"] else f"{'-':>11}"
        print(f"{row['callback']:<34}{row['per_call_us']:>9.1f}{row['per_step_us']:>9.1f}{row['drain_s']:>9.2f}{rate}")
    write_result("tracking_cost", {"real_runs": runs, "ratios": {"wall_per_row": wall_ratio, "median_step_time": step_ratio},
              "tracker_loop_s_median": tracked_loop_s, "tracker_finish_s_median": tracked_finish_s,
                                   "synthetic": costs}, args.out)


if __name__ == "__main__":
    main()
