"""The data the policy brain takes and returns: machine state, decisions, replay requests.

Everything is a frozen dataclass or an enum, serializable with `to_dict()` so the controller can
write it to events.jsonl and restore the state after a crash (`PolicyState.from_dict`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from typing import Any

from shadow.jsonl import jsonable


class Machine(str, Enum):
    FP8 = "fp8"  # main job in FP8, verified by BF16 replays
    BF16_FALLBACK = "bf16_fallback"  # main job switched to BF16; FP8 probes decide when to go back
    FP8_PROBATION = "fp8_probation"  # back in FP8 after clean probes; one violation switches again
    BF16_FOREVER = "bf16_forever"  # max_switches reached: BF16 to the end, no more replays


class Purpose(str, Enum):
    VERIFY = "verify"  # BF16 replay of an FP8 window
    PROBE = "probe"  # FP8 replay of a BF16 window, to see whether FP8 tracks BF16 again
    NOISE = "noise"  # replay in the main job's own precision, to measure the noise floor


class DecisionKind(str, Enum):
    NOTE = "note"  # informational: a clean window, progress, a verdict ignored and why
    WARN = "warn"  # a window above `thresholds.warn`, or a violation not yet acted on
    REPORT = "report"  # observe mode: what the policy would have done (payload["would"])
    SWITCH_TO_BF16 = "switch_to_bf16"  # payload: on_switch, resume_step, ...
    SWITCH_TO_FP8 = "switch_to_fp8"  # payload: resume_step
    STAY_BF16 = "stay_bf16"  # max_switches reached: the job stays BF16 to the end


ACTIONS = (DecisionKind.SWITCH_TO_BF16, DecisionKind.SWITCH_TO_FP8, DecisionKind.STAY_BF16)


@dataclass(frozen=True)
class Decision:
    kind: DecisionKind
    reason: str  # one line a human reads in the event log: the numbers and the threshold
    payload: dict[str, Any] = field(default_factory=dict)  # plain data for the controller and events

    def to_dict(self) -> dict:
        return {"kind": self.kind.value, "reason": self.reason, "payload": jsonable(self.payload)}


@dataclass(frozen=True)
class Cusum:
    """A one-sided CUSUM (Page's test) over verification windows: the running sum of each window's
    excess (its metric beyond warn, in one direction), floored at 0."""

    total: float = 0.0  # the sum; 0 after a window brought it to 0 or below
    num_windows: int = 0  # windows in a row it has been above 0
    first_start: int | None = None  # start of the first of those windows

    def add(self, excess: float, window_start: int) -> Cusum:
        total = self.total + excess
        if total <= 0:
            return Cusum()
        return Cusum(total, self.num_windows + 1, self.first_start if self.num_windows else window_start)


@dataclass(frozen=True)
class PolicyState:
    """Where the policy stands. `since_step` starts the current regime: verdicts of windows that
    start before it belong to an earlier regime and are ignored."""

    machine: Machine = Machine.FP8
    since_step: int = 0  # step from which the main job runs in the current regime
    num_fallbacks: int = 0  # FP8 -> BF16 fallbacks so far (bounded by `action.max_switches`)
    num_violations_in_row: int = 0  # consecutive verification windows above `thresholds.switch`
    streak_start_step: int | None = None  # window start of the first violation of the current streak
    last_verified_step: int | None = None  # start of the latest clean verification window: rollback target
    num_clean_probes: int = 0  # consecutive clean FP8 probes in BF16_FALLBACK
    num_clean_probation_windows: int = 0  # clean verification windows in FP8_PROBATION
    last_window_start: int = -1  # latest verify/probe window decided in this regime (scheduling high-water mark)
    last_noise_start: int = -1  # latest noise window decided
    noise_values: tuple[float, ...] = ()  # |metric| of each noise window measured so far
    noise_floor: float | None = None  # largest noise value once `noise.num_windows` are measured
    # (window start, metric) of this regime's latest counted verification windows, at most
    # `thresholds.trend_windows - 1`: all the trend warning needs, so a decision costs the same at any run length
    recent_verifications: tuple[tuple[int, float], ...] = ()
    # adaptive cadence (`shadow/policy/cadence.py`): the verification interval is every_n_steps x 2^this,
    # at most verify.max_every_n_steps; one more per clean window in FP8, 0 again on a warn, a violation,
    # a trigger or a new regime
    cadence_doublings: int = 0
    # accumulated evidence (`thresholds.evidence_limit`, `shadow/policy/evidence.py`): this regime's
    # CUSUM of (metric - warn) over its verification windows, and of (-metric - warn) when two-sided
    evidence_fp8_worse: Cusum = Cusum()
    evidence_fp8_better: Cusum = Cusum()
    fp8_pay_judged: bool = False  # action.fp8_must_pay has judged the measured speedup (once per run)

    def to_dict(self) -> dict:
        return jsonable(asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> "PolicyState":
        known = {f.name for f in fields(cls)}
        if "num_switches" in data:  # the name run directories written before 0.2 use
            data = {"num_fallbacks": data["num_switches"], **data}
        values = {k: v for k, v in data.items() if k in known}
        values["machine"] = Machine(values.get("machine", Machine.FP8))
        values["noise_values"] = tuple(float(v) for v in values.get("noise_values", ()))
        values["recent_verifications"] = tuple((int(s), float(v)) for s, v in values.get("recent_verifications", ()))
        for name in ("evidence_fp8_worse", "evidence_fp8_better"):
            values[name] = Cusum(**values.get(name, {}))
        return cls(**values)

    def new_regime(self, machine: Machine, since_step: int, **changes) -> "PolicyState":
        """State after a precision switch: counters of the old regime start over."""
        return replace(self, machine=machine, since_step=since_step, num_violations_in_row=0,
                       streak_start_step=None, last_verified_step=None, num_clean_probes=0,
                       num_clean_probation_windows=0, last_window_start=-1, recent_verifications=(),
                       cadence_doublings=0, evidence_fp8_worse=Cusum(), evidence_fp8_better=Cusum(), **changes)


@dataclass(frozen=True)
class Decisions:
    """What `decide` returns: the state to keep and the decisions to execute and log, in order."""

    state: PolicyState
    decisions: tuple[Decision, ...]

    @property
    def kinds(self) -> tuple[DecisionKind, ...]:
        return tuple(d.kind for d in self.decisions)


@dataclass(frozen=True)
class ReplayRequest:
    """Re-train the window [start_step, start_step + num_steps) from the checkpoint at start_step."""

    start_step: int
    num_steps: int
    precision: str  # "bf16" or "fp8"
    purpose: Purpose

    def to_dict(self) -> dict:
        return jsonable(asdict(self))


