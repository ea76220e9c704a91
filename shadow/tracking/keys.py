"""What shadow's records look like in MLflow: metric keys, run names, tags and params. Pure data.

The main run and every replay run log the same keys (`train/loss`, `train/grad_norm`, ...) at the
same global steps, so selecting both in MLflow's compare view overlays the replay on the main
run's window. A metric is `[key, value, timestamp_ms, step]`; the timestamp is fixed when the
record is spooled, so re-sending it after an outage is recognised by MLflow as the same value.
"""

from __future__ import annotations

import json
import re

from shadow.config import flatten
from shadow.records import StepRecord

# MLflow's limits (mlflow.utils.validation; a unit test checks they still match).
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_ENTITIES_PER_BATCH = 1000
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_ENTITY_KEY_LENGTH = 250

PRECISION_CODE = {"fp8": 1.0, "bf16": 0.0}  # shadow/precision: 1 = FP8, 0 = BF16
LEVEL_CODE = {"clean": 0.0, "warn": 1.0, "violation": 2.0}  # shadow/verdict_level
VERDICT_KEYS = {  # Verdict field -> parent and replay metric, logged at step = window end
    "rel_mean_gap": "shadow/gap_rel",
    "mean_gap": "shadow/gap_mean",
    "end_gap": "shadow/gap_end",
    "rel_end_gap": "shadow/gap_rel_end",
    "max_abs_gap": "shadow/gap_max_abs",
    "slope": "shadow/gap_slope",
    "t_stat": "shadow/gap_t_stat",
    "eval_gap": "shadow/gap_eval",
    "rel_eval_gap": "shadow/gap_rel_eval",
}
MAIN = "main"  # the run key of the parent run; a replay's run key is its name
_BAD_KEY_CHARS = re.compile(r"[^0-9A-Za-z_\-. /:]")


def metric_key(name: str) -> str:
    """MLflow accepts letters, digits and `_-. /:` in metric names; anything else becomes `_`."""
    return _BAD_KEY_CHARS.sub("_", name)[:MAX_ENTITY_KEY_LENGTH]


def record_metrics(record: StepRecord, timestamp_ms: int, *, main: bool) -> list[list]:
    values = {
        "train/loss": record.loss,
        "train/grad_norm": record.grad_norm,
        "train/lr": record.lr,
        "train/step_time_s": record.step_time_s,
        "eval/loss": record.eval_loss,
        "shadow/precision": PRECISION_CODE.get(record.precision),
    }
    if main:  # which attempt of history this row belongs to (a rollback starts a new lineage)
        values["shadow/lineage"] = record.lineage
    values.update({metric_key(f"telemetry/{k}"): v for k, v in record.telemetry.items()})
    return [[key, float(value), timestamp_ms, record.step] for key, value in values.items() if value is not None]


def verdict_metrics(event: dict, timestamp_ms: int) -> list[list]:
    """A `verdict` event as metrics at step = window end (the step after its last replayed step)."""
    verdict = event.get("verdict", {})
    step = event["window_end"]
    metrics = [[key, _float(verdict[field]), timestamp_ms, step] for field, key in VERDICT_KEYS.items()
               if verdict.get(field) is not None]
    if event.get("level") in LEVEL_CODE:
        metrics.append(["shadow/verdict_level", LEVEL_CODE[event["level"]], timestamp_ms, step])
    return metrics


def replay_run_name(purpose: str, precision: str, start_step: int) -> str:
    return f"{purpose} {precision} @ step {start_step}"


def replay_tags(event: dict) -> dict[str, str]:
    """Tags of a replay's child run, from its `replay_started` event."""
    start, num_steps = event["start_step"], event["num_steps"]
    return {
        "shadow.replay": event["name"],
        "shadow.purpose": event["purpose"],
        "shadow.precision": event["precision"],
        "shadow.window_start": str(start),
        "shadow.window_steps": str(num_steps),
        "shadow.window_end": str(start + num_steps),
        "shadow.verdict": "running",
    }


def flatten_params(prefix: str, data: dict) -> dict[str, str]:
    """Nested config -> `prefix.a.b: value` params; lists as JSON; values cut to MLflow's length limit."""
    return {name[:MAX_ENTITY_KEY_LENGTH]: (value if isinstance(value, str) else json.dumps(value))[:MAX_PARAM_VAL_LENGTH]
            for name, value in flatten(data, f"{prefix}.").items()}


def tag_value(text: str) -> str:
    return text if len(text) <= MAX_TAG_VAL_LENGTH else text[: MAX_TAG_VAL_LENGTH - 3] + "..."


def _float(value) -> float:
    """Verdict fields in events are floats, or "inf"/"nan" strings (JSON has no non-finite numbers)."""
    return float(value)
