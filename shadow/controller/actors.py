"""The roles the controller drives, as plain classes that Ray turns into actors (one per rank).

`MainTrainer` is a rank of the main job: it trains in chunks, commits checkpoints on the job's cadence
(rank 0) and switches precision or restores state when told to. `ReplayWorker` is a rank of a replay
group: it re-trains one window from a committed checkpoint and returns its records. Both are built
empty and `setup(...)` joins them to their group (see `groups.py`). Large state moves through the
checkpoint store, never through Ray's object store: only records and small results travel back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from shadow.checkpoint import AsyncPersister, CommitInfo, open_store
from shadow.config.job import JobConfig
from shadow.distributed import free_address, layout_for
from shadow.loop import LoopSettings, run_steps
from shadow.records import StepRecord
from shadow.trainer import Trainer


@dataclass
class ChunkResult:
    step: int  # the main job's step after the chunk
    records: list[StepRecord]
    checkpoint_events: list[dict]  # committed / failed / deleted, as event payloads, in order


@dataclass
class ReplayResult:
    records: list[StepRecord]
    eval_loss: float | None = None
    end_checkpoint: str | None = None  # URI of the saved end state, when asked for (adopt_replay)
    wall_s: float = 0.0
    node_id: str = ""  # the Ray node rank 0 of the replay ran on


@dataclass
class ReplayTask:
    """What a replay worker needs: the window, where its checkpoint is, what to report."""

    start_step: int
    num_steps: int
    precision: str
    store_uri: str
    run: str  # the main job's checkpoint run name
    eval_batches: int = 0
    save_end_run: str | None = None  # commit the end state under this run name (for adopt_replay)
    attempt: int = 0  # 0 for the first try, then 1, 2, ... when the controller retries a failed replay


class _Rank:
    """What every rank actor has: its place in the group, where it runs, and a rendezvous for rank 0."""

    def address(self) -> str:
        return free_address()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


class MainTrainer(_Rank):
    """One rank of the main job. Every rank persists its own shards in the background (the loop blocks
    only for the staging copy); rank 0 commits the manifest, applies retention and reports the outcomes
    with the next chunk. Checkpoints reshard on load, so any rank count restores any checkpoint."""

    def __init__(self, job: JobConfig, store_uri: str, run: str):
        self.job, self.store_uri, self.run = job, store_uri, run

    def setup(self, num_micro_batches: int, world_size: int, rank: int, address: str) -> None:
        self.trainer = Trainer(self.job, layout_for(num_micro_batches, world_size, rank, address))
        self.leader = rank == 0
        self.store = open_store(self.store_uri, self.run, keep_last=self.job.checkpoint.keep)
        if self.leader:
            self.store.check()  # an unreachable store or a missing bucket fails before any training
        self.persister = AsyncPersister(self.store, self.trainer.checkpoint_group, leader=self.leader)

    def start(self, precision: str) -> CommitInfo | None:
        """A fresh job: commit its initial state (step 0), the first possible replay start."""
        self.trainer.set_precision(precision)
        return self._save_now()

    def _save_now(self) -> CommitInfo | None:
        commit = self.store.save(self.trainer.snapshot(), self.trainer.checkpoint_group)
        return commit if self.leader else None

    def train(self, until_step: int, eval_after_steps: tuple[int, ...] = (), eval_batches: int = 0,
              lineage: int = 0) -> ChunkResult:
        settings = LoopSettings(
            until_step=until_step,
            checkpoint_every=self.job.checkpoint.every_steps,
            checkpoint_at_end=until_step >= self.job.steps,
            eval_at=frozenset(eval_after_steps),
            eval_batches=eval_batches,
        )
        faults = self.job.faults
        self.trainer.nan_loss_at_step = faults.nan_loss_at_step if lineage == 0 and faults.nan_loss_in == "main" else None
        crash_before = faults.main_crash_at_step if lineage == 0 and self.leader else -1
        result = run_steps(self.trainer, settings, persister=self.persister,
                           on_record=lambda record: _crash_if(record.step + 1 == crash_before))
        for record in result.records:
            record.lineage = lineage
        events = [e.to_event() for e in [*result.checkpoint_events, *self.flush(wait=False)]]
        return ChunkResult(self.trainer.step, result.records, events)

    def flush(self, wait: bool = True) -> list[dict]:
        """Outcomes of checkpoint saves as event payloads (after waiting for the one in flight); rank 0's."""
        if wait:
            self.persister.wait()
        events = self.persister.poll()
        return [e.to_event() for e in events] if self.leader else []

    def set_precision(self, precision: str) -> None:
        self.trainer.set_precision(precision)

    def restore(self, store_uri: str, run: str, step: int, precision: str) -> int:
        """Continue from a committed checkpoint (a rollback target, or a replay's end state)."""
        self.persister.wait()  # a save of the abandoned state must not land after the restore
        store = self.store if run == self.store.run else open_store(store_uri, run)
        self.trainer.load_checkpoint(store.open(step, self.trainer.job_hash, self.trainer.checkpoint_layout))
        self.trainer.set_precision(precision)
        return self.trainer.step

    def evaluate(self, num_batches: int) -> float:
        return self.trainer.evaluate(num_batches)

    def commit_now(self) -> CommitInfo | None:
        self.persister.wait()
        return self._save_now()


class ReplayWorker(_Rank):
    """One rank of a replay group; long-lived, reused for one window after another."""

    def __init__(self, job: JobConfig):
        self.job = job

    def setup(self, num_micro_batches: int, world_size: int, rank: int, address: str) -> None:
        self.layout = layout_for(num_micro_batches, world_size, rank, address)

    def run(self, task: ReplayTask) -> ReplayResult:
        import time

        started = time.perf_counter()
        trainer = Trainer(self.job, self.layout)  # fresh per window: nothing of an earlier replay leaks in
        trainer.load_checkpoint(open_store(task.store_uri, task.run).open(task.start_step, trainer.job_hash,
                                                                           trainer.checkpoint_layout))
        trainer.set_precision(task.precision)
        until = task.start_step + task.num_steps
        faults = self.job.faults
        trainer.nan_loss_at_step = faults.nan_loss_at_step if faults.nan_loss_in == "replay" else None
        leader = self.layout.rank == 0

        def inject(record: StepRecord) -> None:
            _crash_if(record.step + 1 == faults.replay_crash_at_step and task.attempt == 0 and leader)
            if record.step + 1 == faults.replay_error_at_step:
                raise RuntimeError(f"injected replay error before step {faults.replay_error_at_step} (job faults)")

        settings = LoopSettings(until_step=until, eval_at_end=task.eval_batches > 0, eval_batches=task.eval_batches)
        records = run_steps(trainer, settings, on_record=inject).records
        end_checkpoint = None
        if task.save_end_run is not None:  # every rank writes its shards
            end_store = open_store(task.store_uri, task.save_end_run)
            end_checkpoint = end_store.save(trainer.snapshot(), trainer.checkpoint_group).uri
        eval_loss = records[-1].eval_loss if records else None
        return ReplayResult(records, eval_loss, end_checkpoint, time.perf_counter() - started, self.node_id())


def _crash_if(condition: bool) -> None:
    """Injected crash: the process dies at once, as an OOM kill or a segfault would end it."""
    if condition:
        os._exit(17)
