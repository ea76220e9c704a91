"""Drive a trainer over a range of steps: records out, checkpoints committed on a cadence.

Shared by `shadow train`, `shadow replay` and the Ray trainer actors, so the main job and its replays
run the very same loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from shadow.checkpoint import CheckpointEvent, CheckpointStore, CommitInfo, SyncPersister
from shadow.records import StepRecord
from shadow.trainer import Trainer


@dataclass
class LoopSettings:
    until_step: int  # run steps [trainer.step, until_step)
    checkpoint_every: int = 0  # commit when trainer.step is a multiple (0: never on cadence)
    checkpoint_at_start: bool = False  # commit the starting state (step 0 of a fresh job)
    checkpoint_at_end: bool = False  # also commit the state after the last step
    eval_every: int = 0  # evaluate after steps s with (s + 1) % eval_every == 0
    eval_at: frozenset[int] = frozenset()  # also evaluate when trainer.step reaches one of these
    eval_at_end: bool = False
    eval_batches: int = 4


@dataclass
class LoopResult:
    records: list[StepRecord] = field(default_factory=list)
    commits: list[CommitInfo] = field(default_factory=list)  # commits reported while the loop ran
    checkpoint_events: list[CheckpointEvent] = field(default_factory=list)  # commits, failures, deletions
    checkpoint_block_s: list[float] = field(default_factory=list)  # loop time lost per checkpoint


def run_steps(
    trainer: Trainer,
    settings: LoopSettings,
    store: CheckpointStore | None = None,
    on_record: Callable[[StepRecord], None] | None = None,
    on_checkpoint: Callable[[CheckpointEvent], None] | None = None,
    *,
    persister: SyncPersister | None = None,
) -> LoopResult:
    """Run the steps; checkpoints go to `persister` (e.g. an AsyncPersister) or are saved to `store` in line.

    With an asynchronous persister the loop blocks only for the snapshot (and for a previous save still
    in flight); events of saves that finish later stay in the persister for its owner to `poll`.
    """
    assert store is None or persister is None, "pass a store or a persister, not both"
    if store is not None:
        persister = SyncPersister(store)
    result = LoopResult()

    def collect() -> None:
        for event in persister.poll():
            result.checkpoint_events.append(event)
            if isinstance(event, CommitInfo):
                result.commits.append(event)
            if on_checkpoint:
                on_checkpoint(event)

    def commit() -> None:
        started = time.perf_counter()
        persister.submit(trainer.snapshot())
        result.checkpoint_block_s.append(time.perf_counter() - started)
        collect()

    if persister is not None and settings.checkpoint_at_start:
        commit()
    while trainer.step < settings.until_step:
        record = trainer.train_step()
        is_last = trainer.step == settings.until_step
        periodic_eval = settings.eval_every and trainer.step % settings.eval_every == 0
        if periodic_eval or trainer.step in settings.eval_at or (is_last and settings.eval_at_end):
            record.eval_loss = trainer.evaluate(settings.eval_batches)
        result.records.append(record)
        if on_record:
            on_record(record)
        if persister is not None:
            on_cadence = settings.checkpoint_every and trainer.step % settings.checkpoint_every == 0
            if on_cadence or (is_last and settings.checkpoint_at_end):
                commit()
            else:
                collect()
    return result
