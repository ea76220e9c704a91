"""`mlflow.json` in the run directory: which MLflow runs hold this run, so a resume continues them.

Written by the tracking worker whenever it creates a run (atomically), read by `shadow run --resume`
and `shadow report`. The URI is stored without credentials (see `uri.redact`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shadow.rundir import write_json_atomic

STATE_FILE = "mlflow.json"


@dataclass
class TrackingState:
    tracking_uri: str  # redacted
    experiment: str  # experiment name
    run_dir_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # tag on every run, to find them again
    experiment_id: str | None = None
    runs: dict[str, str] = field(default_factory=dict)  # run key ("main" or a replay name) -> MLflow run id

    @property
    def parent_run_id(self) -> str | None:
        return self.runs.get("main")

    def save(self, run_dir: Path) -> None:
        write_json_atomic(Path(run_dir) / STATE_FILE, asdict(self))

    @classmethod
    def load(cls, run_dir: Path) -> "TrackingState | None":
        path = Path(run_dir) / STATE_FILE
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
