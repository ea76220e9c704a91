"""The tracking worker against a stand-in MLflow that is down, then back: reports and waiting."""

import threading
import time

from shadow.tracking.sender import Unavailable
from shadow.tracking.spool import Spool
from shadow.tracking.worker import TrackingWorker


class FlakyMlflow:
    """Refuses connections until `up` is set; then takes every op (one metric each)."""

    def __init__(self):
        self.up = threading.Event()
        self.received: list[int] = []

    def connect(self):
        if not self.up.is_set():
            raise Unavailable("connection refused")
        return self

    def groups(self, ops):
        yield from ([op] for op in ops)

    def send(self, group):
        self.received += [op["seq"] for op in group]
        return len(group)


def _worker(tmp_path, server):
    spool = Spool(tmp_path)
    reports: list[tuple[str, dict]] = []
    worker = TrackingWorker(spool, server.connect, lambda name, payload: reports.append((name, payload)), "mlflow")
    return spool, worker, reports


def test_wait_sent_sees_a_recovery_and_the_backlog_go_out(tmp_path):
    server = FlakyMlflow()
    spool, worker, reports = _worker(tmp_path, server)
    for i in range(3):
        spool.append({"op": "log", "run": "main", "metrics": [["train/loss", float(i), 0, i]]})
    worker.start()
    deadline = time.monotonic() + 10
    while worker.degraded_since is None:
        assert time.monotonic() < deadline, "the worker never noticed the outage"
        time.sleep(0.01)
    threading.Timer(0.3, server.up.set).start()  # MLflow comes back while the run is ending
    assert worker.wait_sent(10.0)
    assert server.received == [1, 2, 3] and spool.num_pending() == 0
    assert [name for name, _ in reports] == ["tracking_degraded", "tracking_restored"]
    assert reports[1][1]["backfilled_ops"] == 3
    assert worker.close(1.0) == 0


def test_wait_sent_gives_up_after_its_timeout_while_mlflow_stays_down(tmp_path):
    server = FlakyMlflow()
    spool, worker, reports = _worker(tmp_path, server)
    spool.append({"op": "log", "run": "main", "metrics": [["train/loss", 1.0, 0, 0]]})
    worker.start()
    started = time.monotonic()
    assert not worker.wait_sent(0.5)
    assert time.monotonic() - started >= 0.5
    assert spool.num_pending() == 1 and [name for name, _ in reports] == ["tracking_degraded"]
    assert worker.close(0.2) == 1
