"""A committed checkpoint opened for reading: its manifest, `meta.json` and tensor index already checked.

`CheckpointStore.open` returns one after checking everything that is small (the manifest, the sizes of
the data files, `meta.json`, `tensors.json`, and with a job's layout the names, shapes and dtypes of
every tensor). Tensor bytes are read only by the methods here, one chunk at a time, each checked
against its sha256 and (for training) its values: so a rank's memory holds its own shards plus one
chunk, never the whole checkpoint.

- `read_into(targets, process_group)`: DCP's load into the caller's tensors (plain or DTensor shards of
  any world size); every rank of the group calls it together.
- `read_full()`: the whole checkpoint as plain tensors in one process (tools, tests, small models).
- `scan()`: read and check every chunk, keeping nothing (what `shadow run --resume` does before it
  trusts a checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.api import CheckpointException

from shadow.checkpoint.dcp_storage import ShardReader
from shadow.checkpoint.errors import CheckpointError
from shadow.checkpoint.tensor_index import Chunk, StoredTensor, chunk_tensor
from shadow.checkpoint.validate import check_values
from shadow.snapshot import Snapshot, SnapshotLayout


@dataclass
class StoredCheckpoint:
    store: object  # the CheckpointStore it is in
    step: int
    where: str  # its URI, for messages
    manifest: bytes  # as read when it was opened: damage found in its chunks is remembered for it
    meta: dict
    index: dict[str, StoredTensor]
    layout: SnapshotLayout | None = None  # the job it was opened for: values are checked against it
    allow_nonfinite: bool = False

    def read_chunk(self, name: str, chunk: Chunk) -> torch.Tensor:
        data = self.store.read_range(self.step, chunk.file, chunk.offset, chunk.num_bytes)
        try:
            return chunk_tensor(data, chunk, self.index[name].dtype, self.where, name)
        except CheckpointError as exc:  # damaged bytes: `latest_committed` skips this checkpoint from now on
            self.store.remember(self.step, self.manifest, str(exc))
            raise

    def _check(self, name: str, chunk: Chunk, values: torch.Tensor) -> None:
        if self.layout is not None:
            check_values({name: values}, self.where, chunk.file, self.layout, allow_nonfinite=self.allow_nonfinite)

    def read_into(self, targets: dict[str, torch.Tensor], process_group=None) -> None:
        """Fill `targets` (full names -> tensors or DTensors, exactly the checkpoint's names) in place."""
        missing = sorted(set(self.index) - set(targets))
        if missing:
            raise CheckpointError(f"{self.where}: holds {missing[0]!r}, which the trainer has no place for")
        distributed = dist.is_available() and dist.is_initialized()
        try:
            dcp.load(targets, storage_reader=ShardReader(self, check_values=self._check),
                     planner=DefaultLoadPlanner(flatten_state_dict=False), process_group=process_group,
                     no_dist=not distributed)
        except CheckpointException as exc:  # a rank's error, raised on every rank of the group
            raise first_checkpoint_error(exc) from None

    def read_full(self) -> Snapshot:
        tensors = {}
        for name, stored in self.index.items():
            full = torch.empty(stored.shape, dtype=stored.dtype)
            for chunk in stored.chunks:
                values = self.read_chunk(name, chunk)
                self._check(name, chunk, values)
                box = full
                for dim, (start, size) in enumerate(zip(chunk.offsets, chunk.sizes)):
                    box = box.narrow(dim, start, size)
                box.copy_(values)
            tensors[name] = full
        return Snapshot(step=self.step, tensors=tensors, meta=self.meta)

    def scan(self) -> None:
        for name, stored in self.index.items():
            for chunk in stored.chunks:
                self._check(name, chunk, self.read_chunk(name, chunk))


def first_checkpoint_error(exc: CheckpointException) -> Exception:
    """DCP gathers each failing rank's (exception, traceback); a CheckpointError among them is the one to
    show (it names the file), else the first rank's error with its rank."""
    failures = sorted(exc.failures.items())
    for _, (error, _trace) in failures:
        if isinstance(error, CheckpointError):
            return error
    if not failures:
        return RuntimeError(str(exc))
    rank, (error, _trace) = failures[0]
    return RuntimeError(f"rank {rank}: {type(error).__name__}: {error}")
