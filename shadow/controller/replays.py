"""Replays in flight: rank groups reused window after window, their futures, failures and retries.

Each replay runs on a group of `verify.replay_resources.num_ranks` ranks on its own placement group;
when the micro-batches of the main job's step (num_ranks x grad_accum) are shared by fewer replay
ranks, each replay rank accumulates more of them, so the loss of a step is the loss over the same
global batch. A group that cannot get its resources waits (reported) and never blocks the main job.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray

from shadow.config.job import JobConfig
from shadow.config.policy import Policy
from shadow.controller.actors import ReplayResult, ReplayTask, ReplayWorker
from shadow.controller.groups import RankGroup
from shadow.policy import ReplayRequest


@dataclass
class Replay:
    name: str
    request: ReplayRequest
    regime: int  # the controller's regime and lineage when it started: a later switch makes it stale
    lineage: int
    save_end_run: str | None  # where its end state is saved (adopt_replay)
    pin: str  # pin reason holding the start checkpoint against retention while it runs
    attempt: int = 0
    group: RankGroup | None = None
    refs: list = field(default_factory=list)
    pending: list = field(default_factory=list)
    result: ReplayResult | None = None
    started_at: float = 0.0
    reported_waiting: bool = False


class ReplayPool:
    def __init__(self, job: JobConfig, store_uri: str, run: str):
        self.job = job
        self.store_uri = store_uri
        self.run = run
        self.running: list[Replay] = []
        self.idle_groups: list[RankGroup] = []
        self.num_groups = 0

    def _group(self, policy: Policy) -> RankGroup:
        resources = policy.verify.replay_resources
        micro = self.job.resources.num_ranks * self.job.resources.grad_accum
        for group in self.idle_groups:
            if group.num_ranks == resources.num_ranks:
                self.idle_groups.remove(group)
                return group
        self.num_groups += 1
        group = RankGroup(ReplayWorker, (self.job,), num_ranks=resources.num_ranks, num_micro_batches=micro,
                          num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
                          name=f"shadow-replay-{self.run}-{self.num_groups}")
        group.setup()  # queued before the first run on every rank; not waited for
        return group

    def start(self, replay: Replay, policy: Policy) -> None:
        """Start (or retry) a replay on an idle group of the right size, or a new one."""
        replay.group = self._group(policy)
        replay.started_at = time.monotonic()
        task = ReplayTask(replay.request.start_step, replay.request.num_steps, replay.request.precision,
                          self.store_uri, self.run, policy.verify.eval_batches, replay.save_end_run, replay.attempt)
        replay.refs = replay.group.call("run", task)
        replay.pending = list(replay.refs)
        self.running.append(replay)

    def waiting_for_resources(self, after_s: float) -> list[Replay]:
        """Replays started over `after_s` ago whose group still has no resources, not reported before."""
        now = time.monotonic()
        waiting = [r for r in self.running if not r.reported_waiting and now - r.started_at > after_s
                   and not r.group.has_resources()]
        for replay in waiting:
            replay.reported_waiting = True
        return waiting

    def refs(self) -> list:
        return [ref for replay in self.running for ref in replay.pending]

    def owner(self, ref) -> Replay:
        return next(r for r in self.running if any(ref == p for p in r.pending))

    def collect(self, ref) -> tuple[Replay | None, Exception | None]:
        """A rank returned. (replay, None) once every rank of it is done; (replay, error) at the first
        failure (the group is discarded if a rank died); (None, None) while ranks are still running."""
        replay = self.owner(ref)
        replay.pending = [r for r in replay.pending if r != ref]
        try:
            ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            # a lone rank that raised can run the next window; ranks of a group may be stuck in a
            # collective with the failed one, and a dead rank cannot rejoin: such groups go
            reusable = replay.group.num_ranks == 1 and not isinstance(exc, ray.exceptions.RayActorError)
            self._finish(replay, keep_group=reusable)
            return replay, exc
        if replay.pending:
            return None, None
        replay.result = ray.get(replay.refs[0])
        self._finish(replay, keep_group=True)
        return replay, None

    def _finish(self, replay: Replay, keep_group: bool) -> None:
        self.running.remove(replay)
        if keep_group:
            self.idle_groups.append(replay.group)
        else:
            replay.group.kill()  # a group with a dead rank cannot run collectives again

    def abandon_unstarted(self, grace_s: float) -> list[Replay]:
        """Replays started over `grace_s` ago whose group still has no resources: removed and returned
        (the end of a run waits that long for resources that may be on their way, not longer)."""
        now = time.monotonic()
        stuck = [r for r in self.running if now - r.started_at > grace_s and not r.group.has_resources()]
        for replay in stuck:
            self.running.remove(replay)
            replay.group.kill()
        return stuck

    def shutdown(self) -> None:
        for group in [*self.idle_groups, *(r.group for r in self.running)]:
            group.kill()
        self.idle_groups, self.running = [], []
