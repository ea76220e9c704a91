"""Send what a run left in its spool, plus extra artifacts, to the MLflow runs it is attached to.

Used by `shadow report` on a finished run: it logs the report PNG to the parent run, and anything
the run could not send before it ended (MLflow was down) goes out first, in order.
"""

from __future__ import annotations

import sys
from pathlib import Path

from shadow.rundir import read_events
from shadow.tracking.keys import MAIN
from shadow.tracking.sender import MlflowSender
from shadow.tracking.spool import Spool
from shadow.tracking.state import TrackingState
from shadow.tracking.tracker import bound_http_requests
from shadow.tracking.uri import redact, resolve_tracking_uri
from shadow.tracking.worker import TrackingWorker

SEND_TIMEOUT_S = 10.0  # a command-line user waits this long for an MLflow that does not answer


def send_to_attached_run(run_dir: Path, artifacts: list[Path], tracking_uri: str | None = None) -> str:
    """Log `artifacts` to the run's parent MLflow run after its spooled backlog; returns what happened."""
    run_dir = Path(run_dir)
    state = TrackingState.load(run_dir)
    if state is None or state.parent_run_id is None:
        return "MLflow: no run attached (no mlflow.json with a parent run in the run directory)"
    events = read_events(run_dir)
    if not any(e["event"] == "run_finished" for e in events):
        return "MLflow: the run has not finished; its tracker logs the report itself when it ends"
    uri = resolve_tracking_uri(tracking_uri, run_dir, state.tracking_uri)
    if redact(uri) != state.tracking_uri:
        return (f"MLflow: the run was tracked at {state.tracking_uri}, not {redact(uri)}; "
                f"pass --tracking-uri to log the report there")
    bound_http_requests()
    spool = Spool(run_dir)
    for path in artifacts:
        spool.append({"op": "artifact", "run": MAIN, "path": str(Path(path).absolute()), "dir": ""})
    worker = TrackingWorker(spool, lambda: MlflowSender(uri, run_dir, state),
                            lambda name, payload: print(f"tracking: {name}: {payload}", file=sys.stderr),
                            state.tracking_uri)
    worker.start()
    left = worker.close(SEND_TIMEOUT_S)
    spool.close()
    if left:
        return f"MLflow: {state.tracking_uri} did not answer; {left} operation(s) stay in {spool.path} for next time"
    return f"MLflow: logged to run {state.parent_run_id} at {state.tracking_uri}"
