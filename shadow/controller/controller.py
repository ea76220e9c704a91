"""The single controller: drives the main trainer in chunks, runs replays beside it, applies decisions.

One loop over Ray futures (`ray.wait` on the main chunk and every replay, whichever finishes first),
so a slow replay never stalls the main job. Decisions are taken and applied only between main-job
chunks, so every switch, rollback or adoption lands on an exact step boundary. Large state moves
through the checkpoint store; actors return records only. All side effects go through callbacks.

This file holds the loop and the main job; the rest of the controller's behaviour is in mixins over
the same state: `verification.py` (when replays start and end), `decisions.py` (verdicts into
decisions, applied on a step boundary) and `commits.py` (checkpoint commits, failures and pins).
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace

import ray

from shadow.checkpoint import open_store
from shadow.config.job import JobConfig
from shadow.config.loader import to_yaml
from shadow.config.policy import Policy
from shadow.config.policy_watch import PolicyWatcher
from shadow.controller.callbacks import RunCallback
from shadow.controller.commits import CommitsMixin
from shadow.controller.committed import CommittedSteps
from shadow.controller.decisions import DecisionsMixin
from shadow.controller.errors import ControllerError, first_line
from shadow.controller.main_job import MainJob
from shadow.controller.replays import Replay, ReplayPool
from shadow.controller.resume import ResumePoint
from shadow.controller.state import ALLOWED, Phase, RunState
from shadow.controller.summary import build_summary
from shadow.controller.verification import VerificationMixin
from shadow.policy import PolicyState, Purpose, ReplayRequest, TriggerState
from shadow.records import StepRecord


class Controller(CommitsMixin, VerificationMixin, DecisionsMixin):
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
        self.committed = CommittedSteps(resume.committed if resume else ())
        self.verdict_rows: list[dict] = list(resume.verdict_rows) if resume else []
        self.replay_steps: dict[str, int] = dict(resume.replay_steps) if resume else {}
        self.num_replays = resume.num_replays if resume else 0
        self.num_triggered_replays = resume.num_triggered_replays if resume else 0
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
        self.checkpoint_waits_s: list[float] = list(resume.checkpoint_waits_s) if resume else []
        self.judged: list[ReplayRequest] = []  # windows of this regime judged: they cover their steps for triggers
        # per purpose the newest window of this regime judged or given up: all scheduling needs (its
        # high-water marks only move forward)
        self.settled_latest: dict[Purpose, ReplayRequest] = {}
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
                      last_committed=self.committed.newest())

    def _start_main(self) -> None:
        self._check_replay_layout()
        inert = self._inert_trigger_rules(self.policy)
        if inert:  # a guard that can never fire must not look like one
            raise ControllerError("; ".join(inert))
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

    def _restart_main(self, error: Exception) -> None:
        """The main trainer's process died: start a new one from the newest checkpoint that loads."""
        restarts = self.state.num_main_restarts + 1
        limit = self.job.run.max_main_restarts
        lost_from = self.main_step
        if restarts > limit:
            raise ControllerError(f"the main trainer died {restarts} times (run.max_main_restarts={limit}); "
                                  f"last error: {first_line(error)}")
        nodes = self.main.start_group()
        self.emit("main_started", ranks=len(nodes), nodes=nodes, generation=self.main.generation)
        for step in sorted(self.committed, reverse=True):
            try:
                self.main_step = self.main.call("restore", self.store_uri, self.run_name, step, self.state.precision)
                break
            except ray.exceptions.RayTaskError as exc:  # a damaged checkpoint: fall back to the one before
                self.emit("checkpoint_rejected", step=step, error=first_line(exc))
                self.committed.discard(step)
        else:
            raise ControllerError(f"the main trainer died and no committed checkpoint of lineage "
                                  f"{self.state.lineage} could be loaded: {first_line(error)}")
        self.state = replace(self.state, lineage=self.state.lineage + 1, num_main_restarts=restarts,
                             restore_step=self.main_step, restore_run=self.run_name)
        # the steps after the restore point are trained again: their signals and windows start over
        self.trigger_state, self.triggered = TriggerState(), []
        self.judged = [r for r in self.judged if r.start_step + r.num_steps <= self.main_step]
        for step in [s for s in self.history if s >= self.main_step]:
            del self.history[step]
        self.emit("main_restarted", restart=restarts, limit=limit, step=self.main_step,
                  discarded=[self.main_step, lost_from], error=first_line(error), state=self.state.to_dict())
        self._commit_point()

    def _finish_main(self) -> None:
        self._on_checkpoint_events(self.main.leader("flush"))
        if self.history and self.job.eval.batches:
            self.final_eval_loss = self.main.leader("evaluate", self.job.eval.batches)
            self.emit("final_evaluation", step=self.main_step, eval_loss=self.final_eval_loss)

    # ----------------------------------------------------------------------------- summary
    def _summary(self) -> dict:
        history = [self.history[s] for s in sorted(self.history)]
        return build_summary(history=history, trained=self.trained, replay_steps=self.replay_steps,
                             verdicts=self.verdict_rows, triggers=self.trigger_rows,
                             num_triggered_replays=self.num_triggered_replays,
                             num_switches=self.state.num_switches,
                             final_eval_loss=self.final_eval_loss, fp8_speedup=self.job.run.fp8_speedup,
                             checkpoint_waits_s=self.checkpoint_waits_s,
                             wall_s=time.perf_counter() - self.started, phase=self.phase.value,
                             policy_state=self.state.policy_state)
