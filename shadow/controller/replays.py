"""Replays on Ray: rank groups reused window after window, their futures, failures and resources.

Each replay runs on a group of `verify.replay_resources.num_ranks` ranks on its own placement group;
when the micro-batches of the main job's step (num_ranks x grad_accum) are shared by fewer replay
ranks, each replay rank accumulates more of them, so the loss of a step is the loss over the same
global batch. A group that cannot get its resources waits (reported) and never blocks the main job.
A window runs as one or more calls of its group (`start`, then `advance`), each returning the records
of the steps it trained (`ReplayChunk`): the controller decides after each chunk whether the window goes
on. The group stays with the window until its last chunk returns.
What a window means and where it is in its life cycle is `windows.py`'s business; this pool only runs them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray

from shadow.config.job import JobConfig
from shadow.config.policy import Policy
from shadow.controller.actors import ReplayChunk, ReplayTask, ReplayWorker
from shadow.controller.groups import RankGroup
from shadow.controller.windows import Replay


@dataclass
class _Run:
    """A replay on its group: the futures of its ranks for the running chunk, and those not returned yet."""

    replay: Replay
    group: RankGroup
    task: ReplayTask
    refs: list
    pending: list = field(default_factory=list)
    started_at: float = field(default_factory=time.monotonic)
    reported_waiting: bool = False


class ReplayPool:
    def __init__(self, job: JobConfig, store_uri: str, run: str):
        self.job = job
        self.store_uri = store_uri
        self.run = run
        self._runs: list[_Run] = []
        self._idle_groups: list[RankGroup] = []
        self._num_groups = 0

    def _group(self, policy: Policy) -> RankGroup:
        resources = policy.verify.replay_resources
        micro = self.job.resources.num_ranks * self.job.resources.grad_accum
        for group in self._idle_groups:
            if group.num_ranks == resources.num_ranks:
                self._idle_groups.remove(group)
                return group
        self._num_groups += 1
        group = RankGroup(ReplayWorker, (self.job,), num_ranks=resources.num_ranks, num_micro_batches=micro,
                          num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
                          name=f"shadow-replay-{self.run}-{self._num_groups}")
        group.setup()  # queued before the first run on every rank; not waited for
        return group

    def start(self, replay: Replay, policy: Policy, until_step: int, last: bool) -> None:
        """Start (or retry) a replay on an idle group of the right size, or a new one: its first chunk,
        up to `until_step` (`last`: the window ends there)."""
        group = self._group(policy)
        task = ReplayTask(replay.request.start_step, replay.request.num_steps, replay.request.precision,
                          self.store_uri, self.run, policy.verify.eval_batches, replay.save_end_run, replay.attempt)
        refs = group.call("run", task, until_step, last)
        self._runs.append(_Run(replay, group, task, refs, pending=list(refs)))

    def advance(self, replay: Replay, until_step: int, last: bool) -> None:
        """The replay's next chunk, on the group that ran the ones before."""
        run = next(r for r in self._runs if r.replay is replay)
        run.refs = run.group.call("run", run.task, until_step, last)
        run.pending = list(run.refs)

    def refs(self) -> list:
        return [ref for run in self._runs for ref in run.pending]

    def collect(self, ref) -> tuple[Replay, ReplayChunk | None, Exception | None] | None:
        """A rank returned: (replay, chunk, None) once every rank of the chunk is done; (replay, None, error)
        at the first failure (the group is discarded if a rank died); None while ranks are still running.
        The group is freed with the window's last chunk, or kept for the `advance` that follows."""
        run = next(r for r in self._runs if any(ref == p for p in r.pending))
        run.pending = [r for r in run.pending if r != ref]
        try:
            ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            # a lone rank that raised can run the next window; ranks of a group may be stuck in a
            # collective with the failed one, and a dead rank cannot rejoin: such groups go
            reusable = run.group.num_ranks == 1 and not isinstance(exc, ray.exceptions.RayActorError)
            self._end(run, keep_group=reusable)
            return run.replay, None, exc
        if run.pending:
            return None
        chunk = ray.get(run.refs[0])
        if chunk.last:
            self._end(run, keep_group=True)
        return run.replay, chunk, None

    def _end(self, run: _Run, keep_group: bool) -> None:
        self._runs.remove(run)
        if keep_group:
            self._idle_groups.append(run.group)
        else:
            run.group.kill()  # a group with a dead rank cannot run collectives again

    def waiting_for_resources(self, after_s: float) -> list[Replay]:
        """Replays started over `after_s` ago whose group still has no resources, not reported before."""
        now = time.monotonic()
        waiting = [r for r in self._runs if not r.reported_waiting and now - r.started_at > after_s
                   and not r.group.has_resources()]
        for run in waiting:
            run.reported_waiting = True
        return [run.replay for run in waiting]

    def abandon_unstarted(self, grace_s: float) -> list[Replay]:
        """Replays started over `grace_s` ago whose group still has no resources: removed and returned
        (the end of a run waits that long for resources that may be on their way, not longer)."""
        now = time.monotonic()
        stuck = [r for r in self._runs if now - r.started_at > grace_s and not r.group.has_resources()]
        for run in stuck:
            self._runs.remove(run)
            run.group.kill()
        return [run.replay for run in stuck]

    def shutdown(self) -> None:
        for group in [*self._idle_groups, *(r.group for r in self._runs)]:
            group.kill()
        self._idle_groups, self._runs = [], []
