"""Every replay window of a run through its life cycle; pure (no Ray), so it is tested step by step.

    requested ─► running ─► finished ─► judged
        │           │ ▲          │
        │           └─┘ retry    └─► discarded (a switch came before its verdict)
        └───────────┴──────────────► given up (failed too often, or never got its resources)

`requested` windows come from triggers and wait for a free replay slot; the cadence's windows start
running at once. A running window's records arrive chunk by chunk; one that its records already decide
(`verify.early_stop`) is cut to the steps it ran (`stop_early`) and ends at once. A `finished` window
waits until the main job has trained its steps, then is judged.
The windows of the current regime (its precision and lineage) are the only ones that count: a
precision switch, a rollback or a restart of the main job starts a new one (`new_regime`,
`new_lineage`), and replays of an older one are discarded when they end. This is the one place that
answers "is step s covered?" (`covering`) and "which windows are taken?" (`in_flight`, `settled`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from shadow.controller.actors import ReplayResult
from shadow.policy import Purpose, ReplayRequest
from shadow.policy.early_stop import EarlyStop
from shadow.records import StepRecord


@dataclass
class Replay:
    """One window's replay: what it re-trains, for which regime, and (once done) its records."""

    name: str  # unique in the run: `007-verify-bf16-at-000000300`
    request: ReplayRequest
    regime: int  # the controller's regime and lineage when it started: a later switch makes it stale
    lineage: int
    pin: str  # pin reason holding the start checkpoint against retention while it runs
    save_end_run: str | None = None  # where its end state is saved (on_switch: adopt_replay)
    stoppable: bool = False  # may end before its last step once its records decide it (verify.early_stop)
    attempt: int = 0  # 0 for the first try, then one more per retry
    records: list[StepRecord] = field(default_factory=list)  # the running attempt's records so far
    planned_steps: int = 0  # the window's steps when it started (`request.num_steps` shrinks if it stops early)
    early_stop: EarlyStop | None = None  # why it ended before `planned_steps`, if it did
    result: ReplayResult | None = None

    @property
    def end_step(self) -> int:
        return self.request.start_step + self.request.num_steps

    def covers(self, step: int) -> bool:
        return self.request.start_step <= step < self.end_step


class ReplayWindows:
    def __init__(self, *, regime: int = 0, lineage: int = 0, num_started: int = 0):
        self.regime, self.lineage = regime, lineage
        self.num_started = num_started  # replays opened in the run (resume included): names them
        self.requested: list[ReplayRequest] = []  # triggered windows waiting for a replay slot, oldest first
        self.running: list[Replay] = []  # started, any regime (an old regime's replay still holds its slot)
        self.finished: list[Replay] = []  # done, waiting for the main job to train their window
        self.judged: list[ReplayRequest] = []  # this regime's judged windows: they cover their steps
        self._settled_latest: dict[Purpose, ReplayRequest] = {}  # per purpose, newest judged or given up

    # ------------------------------------------------------------------ regimes
    def new_regime(self, regime: int, lineage: int) -> None:
        """A precision switch or a rollback: the old regime's windows neither cover steps nor hold back
        the cadence; its replays still running finish and are discarded."""
        self.regime, self.lineage = regime, lineage
        self.requested, self.judged, self._settled_latest = [], [], {}

    def new_lineage(self, lineage: int, from_step: int) -> None:
        """The main job restarted from `from_step` in the same precision: windows judged before it still
        describe the run; everything from it on is trained again."""
        self.lineage = lineage
        self.requested = []
        self.judged = [r for r in self.judged if r.start_step + r.num_steps <= from_step]

    def is_current(self, replay: Replay) -> bool:
        return (replay.regime, replay.lineage) == (self.regime, self.lineage)

    # ------------------------------------------------------------------ transitions
    def request(self, request: ReplayRequest) -> None:
        self.requested.append(request)

    def next_requested(self, num_free_slots: int) -> list[ReplayRequest]:
        """Take requested windows, oldest first, for the free slots."""
        taken, self.requested = self.requested[:max(num_free_slots, 0)], self.requested[max(num_free_slots, 0):]
        return taken

    def open(self, request: ReplayRequest, *, save_end: bool, run: str, stoppable: bool = False) -> Replay:
        """A replay of `request` in the current regime, named and numbered (not running yet: its start
        checkpoint must be pinned first, see `start`)."""
        self.num_started += 1
        name = f"{self.num_started:03d}-{request.purpose.value}-{request.precision}-at-{request.start_step:09d}"
        return Replay(name, request, self.regime, self.lineage, pin=f"replay-{self.num_started}",
                      save_end_run=f"{run}-replays/{name}" if save_end else None, stoppable=stoppable,
                      planned_steps=request.num_steps)

    def start(self, replay: Replay) -> None:
        self.running.append(replay)

    def retry(self, replay: Replay) -> None:
        """Run the window again from its start: what the failed attempt streamed is dropped."""
        replay.attempt += 1
        replay.records = []

    def stop_early(self, replay: Replay, why: EarlyStop | None) -> None:
        """The window ends after the steps it has run: from now on it covers only those. `why` is None
        when it ends because it went stale (a switch came first): it is discarded, not judged."""
        replay.request = replace(replay.request, num_steps=len(replay.records))
        replay.early_stop = why

    def finish(self, replay: Replay, result: ReplayResult) -> bool:
        """The replay returned its records. False if it is stale (discarded); else it waits for its verdict."""
        self.running.remove(replay)
        replay.result = result
        if not self.is_current(replay):
            return False
        self.finished.append(replay)
        return True

    def give_up(self, replay: Replay) -> None:
        """The window will not be replayed: it is never scheduled again in this regime, and covers nothing."""
        if replay in self.running:
            self.running.remove(replay)
        if self.is_current(replay):
            self._settle(replay.request)

    def ready_to_judge(self, main_step: int, main_done: bool) -> list[Replay]:
        """Finished replays whose window the main job has trained (all of them once it is done), by
        start step; they leave `finished`. Stale ones among them are for the caller to discard."""
        ready = sorted((r for r in self.finished if main_done or r.end_step <= main_step),
                       key=lambda r: r.request.start_step)
        self.finished = [r for r in self.finished if r not in ready]
        return ready

    def judge(self, replay: Replay) -> None:
        self.judged.append(replay.request)
        self._settle(replay.request)

    def _settle(self, request: ReplayRequest) -> None:
        latest = self._settled_latest.get(request.purpose)
        if latest is None or request.start_step > latest.start_step:
            self._settled_latest[request.purpose] = request

    # ------------------------------------------------------------------ questions
    def in_flight(self) -> list[ReplayRequest]:
        """Windows holding a replay slot: running (any regime) or finished and waiting for a verdict."""
        return [r.request for r in [*self.running, *self.finished]]

    def settled(self) -> list[ReplayRequest]:
        """This regime's newest judged or given-up window per purpose: all the cadence needs to know."""
        return list(self._settled_latest.values())

    def covering(self, step: int) -> ReplayRequest | None:
        """The verification window of this regime, requested, running, finished or judged, that covers `step`."""
        current = [r.request for r in [*self.running, *self.finished] if self.is_current(r)]
        for request in [*current, *self.judged, *self.requested]:
            if request.purpose is Purpose.VERIFY and request.start_step <= step < request.start_step + request.num_steps:
                return request
        return None

    def running_ends_after(self, step: int) -> tuple[int, ...]:
        """End steps, after `step`, of the windows being replayed: the main job evaluates there too."""
        return tuple(r.end_step for r in self.running if r.end_step > step)
