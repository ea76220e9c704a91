"""Verdicts into decisions, and decisions applied to the main job on a step boundary: precision
switches, rollbacks to a verified checkpoint, adoption of a replay's end state."""

from __future__ import annotations

from dataclasses import replace

from shadow.checkpoint import CheckpointError
from shadow.compare import compare
from shadow.config.loader import to_yaml
from shadow.config.policy import OnSwitch
from shadow.controller.replays import Replay
from shadow.policy import Decision, DecisionKind, decide


class DecisionsMixin:
    """Part of `Controller` (shadow/controller/controller.py); reads and writes its state."""

    def _decision_point(self) -> None:
        if self.watcher is not None:
            polled = self.watcher.poll()
            if polled.event is not None:
                event = dict(polled.event)
                self.emit(event.pop("event"), **event)
                if polled.policy is not self.policy:
                    self.policy_version += 1
                    for problem in self._inert_trigger_rules(polled.policy):
                        self.emit("trigger_rule_inert", reason=problem)
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
        self._settle(replay.request, judged=True)
        window = range(replay.request.start_step, replay.request.start_step + replay.request.num_steps)
        main_rows = [self.history[s] for s in window if s in self.history]
        main_eval = main_rows[-1].eval_loss if main_rows and main_rows[-1].step == window[-1] else None
        verdict = compare(main_rows, replay.result.records, window=(window.start, window.stop),
                          ignore_first_steps=self.policy.compare.ignore_first_steps,
                          end_fraction=self.policy.compare.end_fraction,
                          main_eval_loss=main_eval, replay_eval_loss=replay.result.eval_loss)
        outcome = decide(self.policy, self.policy_state, verdict, main_step=self.main_step)
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
        self._forget_regime_windows()
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
        self._forget_regime_windows()
        self.emit(kind, old_step=old_step, new_step=step, discarded=[min(step, keep_committed_upto), old_step],
                  reason=decision.reason, state=self.state.to_dict())
        if old_precision != "bf16":
            self.emit("precision_switched", old=old_precision, new="bf16", step=step, reason=decision.reason,
                      state=self.state.to_dict())
        self._commit_point()
        self.main_step = self.main.call("restore", self.store_uri, run, step, "bf16")
        for s in [s for s in self.history if s >= keep_committed_upto]:
            del self.history[s]
        abandoned = self.committed.drop_after(keep_committed_upto)
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
