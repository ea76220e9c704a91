"""When replays start and what happens when they end: the fixed cadence, telemetry triggers,
non-finite losses, retries, and replays that wait for resources."""

from __future__ import annotations

import math

import ray

from shadow.checkpoint import CheckpointError
from shadow.config.policy import OnSwitch, Policy
from shadow.controller.errors import first_line
from shadow.controller.replays import Replay
from shadow.policy import Firing, Machine, Purpose, ReplayRequest, TriggerState, due_replays, watch
from shadow.records import StepRecord
from shadow.signals import why_never_produced


class VerificationMixin:
    """Part of `Controller` (shadow/controller/controller.py); reads and writes its state."""

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

    def _inert_trigger_rules(self, policy: Policy) -> list[str]:
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
        """Replay from the latest committed checkpoint of this regime at or before `step`, through
        `step` (at least W steps), unless a verification window that will be judged covers the step."""
        window = self.policy.verify.window_steps
        start = self.committed.newest(at_or_before=min(step, self.job.steps - window))
        taken = [r.request for r in [*self.pool.running, *self.finished]] + self.judged + self.triggered
        covering = next((r for r in taken if r.purpose is Purpose.VERIFY
                         and r.start_step <= step < r.start_step + r.num_steps), None)
        request = None
        if covering is not None:
            outcome = f"already covered by the window from step {covering.start_step}"
        elif start is None:
            outcome = "no committed checkpoint at or before the step leaves room for a window"
        elif start < self.policy_state.since_step:  # its verdict would be ignored as another regime's
            outcome = (f"no checkpoint of this regime (since step {self.policy_state.since_step}) at or before "
                       f"the step yet")
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

    def _schedule_replays(self) -> None:
        # finished replays still waiting for their verdict count as in flight: their window is taken
        in_flight = [r.request for r in [*self.pool.running, *self.finished]]
        # triggered windows take the next free slots; while they wait, they hold back the cadence
        while self.triggered and len(in_flight) < self.policy.verify.max_concurrent_replays:
            in_flight.append(self.triggered.pop(0))
            self._launch_replay(in_flight[-1], triggered=True)
        requests = due_replays(self.policy, self.policy_state, main_step=self.main_step,
                               committed_steps=self.committed.ascending, in_flight=in_flight + self.triggered,
                               total_steps=self.job.steps, settled=list(self.settled_latest.values()))
        for request in requests:
            self._launch_replay(request)

    def _forget_regime_windows(self) -> None:
        """A switch starts a regime: the old one's windows neither cover steps nor hold back the cadence."""
        self.judged, self.settled_latest, self.triggered = [], {}, []

    def _settle(self, request: ReplayRequest, *, judged: bool) -> None:
        """A window of this regime was judged (or noted) or given up: it is never scheduled again. Only
        a judged one covers its steps for triggers."""
        if judged:
            self.judged.append(request)
        latest = self.settled_latest.get(request.purpose)
        if latest is None or request.start_step > latest.start_step:
            self.settled_latest[request.purpose] = request

    def _launch_replay(self, request: ReplayRequest, *, triggered: bool = False) -> None:
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
                  ranks=self.policy.verify.replay_resources.num_ranks, triggered=triggered)
        self.num_triggered_replays += triggered
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
                  worker_died=isinstance(error, ray.exceptions.RayActorError), error=first_line(error))
        stale = replay.regime != self.state.regime or replay.lineage != self.state.lineage
        if replay.attempt < retries and not stale:
            replay.attempt += 1
            self._start(replay)
            return
        self._give_up(replay, "the main job moved on" if stale else f"failed {replay.attempt + 1} time(s)")

    def _give_up(self, replay: Replay, reason: str) -> None:
        self._unpin(replay.request.start_step, replay.pin)
        self._settle(replay.request, judged=False)
        self.emit("replay_skipped", name=replay.name, **replay.request.to_dict(), reason=reason)
