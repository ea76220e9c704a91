"""The single controller: drives the main trainer in chunks, runs replays beside it, applies decisions.

One loop over Ray futures (`ray.wait` on the main chunk and every replay, whichever finishes first),
so a slow replay never stalls the main job. Decisions are taken and applied only between main-job
chunks, so every switch, rollback or adoption lands on an exact step boundary. Large state moves
through the checkpoint store; actors return records only. All side effects go through callbacks.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import replace

import ray

from shadow.checkpoint import CheckpointError, open_store
from shadow.compare import Verdict, compare
from shadow.config.job import JobConfig
from shadow.config.loader import to_yaml
from shadow.config.policy import OnSwitch, Policy
from shadow.config.policy_watch import PolicyWatcher
from shadow.controller.callbacks import RunCallback
from shadow.controller.main_job import MainJob
from shadow.controller.replays import Replay, ReplayPool
from shadow.controller.resume import ResumePoint
from shadow.controller.state import ALLOWED, Phase, RunState
from shadow.controller.summary import build_summary
from shadow.policy import (Decision, DecisionKind, Firing, Machine, PolicyState, Purpose, ReplayRequest,
                           TriggerState, decide, due_replays, watch)
from shadow.records import StepRecord


class ControllerError(RuntimeError):
    """The run cannot go on; the message says why."""


class Controller:
    def __init__(self, *, job: JobConfig, policy: Policy, watcher: PolicyWatcher | None, run: str, store_uri: str,
                 callbacks: list[RunCallback], resume: ResumePoint | None = None):
        self.job = job
        self.policy = policy
        self.watcher = watcher
        self.run_name = run
        self.store_uri = store_uri
        self.callbacks = callbacks
        self.phase = Phase.STARTING
        self.resume = resume
        self.state = resume.state if resume else RunState(
            policy_state=PolicyState().to_dict(), precision=job.precision.mode.value)
        self.history: dict[int, StepRecord] = {r.step: r for r in resume.history} if resume else {}
        self.trained: list[StepRecord] = list(resume.trained) if resume else []
        self.committed: set[int] = set(resume.committed) if resume else set()
        self.verdicts: list[Verdict] = list(resume.verdicts) if resume else []
        self.verdict_rows: list[dict] = list(resume.verdict_rows) if resume else []
        self.replay_steps: dict[str, int] = dict(resume.replay_steps) if resume else {}
        self.num_replays = resume.num_replays if resume else 0
        self.trigger_rows: list[dict] = list(resume.trigger_rows) if resume else []
        # the triggers' rolling windows describe one FP8 regime: they restart after every switch
        self.trigger_state, self.trigger_regime = TriggerState(), self.state.regime
        self.triggered: list[ReplayRequest] = []  # triggered windows waiting for a replay slot
        self.main_step = 0
        self.final_eval_loss: float | None = None
        self.main = MainJob(job, store_uri, run)
        self.pool = ReplayPool(job, store_uri, run)
        self.finished: list[Replay] = []  # done, waiting for the main job to cover their window
        self.stop_requested: str | None = None
        self.policy_version = 1
        self.store = open_store(store_uri, run)  # for pins; the main trainer owns writing and retention
        self.rollback_pin: int | None = None
        self.checkpoint_failures_in_row = 0
        self.settled: list[ReplayRequest] = []  # windows of this regime already replayed or given up
        self.started = time.perf_counter()

    # ----------------------------------------------------------------------------- events
    def emit(self, event_name: str, /, **payload) -> dict:
        event = {"event": event_name, "time_unix": round(time.time(), 3), **payload}
        for callback in self.callbacks:
            callback.on_event(event)
        return event

    def _commit_point(self) -> None:
        for callback in self.callbacks:
            callback.on_commit_point()

    def _transition(self, phase: Phase, reason: str) -> None:
        if phase not in ALLOWED[self.phase]:
            raise ControllerError(f"controller: no transition {self.phase.value} -> {phase.value}")
        self.emit("controller_phase", old=self.phase.value, new=phase.value, reason=reason)
        self.phase = phase

    @property
    def policy_state(self) -> PolicyState:
        return PolicyState.from_dict(self.state.policy_state)

    # ----------------------------------------------------------------------------- run
    def run(self) -> dict:
        """Run to the end; FAILED re-raises (the CLI turns it into a message and exit code 1)."""
        failure: Exception | None = None
        try:
            for callback in self.callbacks:
                callback.on_policy(self.policy_version, to_yaml(self.policy))
            self._start_main()
            self._transition(Phase.TRAINING, f"main trainer at step {self.main_step} in {self.state.precision}")
            self._loop()
            self._finish_main()
            self._transition(Phase.FINISHED, f"main job reached step {self.main_step}")
        except KeyboardInterrupt:
            self._final_checkpoint()
            self._transition(Phase.INTERRUPTED, self.stop_requested or "interrupted")
        except Exception as exc:
            failure = exc
            self._safely(lambda: self._transition(Phase.FAILED, f"{type(failure).__name__}: {failure}"))
        self._safely(self._release)
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
        self.pool.shutdown()

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
            self._on_checkpoint_events(self.main.leader("flush"))
            if self.main_step not in self.committed:
                commit = self.main.leader("commit_now")
                self._on_checkpoint_events([commit.to_event()])
        except Exception as exc:  # the main trainer is gone: the last committed checkpoint stands
            self.emit("final_checkpoint_failed", error=f"{type(exc).__name__}: {exc}",
                      last_committed=max(self.committed, default=None))

    def _start_main(self) -> None:
        self._check_replay_layout()
        nodes = self.main.start_group()
        self.emit("main_started", ranks=len(nodes), nodes=nodes, generation=self.main.generation)
        if self.resume is None:
            commit = self.main.call("start", self.state.precision)
            self.main_step = commit.step
            self._on_checkpoint_events([commit.to_event()])
        else:
            point = self.resume
            for step, reasons in self.store.pins().items():  # replays of the dead driver are gone
                for reason in reasons:
                    if reason.startswith("replay-"):
                        self._unpin(step, reason)
            for step, error in point.rejected:
                self.emit("checkpoint_rejected", step=step, error=error)
            self.main_step = self.main.call("restore", self.store_uri, point.restore_run, point.restore_step,
                                            self.state.precision)
            self.emit("resumed", step=self.main_step, from_run=point.restore_run, lineage=self.state.lineage,
                      steps_lost=point.steps_lost, state=self.state.to_dict())

    def _check_replay_layout(self) -> None:
        micro = self.job.resources.num_ranks * self.job.resources.grad_accum
        replay_ranks = self.policy.verify.replay_resources.num_ranks
        if micro % replay_ranks:
            raise ControllerError(
                f"verify.replay_resources.num_ranks={replay_ranks} cannot share the main job's {micro} micro-batches "
                f"(resources.num_ranks x resources.grad_accum) evenly; use a divisor of {micro}")

    def _loop(self) -> None:
        self._schedule_replays()
        while True:
            if self.stop_requested:
                raise KeyboardInterrupt
            if not self.main.chunk_running and self.main_step < self.job.steps:
                if self.phase is Phase.DRAINING:
                    self._transition(Phase.TRAINING, f"main job rolled back to step {self.main_step}")
                self._launch_chunk()
            if not self.main.chunk_running:
                if self.phase is Phase.TRAINING and self.pool.running:
                    self._transition(Phase.DRAINING, f"main job done, {len(self.pool.running)} replay(s) still running")
                for replay in self.pool.abandon_unstarted(grace_s=15.0):
                    self._give_up(replay, "the main job finished while it was still waiting for resources")
            refs = self.main.pending_refs + self.pool.refs()
            if not refs:
                return
            ready, _ = ray.wait(refs, num_returns=1, timeout=1.0)
            self._report_waiting()
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
                self._on_replay_done(ref)
            if not self.main.chunk_running:
                self._decision_point()
            self._schedule_replays()

    # ----------------------------------------------------------------------------- main job
    def _launch_chunk(self) -> None:
        until = min(self.job.steps, self.main_step + self.job.run.chunk_steps)
        every = self.job.checkpoint.every_steps
        next_checkpoint = (self.main_step // every + 1) * every
        until = min(until, next_checkpoint)  # a chunk ends at a checkpoint, so replays can start from it at once
        eval_batches = self.policy.verify.eval_batches
        eval_after = tuple(r.request.start_step + r.request.num_steps for r in self.pool.running
                           if r.request.start_step + r.request.num_steps > self.main_step) if eval_batches else ()
        self.main.launch_chunk(until, eval_after, eval_batches, self.state.lineage)

    def _on_chunk(self, result) -> None:
        for record in result.records:
            self.history[record.step] = record
        self.trained.extend(result.records)
        for callback in self.callbacks:
            callback.on_main_records(result.records)
        self._on_checkpoint_events(result.checkpoint_events)
        self.main_step = result.step
        self._verify_nonfinite(result.records)
        self._watch_signals(result.records)

    def _verify_nonfinite(self, records: list[StepRecord]) -> None:
        """A non-finite FP8 loss cannot wait for the cadence: replay its window in BF16 at once, so the
        policy judges it (a `nonfinite` verdict) whether or not a scheduled window covers the step."""
        bad = [r.step for r in records if r.precision == "fp8" and not math.isfinite(r.loss)]
        if not bad:
            return
        window = self.policy.verify.window_steps
        taken = [r.request for r in [*self.pool.running, *self.finished]]
        starts = [s for s in self.committed if s <= bad[0] < s + window]
        covered = any(r.start_step <= bad[0] < r.start_step + r.num_steps for r in taken)
        if starts and not covered and max(starts) + window <= self.job.steps:
            request = ReplayRequest(max(starts), window, self.policy.verify.replay_precision.value, Purpose.VERIFY)
            self.emit("replay_triggered", step=bad[0], reason=f"non-finite FP8 loss at step {bad[0]}",
                      **request.to_dict())
            self._launch_replay(request)

    def _watch_signals(self, records: list[StepRecord]) -> None:
        """Feed FP8 steps' signals to the policy's triggers (pure: `shadow.policy.triggers`); a firing
        queues a verification replay of its step (`_on_trigger`)."""
        triggers = self.policy.triggers
        if not triggers.rules or self.policy_state.machine not in (Machine.FP8, Machine.FP8_PROBATION):
            return
        if self.trigger_regime != self.state.regime:
            self.trigger_state, self.trigger_regime = TriggerState(), self.state.regime
        for record in records:
            if record.precision != "fp8":
                continue
            values = {**record.telemetry, "loss": record.loss, "grad_norm": record.grad_norm}
            self.trigger_state, firings = watch(triggers, self.trigger_state, record.step, values)
            if firings:
                self._on_trigger(record.step, firings)

    def _on_trigger(self, step: int, firings: list[Firing]) -> None:
        """Replay from the latest committed checkpoint at or before `step`, through `step` (at least W
        steps), unless a verification window already covers the step."""
        window = self.policy.verify.window_steps
        start = max((s for s in self.committed if s <= step and s + window <= self.job.steps), default=None)
        taken = [r.request for r in [*self.pool.running, *self.finished]] + self.settled + self.triggered
        covering = next((r for r in taken if r.purpose is Purpose.VERIFY
                         and r.start_step <= step < r.start_step + r.num_steps), None)
        request = None
        if covering is not None:
            outcome = f"already covered by the window from step {covering.start_step}"
        elif start is None:
            outcome = "no committed checkpoint at or before the step leaves room for a window"
        else:
            request = ReplayRequest(start, max(window, step - start + 1), self.policy.verify.replay_precision.value,
                                    Purpose.VERIFY)
            outcome = f"verification replay of [{start}, {start + request.num_steps})"
        for firing in firings:
            row = {**firing.to_dict(), "replay_start": request.start_step if request else None, "outcome": outcome}
            self.trigger_rows.append(row)
            self.emit("trigger_fired", **row)
        if request is not None:
            self.triggered.append(request)  # started by `_schedule_replays`, ahead of the cadence

    def _on_checkpoint_events(self, events: list[dict]) -> None:
        for event in events:
            payload = {k: v for k, v in event.items() if k != "event"}
            if event["event"] == "checkpoint_committed":
                self.checkpoint_failures_in_row = 0
                self._on_commit(payload)
            elif event["event"] == "checkpoint_deleted":
                self.committed.discard(event["step"])
                self.emit("checkpoint_deleted", **payload)
            else:
                self._on_checkpoint_failed(payload)

    def _on_checkpoint_failed(self, payload: dict) -> None:
        """A failed save: training goes on from memory (replays use older checkpoints) until
        `run.max_checkpoint_failures` saves in a row failed; then the run stops rather than train on
        with nothing recoverable past the last commit."""
        self.checkpoint_failures_in_row += payload.get("stage") == "save"
        limit = self.job.run.max_checkpoint_failures
        self.emit("checkpoint_failed", lineage=self.state.lineage, failures_in_row=self.checkpoint_failures_in_row,
                  limit=limit, **payload)
        self._commit_point()
        if self.checkpoint_failures_in_row >= limit:
            raise ControllerError(
                f"{self.checkpoint_failures_in_row} checkpoint saves failed in a row (run.max_checkpoint_failures="
                f"{limit}); last error: {payload['error']}. The last committed checkpoint is step "
                f"{max(self.committed, default=None)}; fix the store and continue with `shadow run --resume`")

    def _on_commit(self, info: dict) -> None:
        self.committed.add(info["step"])
        self.emit("checkpoint_committed", lineage=self.state.lineage, **info)
        self._commit_point()

    def _restart_main(self, error: Exception) -> None:
        """The main trainer's process died: start a new one from the newest checkpoint that loads."""
        restarts = self.state.num_main_restarts + 1
        limit = self.job.run.max_main_restarts
        lost_from = self.main_step
        if restarts > limit:
            raise ControllerError(f"the main trainer died {restarts} times (run.max_main_restarts={limit}); "
                                  f"last error: {_first_line(error)}")
        nodes = self.main.start_group()
        self.emit("main_started", ranks=len(nodes), nodes=nodes, generation=self.main.generation)
        for step in sorted(self.committed, reverse=True):
            try:
                self.main_step = self.main.call("restore", self.store_uri, self.run_name, step, self.state.precision)
                break
            except ray.exceptions.RayTaskError as exc:  # a damaged checkpoint: fall back to the one before
                self.emit("checkpoint_rejected", step=step, error=_first_line(exc))
                self.committed.discard(step)
        else:
            raise ControllerError(f"the main trainer died and no committed checkpoint of lineage "
                                  f"{self.state.lineage} could be loaded: {_first_line(error)}")
        self.state = replace(self.state, lineage=self.state.lineage + 1, num_main_restarts=restarts,
                             restore_step=self.main_step, restore_run=self.run_name)
        for step in [s for s in self.history if s >= self.main_step]:
            del self.history[step]
        self.emit("main_restarted", restart=restarts, limit=limit, step=self.main_step,
                  discarded=[self.main_step, lost_from], error=_first_line(error), state=self.state.to_dict())
        self._commit_point()

    def _finish_main(self) -> None:
        self._on_checkpoint_events(self.main.leader("flush"))
        if self.history and self.job.eval.batches:
            self.final_eval_loss = self.main.leader("evaluate", self.job.eval.batches)
            self.emit("final_evaluation", step=self.main_step, eval_loss=self.final_eval_loss)

    # ----------------------------------------------------------------------------- replays
    def _schedule_replays(self) -> None:
        # finished replays still waiting for their verdict count as in flight: their window is taken
        in_flight = [r.request for r in [*self.pool.running, *self.finished]]
        # triggered windows take the next free slots; while they wait, they hold back the cadence
        while self.triggered and len(in_flight) < self.policy.verify.max_concurrent_replays:
            in_flight.append(self.triggered.pop(0))
            self._launch_replay(in_flight[-1])
        requests = due_replays(self.policy, self.policy_state, main_step=self.main_step,
                               committed_steps=self.committed, in_flight=in_flight + self.triggered,
                               total_steps=self.job.steps, settled=self.settled)
        for request in requests:
            self._launch_replay(request)

    def _launch_replay(self, request: ReplayRequest) -> None:
        self.num_replays += 1
        name = f"{self.num_replays:03d}-{request.purpose.value}-{request.precision}-at-{request.start_step:09d}"
        pin = f"replay-{self.num_replays}"
        try:
            self.store.pin(request.start_step, pin)  # retention must keep its start
        except CheckpointError as exc:
            self.committed.discard(request.start_step)
            self.emit("replay_skipped", name=name, **request.to_dict(), reason=f"cannot pin its checkpoint: {exc}")
            return
        adopt = self.policy.action.on_switch is OnSwitch.ADOPT_REPLAY and request.purpose is Purpose.VERIFY
        replay = Replay(name, request, self.state.regime, self.state.lineage,
                        f"{self.run_name}-replays/{name}" if adopt else None, pin)
        self.emit("replay_started", name=name, **request.to_dict(), regime=self.state.regime,
                  ranks=self.policy.verify.replay_resources.num_ranks)
        self._start(replay)

    def _start(self, replay: Replay) -> None:
        self.pool.start(replay, self.policy)

    def _report_waiting(self) -> None:
        """Replays whose resources have not come after a while: said once each, never waited for."""
        for replay in self.pool.waiting_for_resources(after_s=2.0):
            resources = self.policy.verify.replay_resources
            self.emit("replay_waiting_for_resources", name=replay.name, ranks=resources.num_ranks,
                      cpus_per_rank=resources.num_cpus, gpus_per_rank=resources.num_gpus)

    def _on_replay_done(self, ref) -> None:
        replay, error = self.pool.collect(ref)
        if replay is None:
            return  # other ranks of this replay are still running
        if error is not None:
            self._on_replay_failed(replay, error)
            return
        self._unpin(replay.request.start_step, replay.pin)
        records = replay.result.records
        precision = replay.request.precision
        self.replay_steps[precision] = self.replay_steps.get(precision, 0) + len(records)
        for callback in self.callbacks:
            callback.on_replay_finished(replay.name, records)
        self.emit("replay_finished", name=replay.name, precision=precision, steps=len(records),
                  wall_s=round(replay.result.wall_s, 3), eval_loss=replay.result.eval_loss,
                  node=replay.result.node_id)
        if replay.regime != self.state.regime or replay.lineage != self.state.lineage:
            self.emit("replay_discarded", name=replay.name,
                      reason="started before the main job's last switch; its window no longer describes the run")
            return
        self.finished.append(replay)

    def _on_replay_failed(self, replay: Replay, error: Exception) -> None:
        """Retry on a healthy group up to `verify.replay_retries`, then give the window up; the main
        job never waits for it."""
        retries = self.policy.verify.replay_retries
        self.emit("replay_failed", name=replay.name, attempt=replay.attempt, retries=retries,
                  worker_died=isinstance(error, ray.exceptions.RayActorError), error=_first_line(error))
        stale = replay.regime != self.state.regime or replay.lineage != self.state.lineage
        if replay.attempt < retries and not stale:
            replay.attempt += 1
            self._start(replay)
            return
        self._give_up(replay, "the main job moved on" if stale else f"failed {replay.attempt + 1} time(s)")

    def _give_up(self, replay: Replay, reason: str) -> None:
        self._unpin(replay.request.start_step, replay.pin)
        self.settled.append(replay.request)
        self.emit("replay_skipped", name=replay.name, **replay.request.to_dict(), reason=reason)

    # ----------------------------------------------------------------------------- decisions
    def _decision_point(self) -> None:
        if self.watcher is not None:
            polled = self.watcher.poll()
            if polled.event is not None:
                event = dict(polled.event)
                self.emit(event.pop("event"), **event)
                if polled.policy is not self.policy:
                    self.policy_version += 1
                    for callback in self.callbacks:
                        callback.on_policy(self.policy_version, to_yaml(polled.policy))
            self.policy = polled.policy
        main_done = self.main_step >= self.job.steps
        ready = [r for r in self.finished if main_done or r.request.start_step + r.request.num_steps <= self.main_step]
        for replay in sorted(ready, key=lambda r: r.request.start_step):
            self.finished.remove(replay)
            if replay.regime != self.state.regime or replay.lineage != self.state.lineage:
                self.emit("replay_discarded", name=replay.name, reason="a switch was applied before it was judged")
                continue
            self._judge(replay)

    def _judge(self, replay: Replay) -> None:
        self.settled.append(replay.request)
        window = range(replay.request.start_step, replay.request.start_step + replay.request.num_steps)
        main_rows = [self.history[s] for s in window if s in self.history]
        main_eval = main_rows[-1].eval_loss if main_rows and main_rows[-1].step == window[-1] else None
        verdict = compare(main_rows, replay.result.records, window=(window.start, window.stop),
                          ignore_first_steps=self.policy.compare.ignore_first_steps,
                          end_fraction=self.policy.compare.end_fraction,
                          main_eval_loss=main_eval, replay_eval_loss=replay.result.eval_loss)
        outcome = decide(self.policy, self.policy_state, self.verdicts, verdict, main_step=self.main_step)
        self.verdicts.append(verdict)
        self.state = replace(self.state, policy_state=outcome.state.to_dict())
        metric = self.policy.compare.metric.value
        level = next((d.payload.get("level") for d in outcome.decisions if "level" in d.payload), "not judged")
        row = {"name": replay.name, "purpose": replay.request.purpose.value, "window_start": window.start,
               "window_end": window.stop, "metric": metric, "value": verdict.metric(metric), "level": level,
               "kind": verdict.kind.value}
        self.verdict_rows.append(row)
        self.emit("verdict", **row, verdict=verdict.to_dict())
        for decision in outcome.decisions:
            self.emit("decision", name=replay.name, **decision.to_dict(), state=self.state.to_dict())
        self._commit_point()
        for decision in outcome.decisions:
            self._apply(decision, replay)
        self._pin_rollback_target()

    def _pin_rollback_target(self) -> None:
        """Keep the checkpoint a rollback would return to (the last verified window's start)."""
        target = self.policy_state.last_verified_step
        if target == self.rollback_pin or target not in self.committed:
            return
        if self.rollback_pin is not None:
            self._unpin(self.rollback_pin, "rollback-target")
        try:
            self.store.pin(target, "rollback-target")
        except CheckpointError as exc:
            self.emit("pin_failed", step=target, reason="rollback-target", error=str(exc))
            return
        self.rollback_pin = target

    def _unpin(self, step: int, reason: str) -> None:
        """A pin left behind (store unreachable) only keeps a checkpoint longer: report it, go on."""
        try:
            self.store.unpin(step, reason)
        except CheckpointError as exc:
            self.emit("unpin_failed", step=step, reason=reason, error=str(exc))

    def _apply(self, decision: Decision, replay: Replay) -> None:
        if decision.kind is DecisionKind.SWITCH_TO_BF16:
            on_switch = OnSwitch(decision.payload.get("on_switch", OnSwitch.BF16.value))
            if on_switch is OnSwitch.ROLLBACK:
                step = decision.payload["resume_step"]
                self._restart_lineage(step=step, run=self.run_name, kind="rollback", decision=decision,
                                      keep_committed_upto=step)
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
                             num_switches=self.state.num_switches + (precision != old))
        self.settled, self.triggered = [], []
        self.main.call("set_precision", precision)
        self.emit("precision_switched", old=old, new=precision, step=self.main_step, reason=decision.reason,
                  state=self.state.to_dict())

    def _restart_lineage(self, *, step: int, run: str, kind: str, decision: Decision, keep_committed_upto: int) -> None:
        """Continue the main job in BF16 from a committed checkpoint; later rows become discarded history."""
        # a save still in flight belongs to the old branch: take its outcome under the old lineage first
        self._on_checkpoint_events(self.main.leader("flush"))
        old_step, old_precision = self.main_step, self.state.precision
        self.state = replace(self.state, precision="bf16", regime=self.state.regime + 1,
                             lineage=self.state.lineage + 1, restore_step=step, restore_run=run,
                             num_switches=self.state.num_switches + (old_precision != "bf16"))
        self.settled, self.triggered = [], []
        self.emit(kind, old_step=old_step, new_step=step, discarded=[min(step, keep_committed_upto), old_step],
                  reason=decision.reason, state=self.state.to_dict())
        if old_precision != "bf16":
            self.emit("precision_switched", old=old_precision, new="bf16", step=step, reason=decision.reason,
                      state=self.state.to_dict())
        self._commit_point()
        self.main_step = self.main.call("restore", self.store_uri, run, step, "bf16")
        for s in [s for s in self.history if s >= keep_committed_upto]:
            del self.history[s]
        abandoned = sorted(s for s in self.committed if s > keep_committed_upto)
        self.committed -= set(abandoned)
        for s in abandoned:  # the old branch's checkpoints must not count as latest or for retention
            try:
                self.store.delete(s)
            except CheckpointError as exc:  # pinned by a replay still running: it goes when re-saved
                self.emit("checkpoint_kept", step=s, reason=str(exc))
                continue
            self.emit("checkpoint_deleted", step=s, uri=self.store.step_uri(s), reason=f"abandoned by {kind}")

    def _adopt(self, replay: Replay, decision: Decision) -> None:
        start = replay.request.start_step
        self._restart_lineage(step=start + replay.request.num_steps, run=replay.save_end_run, kind="replay_adopted",
                              decision=decision, keep_committed_upto=start)
        adopted = [replace(r, lineage=self.state.lineage) for r in replay.result.records]
        for record in adopted:
            self.history[record.step] = record
        for callback in self.callbacks:
            callback.on_main_records(adopted)

    # ----------------------------------------------------------------------------- summary
    def _summary(self) -> dict:
        history = [self.history[s] for s in sorted(self.history)]
        return build_summary(history=history, trained=self.trained, replay_steps=self.replay_steps,
                             verdicts=self.verdict_rows, triggers=self.trigger_rows,
                             num_switches=self.state.num_switches,
                             final_eval_loss=self.final_eval_loss, fp8_speedup=self.job.run.fp8_speedup,
                             wall_s=time.perf_counter() - self.started, phase=self.phase.value,
                             policy_state=self.state.policy_state)


def _first_line(error: Exception) -> str:
    """Ray wraps remote errors in long tracebacks; the event keeps the line that says what happened."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    cause = next((line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1] if lines else "")
    return f"{type(error).__name__}: {cause}"[:500]
