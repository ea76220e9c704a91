"""When replays start, how far they run and what happens when they end: the cadence, telemetry
triggers, non-finite losses, early stopping, retries, and replays that wait for resources.

`Verification` composes the window book (`windows.py`, the life cycle), the Ray pool (`replays.py`)
and the policy's pure scheduling and trigger functions; the controller calls it between chunks and
gets back the replays that are ready to be judged. It reads the checkpoint ledger (which checkpoints
are committed) and pins each replay's start checkpoint there.
"""

from __future__ import annotations

import math

import ray

from shadow.compare import compare
from shadow.config.job import JobConfig
from shadow.config.policy import OnSwitch, Policy
from shadow.controller.actors import ReplayResult
from shadow.controller.callbacks import EventLog, RunCallback
from shadow.controller.errors import first_line
from shadow.controller.ledger import CheckpointLedger
from shadow.controller.replays import ReplayPool
from shadow.controller.resume import ResumePoint
from shadow.controller.speed import StepTimes
from shadow.controller.windows import Replay, ReplayWindows
from shadow.policy import Firing, Machine, PolicyState, Purpose, ReplayRequest, TriggerState, due_replays, watch
from shadow.policy.early_stop import EarlyStop, early_stop
from shadow.records import StepRecord
from shadow.signals import why_never_produced


class Verification:
    def __init__(self, job: JobConfig, store_uri: str, run: str, *, ledger: CheckpointLedger, events: EventLog,
                 callbacks: list[RunCallback], regime: int, lineage: int, resume: ResumePoint | None,
                 step_times: StepTimes):
        self.job = job
        self.run = run
        self.ledger = ledger
        self.step_times = step_times  # every finished replay's step times go there
        self.events = events
        self.callbacks = callbacks
        self.pool = ReplayPool(job, store_uri, run)
        self.windows = ReplayWindows(regime=regime, lineage=lineage,
                                     num_started=resume.num_replays if resume else 0)
        self.trigger_state = TriggerState()  # the triggers' rolling windows: one FP8 regime's signals
        self.trigger_rows: list[dict] = list(resume.trigger_rows) if resume else []  # every firing
        self.num_triggered_replays = resume.num_triggered_replays if resume else 0
        self.replay_steps: dict[str, int] = dict(resume.replay_steps) if resume else {}  # replayed, by precision

    # ------------------------------------------------------------------ regimes
    def new_regime(self, regime: int, lineage: int) -> None:
        self.windows.new_regime(regime, lineage)
        self.trigger_state = TriggerState()

    def new_lineage(self, lineage: int, from_step: int) -> None:
        self.windows.new_lineage(lineage, from_step)
        self.trigger_state = TriggerState()

    # ------------------------------------------------------------------ what the main job trained
    def after_chunk(self, records: list[StepRecord], policy: Policy, policy_state: PolicyState) -> list[str]:
        """Watch the chunk's FP8 steps; returns what in them calls for a closer look (a non-finite loss,
        triggers that fired), each as a reason, for the cadence to go back to its base interval."""
        alarms = self._verify_nonfinite(records, policy)
        return alarms + self._watch_signals(records, policy, policy_state)

    def _verify_nonfinite(self, records: list[StepRecord], policy: Policy) -> list[str]:
        """A non-finite FP8 loss cannot wait for the cadence: replay its window in BF16 at once, so the
        policy judges it (a `nonfinite` verdict) whether or not a scheduled window covers the step."""
        bad = [r.step for r in records if r.precision == "fp8" and not math.isfinite(r.loss)]
        if not bad:
            return []
        alarms = [f"non-finite FP8 loss at step {bad[0]}"]
        window = policy.verify.window_steps
        start = self.ledger.committed.newest(at_or_before=bad[0])
        if (start is None or not start <= bad[0] < start + window or start + window > self.job.steps
                or self.windows.covering(bad[0]) is not None):
            return alarms
        request = ReplayRequest(start, window, policy.verify.replay_precision.value, Purpose.VERIFY)
        self.events.emit("replay_triggered", step=bad[0], reason=alarms[0], **request.to_dict())
        self._launch(request, policy, stoppable=False)
        return alarms

    def inert_trigger_rules(self, policy: Policy) -> list[str]:
        """Trigger rules this job can never fire (their signal is never produced), each with why."""
        precision = self.job.precision
        found = []
        for index, rule in enumerate(policy.triggers.rules):
            why = why_never_produced(rule.signal, telemetry_every_steps=self.job.telemetry.every_steps,
                                     backend=precision.backend.value, scaling=precision.scaling.value,
                                     num_layers=self.job.model.num_layers)
            if why is not None:
                found.append(f"triggers.rules[{index}] watches {rule.signal!r}, which this job never produces: {why}")
        return found

    def _watch_signals(self, records: list[StepRecord], policy: Policy, policy_state: PolicyState) -> list[str]:
        """Feed FP8 steps' signals to the policy's triggers (pure: `shadow.policy.triggers`); a firing
        requests a verification replay of its step."""
        if not policy.triggers.rules or policy_state.machine not in (Machine.FP8, Machine.FP8_PROBATION):
            return []
        alarms = []
        for record in records:
            if record.precision != "fp8":
                continue
            values = {**record.telemetry, "loss": record.loss, "grad_norm": record.grad_norm}
            self.trigger_state, firings = watch(policy.triggers, self.trigger_state, record.step, values)
            if firings:
                self._on_trigger(record.step, firings, policy, policy_state)
                alarms.append(f"trigger {', '.join(f.signal for f in firings)} fired at step {record.step}")
        return alarms

    def _on_trigger(self, step: int, firings: list[Firing], policy: Policy, policy_state: PolicyState) -> None:
        """Replay from the latest committed checkpoint of this regime at or before `step`, through
        `step` (at least W steps), unless a verification window of this regime covers the step."""
        window = policy.verify.window_steps
        start = self.ledger.committed.newest(at_or_before=min(step, self.job.steps - window))
        covering = self.windows.covering(step)
        request = None
        if covering is not None:
            outcome = f"already covered by the window from step {covering.start_step}"
        elif start is None:
            outcome = "no committed checkpoint at or before the step leaves room for a window"
        elif start < policy_state.since_step:  # its verdict would be ignored as another regime's
            outcome = f"no checkpoint of this regime (since step {policy_state.since_step}) at or before the step yet"
        else:
            request = ReplayRequest(start, max(window, step - start + 1), policy.verify.replay_precision.value,
                                    Purpose.VERIFY)
            outcome = f"verification replay of [{start}, {start + request.num_steps})"
        for firing in firings:
            row = {**firing.to_dict(), "replay_start": request.start_step if request else None, "outcome": outcome}
            self.trigger_rows.append(row)
            self.events.emit("trigger_fired", **row)
        if request is not None:
            self.windows.request(request)  # started by `schedule`, ahead of the cadence

    # ------------------------------------------------------------------ starting replays
    def schedule(self, policy: Policy, policy_state: PolicyState, main_step: int) -> None:
        """Start requested windows in the free slots, then what the cadence says is due."""
        num_in_flight = len(self.windows.in_flight())
        for request in self.windows.next_requested(policy.verify.max_concurrent_replays - num_in_flight):
            self._launch(request, policy, triggered=True)
        # requested windows still waiting hold back the cadence
        requests = due_replays(policy, policy_state, main_step=main_step,
                               committed_steps=self.ledger.committed.ascending,
                               in_flight=self.windows.in_flight() + self.windows.requested,
                               total_steps=self.job.steps, settled=self.windows.settled())
        for request in requests:
            self._launch(request, policy)

    def _launch(self, request: ReplayRequest, policy: Policy, *, triggered: bool = False,
                stoppable: bool = True) -> None:
        """Start a replay of `request`. Windows of the cadence may stop early; triggered ones (`triggered`,
        or not `stoppable`) run through the step that called for them, noise windows measure in full."""
        adopt = policy.action.on_switch is OnSwitch.ADOPT_REPLAY and request.purpose is Purpose.VERIFY
        stoppable = (stoppable and not triggered and policy.verify.early_stop.min_steps > 0
                     and request.purpose in (Purpose.VERIFY, Purpose.PROBE))
        replay = self.windows.open(request, save_end=adopt, run=self.run, stoppable=stoppable)
        error = self.ledger.pin(request.start_step, replay.pin)  # retention must keep its start
        if error is not None:
            self.events.emit("replay_skipped", name=replay.name, **request.to_dict(),
                             reason=f"cannot pin its checkpoint: {error}")
            return
        self.events.emit("replay_started", name=replay.name, **request.to_dict(), regime=replay.regime,
                         ranks=policy.verify.replay_resources.num_ranks, triggered=triggered)
        self.num_triggered_replays += triggered
        self.windows.start(replay)
        self.pool.start(replay, policy, *self._first_chunk(replay, policy))

    @staticmethod
    def _first_chunk(replay: Replay, policy: Policy) -> tuple[int, bool]:
        """(until_step, last) of a window's first chunk: the whole window, or for one that may stop
        early the steps before its first look (`ignore_first_steps` + `early_stop.min_steps`)."""
        first_look = (replay.request.start_step + policy.compare.ignore_first_steps
                      + policy.verify.early_stop.min_steps)
        if replay.stoppable and first_look < replay.end_step:
            return first_look, False
        return replay.end_step, True

    def report_waiting(self, policy: Policy) -> None:
        """Replays whose resources have not come after a while: said once each, never waited for."""
        resources = policy.verify.replay_resources
        for replay in self.pool.waiting_for_resources(after_s=2.0):
            self.events.emit("replay_waiting_for_resources", name=replay.name, ranks=resources.num_ranks,
                             cpus_per_rank=resources.num_cpus, gpus_per_rank=resources.num_gpus)

    def abandon_unstarted(self) -> None:
        """The main job is done: replays still without resources after a grace period are given up."""
        for replay in self.pool.abandon_unstarted(grace_s=15.0):
            self._give_up(replay, "the main job finished while it was still waiting for resources")

    # ------------------------------------------------------------------ replays that end
    def refs(self) -> list:
        return self.pool.refs()

    @property
    def num_running(self) -> int:
        return len(self.windows.running)

    def on_done(self, ref, policy: Policy, policy_state: PolicyState, main_history: dict[int, StepRecord]) -> None:
        """A rank of a replay returned. Once its chunk is complete: the window goes on, stops early, or
        (its last chunk) is finished and waits for its verdict. `main_history`: the main job's kept rows."""
        collected = self.pool.collect(ref)
        if collected is None:
            return  # other ranks of this replay are still running
        replay, chunk, error = collected
        if error is not None:
            self._on_failed(replay, error, policy)
            return
        replay.records.extend(chunk.records)
        if not chunk.last:
            self._next_chunk(replay, policy, policy_state, main_history)
            return
        result = ReplayResult(replay.records, chunk.eval_loss, chunk.end_checkpoint, chunk.wall_s, chunk.node_id,
                              chunk.device, chunk.num_ranks)
        self.step_times.add_replay(result.records, result.device, result.num_ranks)
        self.ledger.unpin(replay.request.start_step, replay.pin)
        precision = replay.request.precision
        self.replay_steps[precision] = self.replay_steps.get(precision, 0) + len(result.records)  # steps run
        for callback in self.callbacks:
            callback.on_replay_finished(replay.name, result.records)
        self.events.emit("replay_finished", name=replay.name, precision=precision, steps=len(result.records),
                         planned_steps=replay.planned_steps, stopped_early=len(result.records) < replay.planned_steps,
                         wall_s=round(result.wall_s, 3), eval_loss=result.eval_loss, node=result.node_id,
                         device=result.device, ranks=result.num_ranks)
        if not self.windows.finish(replay, result):
            self.events.emit("replay_discarded", name=replay.name,
                             reason="started before the main job's last switch; its window no longer describes the run")

    def _next_chunk(self, replay: Replay, policy: Policy, policy_state: PolicyState,
                    main_history: dict[int, StepRecord]) -> None:
        """After a chunk of a window that may stop early: stop it if its records decide it (or a switch
        made it stale: its verdict would be discarded), else train one more step."""
        trained_to = replay.request.start_step + len(replay.records)
        stale = not self.windows.is_current(replay)
        why = None if stale else self._decided(replay, policy, policy_state, main_history)
        if stale or why is not None:
            self.windows.stop_early(replay, why)
            self.events.emit("replay_stopped_early", name=replay.name, steps=len(replay.records),
                             planned_steps=replay.planned_steps,
                             **(why.to_dict() if why else {"reason": "the main job switched since it started: "
                                                           "its verdict would be discarded"}))
            self.pool.advance(replay, trained_to, last=True)
            return
        until = trained_to + 1
        self.pool.advance(replay, until, last=until >= replay.end_step)

    def _decided(self, replay: Replay, policy: Policy, policy_state: PolicyState,
                 main_history: dict[int, StepRecord]) -> EarlyStop | None:
        """Whether the steps replayed so far decide the window (`shadow.policy.early_stop`); not before
        the main job has trained them all."""
        start = replay.request.start_step
        steps = range(start, start + len(replay.records))
        main_rows = [main_history[s] for s in steps if s in main_history]
        if len(main_rows) < len(steps):
            return None
        verdict = compare(main_rows, replay.records, window=(steps.start, steps.stop),
                          ignore_first_steps=policy.compare.ignore_first_steps,
                          end_fraction=policy.compare.end_fraction)
        return early_stop(policy, policy_state, verdict, replay.planned_steps - policy.compare.ignore_first_steps)

    def _on_failed(self, replay: Replay, error: Exception, policy: Policy) -> None:
        """Retry on a healthy group up to `verify.replay_retries`, then give the window up; the main
        job never waits for it."""
        retries = policy.verify.replay_retries
        self.events.emit("replay_failed", name=replay.name, attempt=replay.attempt, retries=retries,
                         worker_died=isinstance(error, ray.exceptions.RayActorError), error=first_line(error))
        stale = not self.windows.is_current(replay)
        if replay.attempt < retries and not stale:
            self.windows.retry(replay)
            self.pool.start(replay, policy, *self._first_chunk(replay, policy))
            return
        self._give_up(replay, "the main job moved on" if stale else f"failed {replay.attempt + 1} time(s)")

    def _give_up(self, replay: Replay, reason: str) -> None:
        self.ledger.unpin(replay.request.start_step, replay.pin)
        self.windows.give_up(replay)
        self.events.emit("replay_skipped", name=replay.name, **replay.request.to_dict(), reason=reason)

    def shutdown(self) -> None:
        self.pool.shutdown()
