"""Live progress of `shadow run` on the console: a line per chunk and per notable event."""

from __future__ import annotations

import sys

from shadow.controller.callbacks import RunCallback
from shadow.records import StepRecord

_SHOWN = {"verdict", "precision_switched", "rollback", "replay_adopted", "policy_reloaded", "policy_rejected",
          "replay_discarded", "resumed", "controller_phase"}


class ConsoleProgress(RunCallback):
    def __init__(self, total_steps: int, stream=None):
        self.total_steps = total_steps
        self.stream = stream or sys.stderr
        self.last_verdict = "none yet"

    def on_main_records(self, records: list[StepRecord]) -> None:
        if not records:
            return
        last = records[-1]
        self._print(f"step {last.step + 1}/{self.total_steps}  loss {last.loss:.4f}  {last.precision}  "
                    f"{last.step_time_s * 1000:.0f} ms/step  last verdict: {self.last_verdict}")

    def on_event(self, event: dict) -> None:
        kind = event["event"]
        if kind == "verdict":
            value = event["value"]
            shown = f"{value:+.4f}" if isinstance(value, float) else str(value)
            stopped = event.get("stopped_early")
            self.last_verdict = (f"{event['purpose']} [{event['window_start']}, {event['window_end']}) "
                                 f"{event['metric']}={shown} {event['level']}"
                                 + (f" (stopped early at {stopped['steps']} of {stopped['planned_steps']} steps)"
                                    if stopped else ""))
            self._print(f"verdict: {self.last_verdict}")
        elif kind == "decision" and event["kind"] != "note":
            self._print(f"decision: {event['kind']}: {event['reason']}")
        elif kind in _SHOWN and kind != "verdict":
            details = {k: v for k, v in event.items() if k not in ("event", "time_unix", "state", "changes")}
            self._print(f"{kind}: {details}")

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)
