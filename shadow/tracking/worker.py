"""The tracking worker: a background thread that sends the spool to MLflow, so the controller loop
never waits for MLflow.

It wakes every `FLUSH_INTERVAL_S`, sends every pending op in order and acknowledges it. When MLflow
cannot be reached or fails, it reports `tracking_degraded` once, keeps everything spooled and tries
again after a pause that doubles from 0.5 s to 5 s; when the backlog has gone out it reports
`tracking_restored`. An op MLflow refuses is reported (`tracking_rejected`) and dropped, alone: a
refused merged batch is retried op by op. `report(event_name, payload)` must be thread-safe; the
tracker turns these reports into events on the controller thread.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from shadow.tracking.sender import MlflowSender, Rejected, Unavailable
from shadow.tracking.spool import Spool
from shadow.tracking.uri import redact

FLUSH_INTERVAL_S = 1.0
RETRY_PAUSE_S = (0.5, 5.0)  # first pause after a failure, longest pause
OPS_PER_PASS = 500

Report = Callable[[str, dict], None]


class TrackingWorker:
    def __init__(self, spool: Spool, connect: Callable[[], MlflowSender], report: Report, uri_for_humans: str):
        self.spool = spool
        self._connect = connect
        self._report = report
        self.uri_for_humans = uri_for_humans
        self._thread = threading.Thread(target=self._run, name="shadow-mlflow", daemon=True)
        self._wake = threading.Event()
        self._deadline: float | None = None  # set by close(): give up retrying after this
        self.degraded_since: float | None = None
        self._backfilled_ops = 0
        self._backfilled_metrics = 0

    def start(self) -> None:
        self._thread.start()

    def wait_sent(self, timeout_s: float) -> bool:
        """Retry now and wait, at most `timeout_s`, until the spool has gone out; whether it has."""
        deadline = time.monotonic() + timeout_s
        self._wake.set()
        while time.monotonic() < deadline:
            if self.degraded_since is None and self.spool.num_pending() == 0:
                return True
            time.sleep(0.05)
        return False

    def close(self, timeout_s: float) -> int:
        """Send what is pending, waiting at most `timeout_s`; returns the number of ops left in the spool."""
        self._deadline = time.monotonic() + timeout_s
        self._wake.set()
        self._thread.join(timeout_s + 1.0)
        return self.spool.num_pending()

    def _run(self) -> None:
        sender = None
        pause = RETRY_PAUSE_S[0]
        while True:
            try:
                if sender is None:
                    sender = self._open_sender()
                self._drain(sender)
                pause = RETRY_PAUSE_S[0]
                if self._deadline is not None:
                    return
                self._sleep(FLUSH_INTERVAL_S)
            except Unavailable as exc:
                self._on_unavailable(str(exc))
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    return
                self._sleep(pause)
                pause = min(2 * pause, RETRY_PAUSE_S[1])

    def _sleep(self, seconds: float) -> None:
        if self._deadline is not None:
            seconds = min(seconds, max(0.0, self._deadline - time.monotonic()))
        self._wake.wait(seconds)
        if self._deadline is None:
            self._wake.clear()

    def _open_sender(self) -> MlflowSender:
        try:
            return self._connect()
        except Exception as exc:  # a URI MLflow cannot open is an outage too: everything stays spooled
            raise Unavailable(redact(f"{type(exc).__name__}: {str(exc).strip()[:400]}")) from None

    def _drain(self, sender: MlflowSender) -> None:
        while ops := self.spool.pending(OPS_PER_PASS):
            for group in sender.groups(ops):
                num_metrics = self._send(sender, group)
                self.spool.ack(group[-1]["seq"])
                if self.degraded_since is not None:
                    self._backfilled_ops += len(group)
                    self._backfilled_metrics += num_metrics
        if self.degraded_since is not None:
            self._report("tracking_restored", {
                "uri": self.uri_for_humans, "outage_s": round(time.time() - self.degraded_since, 3),
                "backfilled_ops": self._backfilled_ops, "backfilled_metrics": self._backfilled_metrics})
            self.degraded_since = None

    def _send(self, sender: MlflowSender, group: list[dict]) -> int:
        try:
            return sender.send(group)
        except Rejected as exc:
            if len(group) > 1:
                return sum(self._send(sender, [op]) for op in group)
            self._report("tracking_rejected", {"op": group[0]["op"], "run": group[0]["run"], "reason": str(exc)})
            return 0

    def _on_unavailable(self, reason: str) -> None:
        if self.degraded_since is not None:
            return
        self.degraded_since = time.time()
        self._backfilled_ops = self._backfilled_metrics = 0
        self._report("tracking_degraded", {"uri": self.uri_for_humans, "reason": reason,
                                           "pending_ops": self.spool.num_pending(), "spool": str(self.spool.path)})
