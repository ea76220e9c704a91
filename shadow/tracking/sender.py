"""Carries spooled ops out against MLflow: experiment and runs found or created, logs split into
`log_batch` calls within MLflow's limits, artifacts uploaded from the run directory.

Ops (plain dicts, see `MlflowTracker`): `start_run` (key, name, parent key, tags), `log` (key,
metrics, params, tags), `artifact` (key, path relative to the run directory, artifact folder),
`end_run` (key, status). A run is addressed by its key ("main" or a replay's name) until MLflow has
given it an id; the ids are kept in `mlflow.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from shadow.tracking import keys
from shadow.tracking.state import TrackingState
from shadow.tracking.uri import EMBEDDED_ARTIFACTS, is_embedded, redact

# The server understood the request and refused it for good: retrying cannot help.
_REFUSED = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST",
            "INVALID_STATE"}


class Unavailable(Exception):
    """MLflow could not be reached or failed; the op stays spooled and is tried again."""


class Rejected(Exception):
    """MLflow refused the op (a value it does not accept, a run deleted meanwhile): it is dropped."""


class MlflowSender:
    def __init__(self, uri: str, run_dir: Path, state: TrackingState):
        self.uri = uri
        self.run_dir = Path(run_dir)
        self.state = state
        self.client = MlflowClient(uri)

    def groups(self, ops: list[dict]) -> Iterator[list[dict]]:
        """Consecutive `log` ops of one run go out together; every other op alone."""
        group: list[dict] = []
        for op in ops:
            if group and (op["op"] != "log" or group[-1]["op"] != "log" or op["run"] != group[-1]["run"]):
                yield group
                group = []
            group.append(op)
        if group:
            yield group

    def send(self, group: list[dict]) -> int:
        """Carry out one group; returns the number of metric values it held. Raises Unavailable or Rejected."""
        try:
            return self._send(group)
        except Rejected:
            raise
        except MlflowException as exc:
            if exc.error_code in _REFUSED:
                raise Rejected(redact(_first_line(exc))) from None
            raise Unavailable(redact(_first_line(exc))) from None
        except Exception as exc:  # network, database, artifact store: whatever it is, try again later
            raise Unavailable(redact(_first_line(exc))) from None

    def _send(self, group: list[dict]) -> int:
        op = group[0]
        kind = op["op"]
        if kind == "start_run":
            self._start_run(op)
            return 0
        run_id = self._run_id(op["run"])
        if kind == "log":
            return self._log(run_id, group)
        if kind == "artifact":
            path = self.run_dir / op["path"]
            if path.exists():  # a file that was never written (e.g. no report) has nothing to upload
                self.client.log_artifact(run_id, str(path), op.get("dir") or None)
            return 0
        if kind == "end_run":
            self.client.set_terminated(run_id, op["status"], op["time_ms"])
            return 0
        raise AssertionError(f"unknown tracking op {kind!r}")

    def _log(self, run_id: str, group: list[dict]) -> int:
        metrics = [Metric(k, v, ts, step) for op in group for k, v, ts, step in op.get("metrics", [])]
        params = {k: v for op in group for k, v in op.get("params", {}).items()}
        tags = {k: v for op in group for k, v in op.get("tags", {}).items()}
        for batch in _batches(metrics, [Param(k, v) for k, v in params.items()],
                              [RunTag(k, v) for k, v in tags.items()]):
            self.client.log_batch(run_id, *batch, synchronous=True)
        return len(metrics)

    def _start_run(self, op: dict) -> None:
        key = op["run"]
        run_id = self.state.runs.get(key) or self._find(key)
        if run_id is not None:  # sent before (a retry, or a resumed run): open it again
            self.client.update_run(run_id, status="RUNNING")
        else:
            tags = {**op.get("tags", {}), "shadow.run_dir_id": self.state.run_dir_id, "shadow.run_key": key}
            if op.get("parent"):
                tags["mlflow.parentRunId"] = self._run_id(op["parent"])
            run = self.client.create_run(self._experiment_id(), start_time=op["time_ms"], tags=tags,
                                         run_name=op["name"])
            run_id = run.info.run_id
        self.state.runs[key] = run_id
        self.state.save(self.run_dir)

    def _run_id(self, key: str) -> str:
        run_id = self.state.runs.get(key) or self._find(key)
        if run_id is None:
            raise Rejected(f"no MLflow run for {key!r} (its start was refused or never spooled)")
        self.state.runs[key] = run_id
        return run_id

    def _find(self, key: str) -> str | None:
        """The run created for `key` by an earlier attempt whose answer was lost, if any."""
        filter_string = (f"tags.`shadow.run_dir_id` = '{self.state.run_dir_id}' "
                         f"and tags.`shadow.run_key` = '{key}'")
        runs = self.client.search_runs([self._experiment_id()], filter_string=filter_string, max_results=1)
        return runs[0].info.run_id if runs else None

    def _experiment_id(self) -> str:
        if self.state.experiment_id is None:
            experiment = self.client.get_experiment_by_name(self.state.experiment)
            if experiment is not None:
                self.state.experiment_id = experiment.experiment_id
            else:
                location = ((self.run_dir.absolute() / EMBEDDED_ARTIFACTS).as_uri()
                            if is_embedded(self.uri, self.run_dir) else None)
                self.state.experiment_id = self.client.create_experiment(self.state.experiment, location)
            self.state.save(self.run_dir)
        return self.state.experiment_id


def _batches(metrics: list, params: list, tags: list) -> Iterator[tuple[list, list, list]]:
    """Split into log_batch calls: <= 1000 metrics, <= 100 params + tags, <= 1000 entities per call."""
    while metrics or params or tags:
        tag_room = keys.MAX_PARAMS_TAGS_PER_BATCH
        batch_params, params = params[:tag_room], params[tag_room:]
        tag_room -= len(batch_params)
        batch_tags, tags = tags[:tag_room], tags[tag_room:]
        metric_room = min(keys.MAX_METRICS_PER_BATCH,
                          keys.MAX_ENTITIES_PER_BATCH - len(batch_params) - len(batch_tags))
        batch_metrics, metrics = metrics[:metric_room], metrics[metric_room:]
        yield batch_metrics, batch_params, batch_tags


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:400] if text else ''}"
