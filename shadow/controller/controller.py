"""The single controller: drives the main trainer in chunks, runs replays beside it, applies decisions.

One loop over Ray futures (`ray.wait` on the main chunk and every replay, whichever finishes first),
so a slow replay never stalls the main job. Decisions are taken and applied only between main-job
chunks, so every switch, rollback or adoption lands on an exact step boundary. Large state moves
through the checkpoint store; actors return records only. All side effects go through callbacks.

The controller composes parts that each own one concern and its state:
| part | file | owns |
| --- | --- | --- |
| `main` | `main_job.py` | the main trainer's rank group, its step, kept history and trained rows |
| `ledger` | `ledger.py` | committed checkpoints of the lineage, pins, failed saves in a row |
| `verification` | `verification.py` | replays: cadence, triggers, the window life cycle (`windows.py`), the Ray pool |
| `events` | `callbacks.py` | the event log every part writes to, and commit points |
The controller itself owns the phase, `RunState` (precision, regime, lineage, the policy's state),
the policy in force and the verdicts; it turns verdicts into decisions and applies them here.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace

import ray
import torch

from shadow.checkpoint import open_store
from shadow.compare import compare
from shadow.config.job import JobConfig
from shadow.config.loader import to_yaml
from shadow.config.policy import OnSwitch, Policy
from shadow.config.policy_watch import PolicyWatcher
from shadow.controller.callbacks import EventLog, RunCallback
from shadow.controller.errors import ControllerError, first_line
from shadow.controller.ledger import CheckpointLedger
from shadow.controller.main_job import MainJob
from shadow.controller.resume import ResumePoint
from shadow.controller.speed import MainSetup, StepTimes, describe
from shadow.controller.state import ALLOWED, Phase, RunState
from shadow.distributed import exact_across_world_sizes
from shadow.memory_plan import plan_memory
from shadow.precision.convert import fp8_layers_report
from shadow.controller.summary import build_summary
from shadow.controller.verification import Verification
from shadow.controller.windows import Replay
from shadow.policy import Decision, DecisionKind, cadence, decide, judge_speed


class Controller:
    def __init__(self, *, job: JobConfig, policy: Policy, watcher: PolicyWatcher | None, run: str, store_uri: str,
                 callbacks: list[RunCallback], resume: ResumePoint | None = None):
        self.job = job
        self.policy = policy
        self.policy_version = 1
        self.watcher = watcher
        self.run_name = run
        self.callbacks = callbacks
        self.resume = resume
        self.phase = Phase.STARTING
        self.state = resume.state if resume else RunState(precision=job.precision.mode.value)
        self.verdict_rows: list[dict] = list(resume.verdict_rows) if resume else []
        self.final_eval_loss: float | None = None
        self.stop_requested: str | None = None
        self.events = EventLog(callbacks)
        self.ledger = CheckpointLedger(open_store(store_uri, run), self.events,
                                       max_failures_in_row=job.run.max_checkpoint_failures,
                                       committed=resume.committed if resume else (),
                                       waits_s=resume.checkpoint_waits_s if resume else ())
        self.main = MainJob(job, store_uri, run, history=resume.history if resume else (),
                            trained=resume.trained if resume else ())
        # FP8 and BF16 step times of the main job and the replays (the measured speedup), and where the main
        # job's steps run once it started
        self.step_times = StepTimes.resumed(resume.trained, resume.replay_times) if resume else StepTimes()
        self.main_setup: MainSetup | None = None
        self.verification = Verification(job, store_uri, run, ledger=self.ledger, events=self.events,
                                         callbacks=callbacks, regime=self.state.regime, lineage=self.state.lineage,
                                         resume=resume, step_times=self.step_times)
        self.started = time.perf_counter()

    def emit(self, event_name: str, /, **payload) -> dict:
        return self.events.emit(event_name, **payload)

    def _transition(self, phase: Phase, reason: str) -> None:
        if phase not in ALLOWED[self.phase]:
            raise ControllerError(f"controller: no transition {self.phase.value} -> {phase.value}")
        self.emit("controller_phase", old=self.phase.value, new=phase.value, reason=reason)
        self.phase = phase

    # ----------------------------------------------------------------------------- run
    def run(self) -> dict:
        """Run to the end; FAILED re-raises (the CLI turns it into a message and exit code 1)."""
        failure: Exception | None = None
        try:
            for callback in self.callbacks:
                callback.on_policy(self.policy_version, to_yaml(self.policy))
            self._start_main()
            self._transition(Phase.TRAINING, f"main trainer at step {self.main.step} in {self.state.precision}")
            self._loop()
            self._finish_main()
            self._transition(Phase.FINISHED, f"main job reached step {self.main.step}")
        except KeyboardInterrupt:
            self._final_checkpoint()
            self._transition(Phase.INTERRUPTED, self.stop_requested or "interrupted")
        except Exception as exc:
            failure = exc
            self._safely(lambda: self._transition(Phase.FAILED, f"{type(failure).__name__}: {failure}"))
        self._safely(self._release)
        for callback in self.callbacks:
            self._safely(callback.on_ending)
        summary = self._summary()
        self._safely(lambda: self.emit("run_finished", phase=self.phase.value, final_step=summary["final_step"]))
        for callback in self.callbacks:
            self._safely(lambda callback=callback: callback.on_finish(summary))
        if failure is not None:
            raise failure
        return summary

    def _release(self) -> None:
        """Give every actor and placement group back to the cluster (a shared cluster outlives the run)."""
        self.main.shutdown()
        self.verification.shutdown()

    def _safely(self, action) -> None:
        """At the end of a failed run, writing the record may fail too (a full disk): report, go on."""
        try:
            action()
        except Exception as exc:
            print(f"shadow: could not record the end of the run: {exc}", file=sys.stderr)

    def _final_checkpoint(self) -> None:
        """On SIGINT/SIGTERM: let the running chunk finish and commit the state it reached."""
        try:
            if self.main.chunk_running:
                for ref in list(self.main.pending_refs):
                    ray.wait([ref], timeout=300)
                    result = self.main.collect(ref)
                    if result is not None:
                        self._on_chunk(result)
            self._record_checkpoints(self.main.call("flush"))
            if self.main.step not in self.ledger.committed:
                commit = self.main.call("commit_now")
                self._record_checkpoints([commit.to_event()])
        except Exception as exc:  # the main trainer is gone: the last committed checkpoint stands
            self.emit("final_checkpoint_failed", error=f"{type(exc).__name__}: {exc}",
                      last_committed=self.ledger.committed.newest())

    def _loop(self) -> None:
        self._schedule()
        while True:
            if self.stop_requested:
                raise KeyboardInterrupt
            if not self.main.chunk_running and self.main.step < self.job.steps:
                if self.phase is Phase.DRAINING:
                    self._transition(Phase.TRAINING, f"main job rolled back to step {self.main.step}")
                self._launch_chunk()
            if not self.main.chunk_running:
                num_running = self.verification.num_running
                if self.phase is Phase.TRAINING and num_running:
                    self._transition(Phase.DRAINING, f"main job done, {num_running} replay(s) still running")
                self.verification.abandon_unstarted()
            refs = self.main.pending_refs + self.verification.refs()
            if not refs:
                return
            ready, _ = ray.wait(refs, num_returns=1, timeout=1.0)
            self.verification.report_waiting(self.policy)
            if not ready:
                continue
            ref = ready[0]
            if self.main.owns(ref):
                try:
                    result = self.main.collect(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                    self._restart_main(exc)
                else:
                    if result is not None:
                        self._on_chunk(result)
            else:
                self.verification.on_done(ref, self.policy, self.state.policy_state, self.main.history)
            if not self.main.chunk_running:
                self._decision_point()
            self._schedule()

    def _schedule(self) -> None:
        self.verification.schedule(self.policy, self.state.policy_state, self.main.step)

    # ----------------------------------------------------------------------------- main job
    def _start_main(self) -> None:
        self._check_replay_layout()
        self._emit_memory_plan()
        self.emit("fp8_layers", **fp8_layers_report(self.job))
        inert = self.verification.inert_trigger_rules(self.policy)
        if inert:  # a guard that can never fire must not look like one
            raise ControllerError("; ".join(inert))
        self._start_main_group()
        if self.resume is None:
            commit = self.main.call("start", self.state.precision)
            self.main.step = commit.step
            self._record_checkpoints([commit.to_event()])
            return
        point = self.resume
        self.ledger.unpin_replays_of_a_dead_driver()
        for step, error in point.rejected:
            self.emit("checkpoint_rejected", step=step, error=error)
        self.main.restore(point.restore_run, point.restore_step, self.state.precision,
                          keep_history_before=point.restore_step)
        self.emit("resumed", step=self.main.step, from_run=point.restore_run, lineage=self.state.lineage,
                  steps_lost=point.steps_lost, state=self.state.to_dict())

    def _start_main_group(self) -> None:
        nodes = self.main.start_group()
        where = self.main.call("describe")
        self.main_setup = MainSetup(where["device"], len(nodes), where["emulated"])
        self.emit("main_started", ranks=len(nodes), nodes=nodes, generation=self.main.generation,
                  device=where["device"], fp8_emulated=where["emulated"])

    def _emit_memory_plan(self) -> None:
        """Per-rank memory of the main job and of a replay (each rank checks its own device when it starts)."""
        device = torch.device("cuda" if self.main.num_gpus else "cpu")
        micro = self.job.resources.num_ranks * self.job.resources.grad_accum
        main = plan_memory(self.job, self.job.resources.num_ranks, micro, device)
        replay = plan_memory(self.job, self.policy.verify.replay_resources.num_ranks, micro, device)
        self.emit("memory_plan", main=main.to_event(), replay=replay.to_event())

    def _check_replay_layout(self) -> None:
        main_ranks = self.job.resources.num_ranks
        micro = main_ranks * self.job.resources.grad_accum
        replay_ranks = self.policy.verify.replay_resources.num_ranks
        if micro % replay_ranks:
            raise ControllerError(
                f"verify.replay_resources.num_ranks={replay_ranks} cannot share the main job's {micro} micro-batches "
                f"(resources.num_ranks x resources.grad_accum) evenly; use a divisor of {micro}")
        if not exact_across_world_sizes(micro, main_ranks, replay_ranks) and not self.policy.noise.enabled:
            raise ControllerError(
                f"verify.replay_resources.num_ranks={replay_ranks} adds the gradients of the main job's {micro} "
                f"micro-batches ({main_ranks} ranks) in another order, so replays differ from the main job by fp32 "
                "rounding that a verdict would count against FP8; set noise.enabled=true in the policy (the measured "
                f"noise floor then covers it) or verify.replay_resources.num_ranks={main_ranks}")

    def _launch_chunk(self) -> None:
        step, every = self.main.step, self.job.checkpoint.every_steps
        until = min(self.job.steps, step + self.job.run.chunk_steps)
        until = min(until, (step // every + 1) * every)  # a chunk ends at a checkpoint, so replays can start from it at once
        eval_batches = self.policy.verify.eval_batches
        eval_after = self.verification.windows.running_ends_after(step) if eval_batches else ()
        self.main.launch_chunk(until, eval_after, eval_batches, self.state.lineage)

    def _on_chunk(self, result) -> None:
        for callback in self.callbacks:
            callback.on_main_records(result.records)
        self.step_times.add_main(result.records)
        self._record_checkpoints(result.checkpoint_events)
        alarms = self.verification.after_chunk(result.records, self.policy, self.state.policy_state)
        if alarms and self.state.policy_state.cadence_doublings:
            self.state = replace(self.state, policy_state=cadence.back_to_base(self.state.policy_state))
            self.emit("cadence_reset", reason=alarms[0], every_n_steps=self.policy.verify.every_n_steps,
                      state=self.state.to_dict())

    def _record_checkpoints(self, checkpoint_events: list[dict]) -> None:
        self.ledger.record(checkpoint_events, self.state.lineage)

    def _restart_main(self, error: Exception) -> None:
        """The main trainer's process died: start a new one from the newest checkpoint that loads."""
        restarts = self.state.num_main_restarts + 1
        limit = self.job.run.max_main_restarts
        lost_from = self.main.step
        if restarts > limit:
            raise ControllerError(f"the main trainer died {restarts} times (run.max_main_restarts={limit}); "
                                  f"last error: {first_line(error)}")
        self._start_main_group()
        for step in sorted(self.ledger.committed, reverse=True):
            try:
                self.main.restore(self.run_name, step, self.state.precision, keep_history_before=step)
                break
            except ray.exceptions.RayTaskError as exc:  # a damaged checkpoint: fall back to the one before
                self.ledger.reject(step, first_line(exc))
        else:
            raise ControllerError(f"the main trainer died and no committed checkpoint of lineage "
                                  f"{self.state.lineage} could be loaded: {first_line(error)}")
        self.state = replace(self.state, lineage=self.state.lineage + 1, num_main_restarts=restarts,
                             restore_step=self.main.step, restore_run=self.run_name)
        # the steps after the restore point are trained again: their signals and windows start over
        self.verification.new_lineage(self.state.lineage, from_step=self.main.step)
        self.emit("main_restarted", restart=restarts, limit=limit, step=self.main.step,
                  discarded=[self.main.step, lost_from], error=first_line(error), state=self.state.to_dict())
        self.events.commit_point()

    def _finish_main(self) -> None:
        self._record_checkpoints(self.main.call("flush"))
        if self.main.history and self.job.eval.batches:
            self.final_eval_loss = self.main.call("evaluate", self.job.eval.batches)
            self.emit("final_evaluation", step=self.main.step, eval_loss=self.final_eval_loss)

    # ----------------------------------------------------------------------------- decisions
    def _decision_point(self) -> None:
        self._reload_policy()
        main_done = self.main.step >= self.job.steps
        for replay in self.verification.windows.ready_to_judge(self.main.step, main_done):
            if not self.verification.windows.is_current(replay):  # an earlier verdict switched
                self.emit("replay_discarded", name=replay.name, reason="a switch was applied before it was judged")
                continue
            self._judge(replay)
        self._judge_speed()

    def _judge_speed(self) -> None:
        """`action.fp8_must_pay`: once the run has measured both precisions, does FP8 pay on this job?"""
        measured = self.step_times.measured(self.main_setup)
        if measured is None:
            return
        outcome = judge_speed(self.policy, self.state.policy_state, fp8_speedup=measured["fp8_speedup"],
                              measured=describe(measured), main_step=self.main.step)
        if outcome is None:
            return
        self.state = replace(self.state, policy_state=outcome.state)
        for decision in outcome.decisions:
            # about no replay window (`name`, which MLflow would look for): the setting that judged it instead
            self.emit("decision", name=None, policy_key="action.fp8_must_pay", **decision.to_dict(),
                      state=self.state.to_dict())
        self.events.commit_point()
        for decision in outcome.decisions:
            self._apply(decision, None)

    def _reload_policy(self) -> None:
        if self.watcher is None:
            return
        polled = self.watcher.poll()
        if polled.event is not None:
            event = dict(polled.event)
            self.emit(event.pop("event"), **event)
            if polled.policy is not self.policy:
                self.policy_version += 1
                for problem in self.verification.inert_trigger_rules(polled.policy):
                    self.emit("trigger_rule_inert", reason=problem)
                for callback in self.callbacks:
                    callback.on_policy(self.policy_version, to_yaml(polled.policy))
        self.policy = polled.policy

    def _judge(self, replay: Replay) -> None:
        self.verification.windows.judge(replay)
        window = range(replay.request.start_step, replay.end_step)
        main_rows = [self.main.history[s] for s in window if s in self.main.history]
        main_eval = main_rows[-1].eval_loss if main_rows and main_rows[-1].step == window[-1] else None
        verdict = compare(main_rows, replay.result.records, window=(window.start, window.stop),
                          ignore_first_steps=self.policy.compare.ignore_first_steps,
                          end_fraction=self.policy.compare.end_fraction,
                          main_eval_loss=main_eval, replay_eval_loss=replay.result.eval_loss)
        outcome = decide(self.policy, self.state.policy_state, verdict, main_step=self.main.step)
        self.state = replace(self.state, policy_state=outcome.state)
        metric = self.policy.compare.metric.value
        level = next((d.payload.get("level") for d in outcome.decisions if "level" in d.payload), "not judged")
        row = {"name": replay.name, "purpose": replay.request.purpose.value, "window_start": window.start,
               "window_end": window.stop, "metric": metric, "value": verdict.metric(metric), "level": level,
               "kind": verdict.kind.value,
               # a window cut short once its records decided it: at how many of its planned steps, and why
               "stopped_early": {"steps": len(window), "planned_steps": replay.planned_steps,
                                 **replay.early_stop.to_dict()} if replay.early_stop else None}
        self.verdict_rows.append(row)
        self.emit("verdict", **row, verdict=verdict.to_dict())
        for decision in outcome.decisions:
            self.emit("decision", name=replay.name, **decision.to_dict(), state=self.state.to_dict())
        self.events.commit_point()
        for decision in outcome.decisions:
            self._apply(decision, replay)
        self.ledger.pin_rollback_target(self.state.policy_state.last_verified_step)

    def _apply(self, decision: Decision, replay: Replay | None) -> None:
        if decision.kind is DecisionKind.SWITCH_TO_BF16:
            on_switch = OnSwitch(decision.payload.get("on_switch", OnSwitch.BF16.value))
            if on_switch is OnSwitch.ROLLBACK:
                step = decision.payload["resume_step"]
                self._restart_lineage(step=step, run=self.run_name, kind="rollback", decision=decision,
                                      keep_history_before=step)
            elif on_switch is OnSwitch.ADOPT_REPLAY and replay.save_end_run is not None:
                self._adopt(replay, decision)
            else:
                self._switch_precision("bf16", decision)
        elif decision.kind is DecisionKind.SWITCH_TO_FP8:
            self._switch_precision("fp8", decision)
        elif decision.kind is DecisionKind.STAY_BF16 and self.state.precision != "bf16":
            self._switch_precision("bf16", decision)

    def _switch_precision(self, precision: str, decision: Decision) -> None:
        old = self.state.precision
        self.state = replace(self.state, precision=precision, regime=self.state.regime + 1,
                             num_precision_switches=self.state.num_precision_switches + (precision != old))
        self.verification.new_regime(self.state.regime, self.state.lineage)
        self.main.call("set_precision", precision)
        self.emit("precision_switched", old=old, new=precision, step=self.main.step, reason=decision.reason,
                  state=self.state.to_dict())

    def _restart_lineage(self, *, step: int, run: str, kind: str, decision: Decision, keep_history_before: int) -> None:
        """Continue the main job in BF16 from a committed checkpoint; later rows become discarded history."""
        # a save still in flight belongs to the old branch: take its outcome under the old lineage first
        self._record_checkpoints(self.main.call("flush"))
        old_step, old_precision = self.main.step, self.state.precision
        self.state = replace(self.state, precision="bf16", regime=self.state.regime + 1,
                             lineage=self.state.lineage + 1, restore_step=step, restore_run=run,
                             num_precision_switches=self.state.num_precision_switches + (old_precision != "bf16"))
        self.verification.new_regime(self.state.regime, self.state.lineage)
        self.emit(kind, old_step=old_step, new_step=step, discarded=[min(step, keep_history_before), old_step],
                  reason=decision.reason, state=self.state.to_dict())
        if old_precision != "bf16":
            self.emit("precision_switched", old=old_precision, new="bf16", step=step, reason=decision.reason,
                      state=self.state.to_dict())
        self.events.commit_point()
        self.main.restore(run, step, "bf16", keep_history_before=keep_history_before)
        self.ledger.abandon_after(keep_history_before, kind)

    def _adopt(self, replay: Replay, decision: Decision) -> None:
        start = replay.request.start_step
        self._restart_lineage(step=replay.end_step, run=replay.save_end_run, kind="replay_adopted",
                              decision=decision, keep_history_before=start)
        adopted = [replace(r, lineage=self.state.lineage) for r in replay.result.records]
        self.main.adopt(adopted)
        for callback in self.callbacks:
            callback.on_main_records(adopted)

    # ----------------------------------------------------------------------------- summary
    def _summary(self) -> dict:
        return build_summary(history=self.main.kept_history(), trained=self.main.trained,
                             replay_steps=self.verification.replay_steps, verdicts=self.verdict_rows,
                             triggers=self.verification.trigger_rows,
                             num_triggered_replays=self.verification.num_triggered_replays,
                             num_precision_switches=self.state.num_precision_switches,
                             final_eval_loss=self.final_eval_loss,
                             checkpoint_waits_s=self.ledger.waits_s, fp8_speedup=self.job.run.fp8_speedup,
                             measured=self.step_times.measured(self.main_setup),
                             not_measured=self.step_times.why_not(self.main_setup),
                             wall_s=time.perf_counter() - self.started, phase=self.phase.value,
                             policy_state=self.state.policy_state.to_dict())
