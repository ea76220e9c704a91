"""The main job as the controller sees it: one group of rank actors, called together, and its trajectory.

Every call goes to all ranks (they run collectives together); rank 0's answer is the job's. A chunk is
launched without blocking and is done when every rank has returned; if any rank fails, the chunk fails
with that rank's error, and the whole group is replaced on a restart (a rank cannot rejoin a
torch.distributed group alone). The main job also owns where it stands (`step`), the kept history
(one row per step of the current lineage) and every row it trained (discarded ones included).
"""

from __future__ import annotations

import ray

from shadow.config.job import JobConfig
from shadow.controller.actors import ChunkResult, MainTrainer
from shadow.controller.groups import RankGroup
from shadow.records import StepRecord


class MainJob:
    def __init__(self, job: JobConfig, store_uri: str, run: str, *, history: list[StepRecord] = (),
                 trained: list[StepRecord] = ()):
        self.job = job
        self.store_uri = store_uri
        self.run = run
        self.group: RankGroup | None = None
        self.generation = 0  # rank groups started so far (a restart starts a new one)
        self.step = 0  # the next step the main job trains
        self.history: dict[int, StepRecord] = {r.step: r for r in history}  # kept rows, by step
        self.trained: list[StepRecord] = list(trained)  # every row trained, discarded ones too
        self.chunk_refs: list = []  # the running chunk's futures, one per rank
        self.pending_refs: list = []  # those not returned yet

    # ------------------------------------------------------------------ the rank group
    @property
    def num_gpus(self) -> float:
        device = self.job.resources.device
        if device == "cuda" or (device == "auto" and ray.cluster_resources().get("GPU", 0) >= 1):
            return 1
        return 0

    def start_group(self) -> list[str]:
        """(Re)create the ranks on a fresh placement group; returns the node id of every rank."""
        if self.group is not None:
            self.group.kill()
        self.generation += 1
        resources = self.job.resources
        self.group = RankGroup(MainTrainer, (self.job, self.store_uri, self.run), num_ranks=resources.num_ranks,
                               num_micro_batches=resources.num_ranks * resources.grad_accum,
                               num_cpus=resources.cpus_per_rank, num_gpus=self.num_gpus,
                               name=f"shadow-main-{self.run}-{self.generation}")
        ray.get(self.group.setup())
        return ray.get(self.group.call("node_id"))

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.kill()
            self.group = None

    def call(self, method: str, *args):
        """Run `method` on every rank and wait; rank 0's result."""
        return ray.get(self.group.call(method, *args))[0]


    # ------------------------------------------------------------------ chunks
    def launch_chunk(self, until_step: int, eval_after: tuple[int, ...], eval_batches: int, lineage: int) -> None:
        self.chunk_refs = self.group.call("train", until_step, eval_after, eval_batches, lineage)
        self.pending_refs = list(self.chunk_refs)

    @property
    def chunk_running(self) -> bool:
        return bool(self.chunk_refs)

    def owns(self, ref) -> bool:
        return any(ref == r for r in self.pending_refs)

    def collect(self, ref) -> ChunkResult | None:
        """A rank of the running chunk returned: rank 0's result once every rank is done, else None.

        Raises the rank's error if it failed (the chunk is then over)."""
        self.pending_refs = [r for r in self.pending_refs if r != ref]
        try:
            ray.get(ref)
        except Exception:
            self.chunk_refs, self.pending_refs = [], []
            raise
        if self.pending_refs:
            return None
        refs, self.chunk_refs = self.chunk_refs, []
        result = ray.get(refs[0])
        self.add_records(result.records)
        self.step = result.step
        return result

    # ------------------------------------------------------------------ trajectory
    def add_records(self, records: list[StepRecord]) -> None:
        for record in records:
            self.history[record.step] = record
        self.trained.extend(records)

    def adopt(self, records: list[StepRecord]) -> None:
        """Rows the main job did not train itself (a replay's), kept as its history."""
        for record in records:
            self.history[record.step] = record

    def kept_history(self) -> list[StepRecord]:
        return [self.history[s] for s in sorted(self.history)]

    def restore(self, run: str, step: int, precision: str, *, keep_history_before: int) -> None:
        """Continue from a committed checkpoint of `run`; rows from `keep_history_before` on stop being
        history (they stay in `trained`)."""
        self.step = self.call("restore", self.store_uri, run, step, precision)
        for s in [s for s in self.history if s >= keep_history_before]:
            del self.history[s]
