"""Where a run's MLflow records go, and how to print a URI without its secrets.

Precedence: `--tracking-uri` > `MLFLOW_TRACKING_URI` > the URI a resumed run used (`mlflow.json`) >
the embedded default, a sqlite store inside the run directory. MLflow 3 refuses a plain directory
(the file store), so the default is sqlite with its artifacts beside it in the run directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from shadow.config import ConfigError, ConfigProblem

EMBEDDED_DB = "mlflow.db"
EMBEDDED_ARTIFACTS = "mlflow-artifacts"

# user:password@ in any URI, and secrets passed as query parameters (?token=..., &password=...)
_USERINFO = re.compile(r"(?<=//)[^/@\s]+@")
_SECRET_QUERY = re.compile(r"(?i)([?&](?:token|password|secret|access_token|api_key|key)=)[^&\s]+")


def embedded_uri(run_dir: Path) -> str:
    return f"sqlite:///{(Path(run_dir).absolute() / EMBEDDED_DB)}"


def resolve_tracking_uri(explicit: str | None, run_dir: Path, stored: str | None = None) -> str:
    """The URI to log to; `stored` is the (redacted) URI a resumed run used, from `mlflow.json`."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if stored and "***" in stored:  # it had credentials, which are never written down
        raise ConfigError([ConfigProblem(
            str(Path(run_dir) / "mlflow.json"), "tracking_uri", stored,
            "the same URI with its credentials again: pass --tracking-uri or set MLFLOW_TRACKING_URI")])
    return stored or embedded_uri(run_dir)


def is_embedded(uri: str, run_dir: Path) -> bool:
    return uri == embedded_uri(run_dir)


def redact(text: str) -> str:
    """`text` with credentials removed: `http://user:pw@host` -> `http://***@host`, `?token=x` -> `?token=***`.

    Applied to every URI and error message the tracker writes (events, tags, mlflow.json, stderr).
    """
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub("***@", text))
