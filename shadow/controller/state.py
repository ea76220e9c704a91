"""The controller's own state machine and the durable state it writes for `--resume`.

| phase | event | next phase |
| --- | --- | --- |
| STARTING | main trainer ready (fresh, or restored on resume) | TRAINING |
| TRAINING | main job reached the job's last step, replays still running | DRAINING |
| DRAINING | a late verdict rolled the main job back: steps to train again | TRAINING |
| TRAINING, DRAINING | main job done and no replay in flight | FINISHED |
| any | an error the controller cannot recover from | FAILED |
| any | SIGINT / SIGTERM | INTERRUPTED |

Every transition is an event (`controller_phase`) with its reason. The policy's own machine (FP8,
BF16_FALLBACK, ...) lives in `shadow.policy`; the controller carries its state in `RunState`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum

from shadow.policy import PolicyState


class Phase(str, Enum):
    STARTING = "starting"
    TRAINING = "training"
    DRAINING = "draining"
    FINISHED = "finished"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


ALLOWED = {
    Phase.STARTING: {Phase.TRAINING, Phase.FAILED, Phase.INTERRUPTED},
    Phase.TRAINING: {Phase.DRAINING, Phase.FINISHED, Phase.FAILED, Phase.INTERRUPTED},
    Phase.DRAINING: {Phase.TRAINING, Phase.FINISHED, Phase.FAILED, Phase.INTERRUPTED},
    Phase.FINISHED: set(),
    Phase.FAILED: set(),
    Phase.INTERRUPTED: set(),
}


@dataclass
class RunState:
    """What a resumed controller needs beyond checkpoints and the trajectory.

    Written into every decision and switch event (`state` field), so the last such event in
    events.jsonl is always consistent with the decisions logged before it.
    """

    policy_state: PolicyState = field(default_factory=PolicyState)  # the policy's machine and counters
    precision: str = "fp8"  # the main job's precision from the next step on
    lineage: int = 0  # increases at every rollback, adopted replay or restart of the main job
    regime: int = 0  # increases at every precision switch; replays of an older regime are dropped
    num_precision_switches: int = 0  # precision switches applied to the main job, either direction
    num_main_restarts: int = 0  # times the main trainer died and was restarted from a checkpoint
    restore_step: int | None = None  # the checkpoint the current lineage started from
    restore_run: str | None = None  # its run name in the store (the main run, or a replay's end state)

    def to_dict(self) -> dict:
        return {**asdict(self), "policy_state": self.policy_state.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "RunState":
        if "num_switches" in data:  # the name run directories written before 0.2 use
            data = {"num_precision_switches": data["num_switches"], **data}
        values = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        values["policy_state"] = PolicyState.from_dict(values.get("policy_state") or {})
        return cls(**values)
