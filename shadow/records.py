"""The trajectory row: one optimizer step of a main job or a replay.

Pure data (no torch), shared by the trainer that produces rows and the comparator that reads them.
`trajectory.jsonl` holds one `StepRecord.to_json()` per line.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from shadow.jsonl import jsonable


@dataclass
class StepRecord:
    step: int  # global optimizer step this row completes (the batch of step `step` was used)
    loss: float  # training loss on this step's batch, before the optimizer update
    precision: str  # "fp8" or "bf16": the precision the step ran in
    tokens: int  # tokens in this step's global batch
    step_time_s: float  # wall time of the step (forward, backward, optimizer)
    grad_norm: float  # global gradient norm before clipping
    lr: float  # learning rate applied on this step
    eval_loss: float | None = None  # held-out loss after this step, when an evaluation ran
    lineage: int = 0  # main job: which attempt of history; rows of an older lineage at or after a
    # rollback/restart point were discarded (see `shadow.rundir.read_history`)
    telemetry: dict[str, float] = field(default_factory=dict)  # telemetry steps: the keys of shadow/signals.py

    def to_json(self) -> str:
        return json.dumps(jsonable(asdict(self)), sort_keys=True)

    @classmethod
    def from_dict(cls, row: dict) -> "StepRecord":
        known = {f.name for f in fields(cls)}
        values = {k: _parse_float(v) for k, v in row.items() if k in known}
        return cls(**values)


def _parse_float(value):
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, dict):
        return {k: _parse_float(v) for k, v in value.items()}
    return value
