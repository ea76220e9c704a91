"""The roles the controller drives, as plain classes that Ray turns into actors (one per rank).

`MainTrainer` is a rank of the main job: it trains in chunks, commits checkpoints on the job's cadence
(rank 0) and switches precision or restores state when told to. `ReplayWorker` is a rank of a replay
group: it re-trains one window from a committed checkpoint, in chunks too, and streams each chunk's
records back, so the controller can end the window once its records decide it. Both are built empty
and `setup(...)` joins them to their group (see `groups.py`). Large state moves through the
checkpoint store, never through Ray's object store: only records and small results travel back.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

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
    device: str = ""  # the kind of device it trained on (`device_kind`): its step times compare with others there
    num_ranks: int = 1  # the ranks it trained on


@dataclass
class ReplayChunk:
    """One call of a replay window: the steps it trained, and at the window's last call what ends it."""

    records: list[StepRecord]
    last: bool  # the window is over: its trainer is released
    eval_loss: float | None = None  # held-out loss after the window's planned last step (eval_batches > 0)
    end_checkpoint: str | None = None  # URI of the saved end state, when asked for (adopt_replay)
    wall_s: float = 0.0  # since the window's first call
    node_id: str = ""
    device: str = ""
    num_ranks: int = 1


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


def device_kind(trainer: Trainer) -> str:
    """The kind of device a trainer runs on, as far as step times go: the GPU's name, or the CPU with its
    thread count (on a CPU the step time scales with the threads)."""
    if trainer.device.type == "cuda":
        return torch.cuda.get_device_name(trainer.device)
    return f"cpu x{torch.get_num_threads()} threads"


def fp8_emulated(trainer: Trainer) -> bool:
    """Whether FP8 steps are emulated (quantize-dequantize around wider GEMMs), so slower than BF16 by design."""
    return trainer.backend.name == "emulated" or bool(getattr(trainer.backend, "emulate", False))


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

    def describe(self) -> dict:
        """Where its steps run: `device` (see `device_kind`) and whether FP8 is `emulated`."""
        return {"device": device_kind(self.trainer), "emulated": fp8_emulated(self.trainer)}

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
    """One rank of a replay group; long-lived, reused for one window after another.

    A window is trained in calls of `run(task, until_step, last)`: the first call loads the window's
    checkpoint into a fresh trainer (nothing of an earlier replay leaks in), each call trains up to
    `until_step` and returns those records, and the call with `last` ends the window there: it
    evaluates (when the window reached its planned end), saves the end state when asked, and releases
    the trainer. Every rank of the group gets the same calls, so all stop at the same step."""

    def __init__(self, job: JobConfig):
        self.job = job
        self._window: _Window | None = None

    def setup(self, num_micro_batches: int, world_size: int, rank: int, address: str) -> None:
        self.layout = layout_for(num_micro_batches, world_size, rank, address)

    def run(self, task: ReplayTask, until_step: int, last: bool) -> ReplayChunk:
        if self._window is None or self._window.task != task:  # a new window, or a retry of one
            self._window = None  # the earlier trainer goes before the next one is built
            self._window = _Window(self.job, self.layout, task)
        window = self._window
        end = task.start_step + task.num_steps
        records = window.train(until_step, evaluate=until_step == end and task.eval_batches > 0)
        chunk = ReplayChunk(records, last, node_id=self.node_id(), device=device_kind(window.trainer),
                            num_ranks=self.layout.world_size)
        if last:
            self._window = None
            chunk.eval_loss = records[-1].eval_loss if records and until_step == end else None
            if task.save_end_run is not None:  # every rank writes its shards
                end_store = open_store(task.store_uri, task.save_end_run)
                chunk.end_checkpoint = end_store.save(window.trainer.snapshot(), window.trainer.checkpoint_group).uri
        chunk.wall_s = time.perf_counter() - window.started
        return chunk


class _Window:
    """A replay window in progress on one rank: its trainer, restored from the window's checkpoint."""

    def __init__(self, job: JobConfig, layout, task: ReplayTask):
        self.job, self.task = job, task
        self.started = time.perf_counter()
        self.leader = layout.rank == 0
        self.trainer = Trainer(job, layout)
        self.trainer.load_checkpoint(open_store(task.store_uri, task.run).open(task.start_step, self.trainer.job_hash,
                                                                                self.trainer.checkpoint_layout))
        self.trainer.set_precision(task.precision)
        faults = job.faults
        self.trainer.nan_loss_at_step = faults.nan_loss_at_step if faults.nan_loss_in == "replay" else None

    def train(self, until_step: int, evaluate: bool) -> list[StepRecord]:
        faults, task = self.job.faults, self.task

        def inject(record: StepRecord) -> None:
            _crash_if(record.step + 1 == faults.replay_crash_at_step and task.attempt == 0 and self.leader)
            if record.step + 1 == faults.replay_error_at_step:
                raise RuntimeError(f"injected replay error before step {faults.replay_error_at_step} (job faults)")

        settings = LoopSettings(until_step=until_step, eval_at_end=evaluate, eval_batches=task.eval_batches)
        return run_steps(self.trainer, settings, on_record=inject).records


def _crash_if(condition: bool) -> None:
    """Injected crash: the process dies at once, as an OOM kill or a segfault would end it."""
    if condition:
        os._exit(17)
