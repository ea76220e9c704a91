"""`MlflowTracker`: the controller's only MLflow writer, as a `RunCallback`.

Each callback becomes ops appended to the run directory's spool (a line write on the controller
thread); a worker thread sends them with `log_batch` (`worker.py`, `sender.py`). So the controller
loop never waits for MLflow, and an MLflow outage costs only a delay: the run goes on, a
`tracking_degraded` event is written, and the backlog is backfilled once the server answers
(`tracking_restored`). The tracker's own events reach events.jsonl through `bind(emit)`, on the
controller thread, at the next callback.

What goes where is in docs/tracking.md. In short: the parent run (the main job) gets every
trained row (`train/*`, `eval/loss`, `shadow/precision`, `shadow/lineage`), verdict fields at each
window end (`shadow/gap_*`), decisions, switches and rollbacks as metrics and tags, the job and
policy as params, and the run directory's files as artifacts; each replay gets a child run with the
same `train/*` keys at the same steps.
"""

from __future__ import annotations

import functools
import os
import queue
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import yaml

from shadow.config import flatten
from shadow.controller.callbacks import RunCallback
from shadow.records import StepRecord
from shadow.rundir import EVENTS, SUMMARY, read_events
from shadow.tracking import keys
from shadow.tracking.keys import MAIN
from shadow.tracking.sender import MlflowSender
from shadow.tracking.spool import Spool
from shadow.tracking.state import TrackingState
from shadow.tracking.uri import redact, resolve_tracking_uri
from shadow.tracking.worker import TrackingWorker

REPORT_PNG = "report.png"
CLOSE_TIMEOUT_S = 30.0  # at the end of a run, how long to keep trying to send what is left
EVENTS_UPLOAD_EVERY_S = 60.0  # events.jsonl is re-uploaded at commit points at most this often
_RUN_STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
_DISCARDING = ("rollback", "replay_adopted", "main_restarted")  # events whose `discarded` range was trained in vain


def _never_fails(method):
    """Tracking must never fail a run: an unexpected error in a callback is printed (in full the first
    time, as one line after that) and skipped."""
    @functools.wraps(method)
    def guarded(self, *args):
        try:
            return method(self, *args)
        except Exception as exc:
            self.num_callback_errors += 1
            detail = traceback.format_exc() if self.num_callback_errors == 1 else f"{type(exc).__name__}: {exc}"
            print(f"tracking: {method.__name__} failed; the run goes on without it: {detail}", file=sys.stderr)
    return guarded


class MlflowTracker(RunCallback):
    def __init__(self, run_dir: str | os.PathLike, *, experiment: str, tracking_uri: str | None = None,
                 resumed: bool = False):
        self.run_dir = Path(run_dir)
        bound_http_requests()
        stored = TrackingState.load(self.run_dir)
        uri = resolve_tracking_uri(tracking_uri, self.run_dir, stored.tracking_uri if stored else None)
        self.uri_for_humans = redact(uri)
        if stored is not None and stored.tracking_uri == self.uri_for_humans:
            self.state = stored
        else:  # a new run, or a resumed one sent elsewhere: new runs there, found by the same run-dir id
            self.state = TrackingState(self.uri_for_humans, experiment,
                                       **({"run_dir_id": stored.run_dir_id} if stored else {}))
            self.state.save(self.run_dir)
        self.resumed = resumed
        self._close_deadline: float | None = None  # set when the run starts ending
        self.num_callback_errors = 0
        self.spool = Spool(self.run_dir)
        self._reports: queue.SimpleQueue = queue.SimpleQueue()
        self._emit: Callable[..., dict] | None = None
        self._delivering = False
        self.main_step = 0
        self.windows: dict[str, tuple[int, int]] = {}  # replay name -> (start, num_steps)
        self.discarded: list[str] = []
        self.last_events_upload = time.monotonic()
        self.worker = TrackingWorker(self.spool, lambda: MlflowSender(uri, self.run_dir, self.state),
                                     lambda name, payload: self._reports.put((name, payload)), self.uri_for_humans)
        self._start_parent()
        self.worker.start()

    def bind(self, emit: Callable[..., dict]) -> None:
        """`emit(event_name, **payload)` (the controller's): how tracking_* events reach events.jsonl."""
        self._emit = emit

    # ------------------------------------------------------------------------------ ops
    def _op(self, op: str, run: str, **fields) -> None:
        self.spool.append({"op": op, "run": run, **fields})

    def _log(self, run: str, *, metrics=(), params=None, tags=None) -> None:
        fields = {"metrics": list(metrics)} if metrics else {}
        if params:  # redacted: a URI with credentials in the job (a store, an endpoint) stays out of MLflow
            fields["params"] = {k: redact(v) for k, v in params.items()}
        if tags:
            fields["tags"] = {k: keys.tag_value(redact(str(v))) for k, v in tags.items() if v is not None}
        if fields:
            self._op("log", run, **fields)

    def _start_parent(self) -> None:
        self._op("start_run", MAIN, name=self.run_dir.name, parent=None, time_ms=_now_ms(),
                 tags={"shadow.run_dir": str(self.run_dir.absolute()), "shadow.tracking_uri": self.uri_for_humans})
        if self.resumed:
            self._continue_after_resume()
            return
        job_path = self.run_dir / "job.yaml"
        if job_path.exists():
            self._log(MAIN, params=keys.flatten_params("job", yaml.safe_load(job_path.read_text()) or {}))
            self._op("artifact", MAIN, path="job.yaml", dir="")

    def _continue_after_resume(self) -> None:
        """Take up the discarded ranges logged so far, and close the runs of the replays that were in flight
        when the driver died (they never report) instead of leaving them RUNNING."""
        events = read_events(self.run_dir)
        self.discarded = [_discarded_range(e) for e in events if e["event"] in _DISCARDING]
        done = {e["name"] for e in events if e["event"] in ("verdict", "replay_discarded", "replay_skipped")}
        for event in events:
            if event["event"] == "replay_started" and event["name"] not in done:
                self._log(event["name"], tags={"shadow.verdict": "lost: the driver died while it ran"})
                self._op("end_run", event["name"], status="KILLED", time_ms=_now_ms())

    # ------------------------------------------------------------------------------ callbacks
    @_never_fails
    def on_event(self, event: dict) -> None:
        handler = getattr(self, f"_on_{event['event']}", None)
        if handler is not None:
            handler(event, _now_ms())

    @_never_fails
    def on_main_records(self, records: list[StepRecord]) -> None:
        if records:
            now = _now_ms()
            self._log(MAIN, metrics=[m for r in records for m in keys.record_metrics(r, now, main=True)])
            self.main_step = records[-1].step + 1
        self._deliver_reports()

    @_never_fails
    def on_replay_finished(self, name: str, records: list[StepRecord]) -> None:
        now = _now_ms()
        self._log(name, metrics=[m for r in records for m in keys.record_metrics(r, now, main=False)])

    @_never_fails
    def on_commit_point(self) -> None:
        self.spool.sync()
        if time.monotonic() - self.last_events_upload >= EVENTS_UPLOAD_EVERY_S:
            self._op("artifact", MAIN, path=EVENTS, dir="")
            self.last_events_upload = time.monotonic()
        self._deliver_reports()

    @_never_fails
    def on_policy(self, version: int, policy_yaml: str) -> None:
        if version == 1 and not self.resumed:
            self._log(MAIN, params=keys.flatten_params("policy", yaml.safe_load(policy_yaml) or {}))
        self._log(MAIN, metrics=[["shadow/policy_version", float(version), _now_ms(), self.main_step]],
                  tags={"shadow.policy_version": version})
        self._op("artifact", MAIN, path=f"policy-v{version}.yaml", dir="policy")

    @_never_fails
    def on_ending(self) -> None:
        """After an outage, give the backlog its chance to go out while events.jsonl is still open, so
        a recovery in the run's last seconds is a `tracking_restored` event like any other. The wait
        comes out of the run's one `CLOSE_TIMEOUT_S` budget for tracking at the end."""
        self._close_deadline = time.monotonic() + CLOSE_TIMEOUT_S
        if self.worker.degraded_since is not None:
            self.worker.wait_sent(CLOSE_TIMEOUT_S)
        self._deliver_reports()

    @_never_fails
    def on_finish(self, summary: dict) -> None:
        self._deliver_reports()
        now = _now_ms()
        final = [[f"summary/{k}", float(v), now, summary.get("final_step", 0)] for k, v in _numbers(summary).items()]
        self._log(MAIN, metrics=final, tags={"shadow.phase": summary.get("phase", "")})
        self._render_report()
        for name, folder in ((EVENTS, ""), (SUMMARY, ""), (REPORT_PNG, "")):
            self._op("artifact", MAIN, path=name, dir=folder)
        self._op("end_run", MAIN, status=_RUN_STATUS.get(summary.get("phase"), "FINISHED"), time_ms=_now_ms())
        self.spool.sync()
        deadline = self._close_deadline or time.monotonic() + CLOSE_TIMEOUT_S
        left = self.worker.close(max(1.0, deadline - time.monotonic()))
        self.spool.close()
        if left:
            print(f"tracking: {left} operation(s) not yet in MLflow at {self.uri_for_humans}; they are kept in "
                  f"{self.spool.path} and sent by `shadow report {self.run_dir}` once MLflow answers", file=sys.stderr)

    def _render_report(self) -> None:
        try:
            from shadow.report import render_png

            render_png(self.run_dir, self.run_dir / REPORT_PNG)
        except Exception as exc:  # the plot is a nicety: its failure must not cost the rest
            print(f"tracking: report plot not made ({type(exc).__name__}: {exc})", file=sys.stderr)

    def _deliver_reports(self) -> None:
        """The worker's status reports, as events, on the controller thread (never from inside an emit)."""
        if self._delivering:
            return
        self._delivering = True
        try:
            while not self._reports.empty():
                name, payload = self._reports.get()
                print(f"tracking: {name}: {payload}", file=sys.stderr)
                if self._emit is not None:
                    self._emit(name, **payload)
        finally:
            self._delivering = False

    # ------------------------------------------------------------------------------ events
    def _on_run_started(self, event: dict, now: int) -> None:
        self._log(MAIN, tags={"shadow.job": event.get("job"), "shadow.precision": event.get("precision"),
                              "shadow.policy_path": event.get("policy_path"),
                              "shadow.store_uri": redact(str(event.get("store_uri")))})

    def _on_fp8_layers(self, event: dict, now: int) -> None:
        if self.resumed:  # logged by the run's first driver; params cannot change
            return
        self._log(MAIN, params=keys.flatten_params("model_layers", {
            "factory": event["factory"], "block_class": event["block_class"], "num_blocks": event["num_blocks"],
            "num_fp8": event["num_fp8"], "num_linear": event["num_linear"], "fp8": ",".join(event["fp8"])}))

    def _on_controller_phase(self, event: dict, now: int) -> None:
        self._log(MAIN, tags={"shadow.phase": event["new"]})

    def _on_replay_started(self, event: dict, now: int) -> None:
        name = event["name"]
        self.windows[name] = (event["start_step"], event["num_steps"])
        self._op("start_run", name, parent=MAIN, time_ms=now, tags=keys.replay_tags(event),
                 name=keys.replay_run_name(event["purpose"], event["precision"], event["start_step"]))

    def _on_replay_finished(self, event: dict, now: int) -> None:
        metrics = []
        if event.get("eval_loss") is not None and event["name"] in self.windows:
            start, num_steps = self.windows[event["name"]]  # held-out loss after the window's last step,
            metrics.append(["eval/loss", float(event["eval_loss"]), now, start + num_steps - 1])  # as main rows
        self._log(event["name"], metrics=metrics, tags={"shadow.wall_s": event.get("wall_s")})

    def _on_replay_discarded(self, event: dict, now: int) -> None:
        self._log(event["name"], tags={"shadow.verdict": "discarded", "shadow.discarded_reason": event.get("reason")})
        self._op("end_run", event["name"], status="FINISHED", time_ms=now)

    def _on_verdict(self, event: dict, now: int) -> None:
        metrics = keys.verdict_metrics(event, now)
        self._log(MAIN, metrics=metrics)
        self._log(event["name"], metrics=metrics, tags={
            "shadow.verdict": event["level"], "shadow.verdict_kind": event.get("kind"),
            "shadow.verdict_metric": f"{event['metric']}={event['value']}"})
        self._op("end_run", event["name"], status="FINISHED", time_ms=now)

    def _on_decision(self, event: dict, now: int) -> None:
        step = event.get("payload", {}).get("window_end", self.main_step)
        kind = event["kind"]
        tags = {"shadow.last_decision": f"{kind}: {event.get('reason', '')}"}
        machine = event.get("state", {}).get("policy_state", {}).get("machine")
        if machine:
            tags["shadow.state"] = machine
        self._log(MAIN, metrics=[[keys.metric_key(f"shadow/decision/{kind}"), 1.0, now, step]], tags=tags)
        if kind != "note" and event.get("name"):
            self._log(event["name"], tags={"shadow.decision": kind})

    def _on_trigger_fired(self, event: dict, now: int) -> None:
        """A trigger as a marker on the main run's step axis, and which signal it was in a tag."""
        self._log(MAIN, metrics=[["shadow/trigger_fired", 1.0, now, event["step"]]],
                  tags={"shadow.last_trigger": f"{event['signal']} {event['test']} at step {event['step']}: "
                                               f"value {event['value']}, threshold {event['threshold']}"})

    def _on_precision_switched(self, event: dict, now: int) -> None:
        metrics = [["shadow/switch", keys.PRECISION_CODE[event["new"]], now, event["step"]]]
        num_precision_switches = event.get("state", {}).get("num_precision_switches")
        if num_precision_switches is not None:
            metrics.append(["shadow/num_precision_switches", float(num_precision_switches), now, event["step"]])
        self._log(MAIN, metrics=metrics, tags={"shadow.precision": event["new"]})

    def _on_rollback(self, event: dict, now: int) -> None:
        first, end = event["discarded"]
        self._discard(event, [["shadow/rollback", float(end - first), now, event["old_step"]]])
        self.main_step = event["new_step"]

    _on_replay_adopted = _on_rollback

    def _on_main_restarted(self, event: dict, now: int) -> None:
        """The main trainer died and went on from its last checkpoint: like a rollback without a switch."""
        self._discard(event, [["shadow/main_restarted", float(event.get("restart", 1)), now, event["step"]]])
        self.main_step = event["step"]

    def _discard(self, event: dict, metrics: list[list]) -> None:
        self.discarded.append(_discarded_range(event))
        self._log(MAIN, metrics=metrics, tags={"shadow.discarded": "; ".join(self.discarded)})

    def _on_replay_failed(self, event: dict, now: int) -> None:
        if event["name"] in self.windows:
            self._log(event["name"], tags={"shadow.failed_attempts": event.get("attempt", 0) + 1,
                                           "shadow.last_error": event.get("error")})

    def _on_replay_skipped(self, event: dict, now: int) -> None:
        if event["name"] in self.windows:  # skipped after it started (it kept failing): close its run
            self._log(event["name"], tags={"shadow.verdict": f"skipped: {event.get('reason')}"})
            self._op("end_run", event["name"], status="FAILED", time_ms=now)

    def _on_replay_triggered(self, event: dict, now: int) -> None:
        self._log(MAIN, metrics=[["shadow/replay_triggered", 1.0, now, event["step"]]],
                  tags={"shadow.last_trigger": event.get("reason")})

    def _on_policy_rejected(self, event: dict, now: int) -> None:
        self._log(MAIN, metrics=[["shadow/policy_rejected", 1.0, now, self.main_step]],
                  tags={"shadow.policy_rejected": event.get("error")})

    def _on_resumed(self, event: dict, now: int) -> None:
        self.main_step = event["step"]
        self._log(MAIN, metrics=[["shadow/resumed", 1.0, now, event["step"]]],
                  tags={"shadow.resumed_at_step": event["step"]})

    def _on_final_evaluation(self, event: dict, now: int) -> None:
        if event.get("eval_loss") is not None:
            self._log(MAIN, metrics=[["eval/final_loss", float(event["eval_loss"]), now, max(event["step"] - 1, 0)]])

    def _on_tracking_degraded(self, event: dict, now: int) -> None:
        self._log(MAIN, tags={"shadow.tracking": f"degraded since {time.strftime('%Y-%m-%d %H:%M:%S')}"})

    def _on_tracking_restored(self, event: dict, now: int) -> None:
        self._log(MAIN, tags={"shadow.tracking": f"restored after {event.get('outage_s')} s, backfilled"})


def _discarded_range(event: dict) -> str:
    first, end = event["discarded"]
    return f"[{first}, {end}) by {event['event']} at step {end}"


def _numbers(summary: dict) -> dict[str, float]:
    """The summary's numeric fields, nested ones flattened (`effective_speedup_wall`); not the policy state."""
    flat = flatten({k: v for k, v in summary.items() if k != "policy_state"}, sep="_")
    return {keys.metric_key(k): float(v) for k, v in flat.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def bound_http_requests() -> None:
    """MLflow's client retries a failed request 7 times with exponential backoff (minutes) and waits 120 s
    for an answer. The worker retries on its own schedule, so one short attempt each, unless set by the user."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def _now_ms() -> int:
    return int(time.time() * 1000)
