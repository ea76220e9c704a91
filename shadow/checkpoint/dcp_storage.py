"""shadow's storage for torch.distributed.checkpoint (DCP): every rank writes its own shards, nothing is
pickled, and the manifest is the commit.

DCP plans a save (which rank writes which chunk of which tensor; replicated tensors once) and a load
(which stored chunks each rank's tensors need, across any change of world size); these classes only
move bytes. `ShardWriter` streams each rank's chunks into one data file `rank-NNNNN.bin` (no copy of
the shard beyond the staging one the caller made), hashing every chunk and the file as it goes; the
coordinator's `finish`, which DCP calls once every rank's `write_data` has returned (their files are
durable), writes `tensors.json` (DCP's metadata as JSON, `tensor_index.py`), `meta.json` and last the
manifest. `ShardReader` rebuilds DCP's metadata from that JSON and reads each chunk by its byte range,
checking the chunk's sha256 (and, for training, that it is finite) before a value is used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import torch
from torch.futures import Future
from torch.distributed.checkpoint import StorageReader, StorageWriter
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

from shadow.checkpoint.errors import CheckpointError
from shadow.checkpoint.tensor_index import Chunk, StoredTensor, build_index, data_file


@dataclasses.dataclass(frozen=True)
class _Written:
    """What a rank reports back for one chunk it wrote (DCP gathers these to the coordinator)."""

    chunk: Chunk
    file_bytes: int  # the whole data file's size and sha256, for the manifest
    file_sha256: str


def _completed(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future  # the work is done in the call: DCP only waits on the result


class ShardWriter(StorageWriter):
    """Writes one checkpoint step; `commit(index, files)` is the store's manifest-last commit."""

    def __init__(self, store, step: int, meta: dict):
        super().__init__()
        self.store, self.step, self.meta = store, step, meta
        self.is_coordinator = False
        self.num_bytes = 0  # what this rank wrote; on the coordinator, the whole checkpoint after finish

    def reset(self, checkpoint_id=None) -> None:
        pass

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return False

    def set_up_storage_writer(self, is_coordinator: bool, *args, **kwargs) -> None:
        # An earlier, possibly partial, save of this step goes first. DCP gathers every rank's plan to the
        # coordinator after this call, so no rank writes before the old files are gone.
        self.is_coordinator = is_coordinator
        if is_coordinator:
            self.store.discard_step(self.step)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return [dataclasses.replace(plan, storage_data=data_file(rank)) for rank, plan in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future:
        if not plan.items:
            return _completed([])
        name = plan.storage_data
        written: list[tuple] = []
        file_hash = hashlib.sha256()
        offset = 0
        with self.store.open_writer(self.step, name) as out:
            for item in plan.items:
                if item.type == WriteItemType.BYTE_IO:
                    raise CheckpointError(f"{self.store.step_uri(self.step)}: {item.index.fqn!r} is not a tensor; "
                                          "a shadow checkpoint holds tensors only (other state goes to meta.json)")
                tensor = planner.resolve_data(item).detach()
                raw = _bytes_of(tensor)
                out.write(raw)
                file_hash.update(raw)
                chunk = item.tensor_data.chunk
                written.append((item.index, Chunk(tuple(chunk.offsets), tuple(chunk.sizes), name, offset, len(raw),
                                                  hashlib.sha256(raw).hexdigest())))
                offset += len(raw)
        self.num_bytes = offset
        digest = file_hash.hexdigest()
        return _completed([WriteResult(index=index, size_in_bytes=chunk.num_bytes,
                                       storage_data=_Written(chunk, offset, digest)) for index, chunk in written])

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        tensors: dict[str, StoredTensor] = {}
        files: dict[str, tuple[int, str]] = {}
        chunks: dict[str, list[Chunk]] = {}
        for result in (r for rank_results in results for r in rank_results):
            chunks.setdefault(result.index.fqn, []).append(result.storage_data.chunk)
            files[result.storage_data.chunk.file] = (result.storage_data.file_bytes, result.storage_data.file_sha256)
        for fqn, entry in metadata.state_dict_metadata.items():
            if isinstance(entry, BytesStorageMetadata):
                raise CheckpointError(f"{self.store.step_uri(self.step)}: {fqn!r} is not a tensor")
            tensors[fqn] = StoredTensor(entry.properties.dtype, tuple(entry.size), tuple(chunks.get(fqn, ())))
        meta = json.dumps({**self.meta, "step": self.step}, sort_keys=True, indent=1).encode()
        self.num_bytes = self.store.commit_step(self.step, files, build_index(tensors), meta,
                                                job_hash=self.meta.get("job_hash", ""))

    def storage_meta(self):
        return None


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without a copy when it is contiguous on the CPU (the staged snapshot is)."""
    flat = tensor.cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class ShardReader(StorageReader):
    """Reads one opened checkpoint (`StoredCheckpoint`) into the tensors DCP's load plan names."""

    def __init__(self, checkpoint, *, check_values):
        super().__init__()
        self.checkpoint = checkpoint
        self.check_values = check_values  # called with (name, chunk, its values) for every chunk read
        self._by_index = {
            MetadataIndex(name, torch.Size(chunk.offsets)): (name, chunk)
            for name, stored in checkpoint.index.items() for chunk in stored.chunks
        }

    def reset(self, checkpoint_id=None) -> None:
        pass

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return False

    def read_metadata(self, *args, **kwargs) -> Metadata:
        return Metadata(state_dict_metadata={
            name: TensorStorageMetadata(
                properties=TensorProperties(dtype=stored.dtype),
                size=torch.Size(stored.shape),
                chunks=[ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)) for c in stored.chunks],
            )
            for name, stored in self.checkpoint.index.items()
        })

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args, **kwargs) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        cached: tuple[MetadataIndex, torch.Tensor] | None = None  # consecutive items often share a chunk
        for item in plan.items:
            name, chunk = self._by_index[item.storage_index]
            if cached is None or cached[0] != item.storage_index:
                values = self.checkpoint.read_chunk(name, chunk)
                self.check_values(name, chunk, values)
                cached = (item.storage_index, values)
            source = cached[1]
            for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths)):
                source = source.narrow(dim, start, length)
            target = planner.resolve_tensor(item).detach()
            target.copy_(source)
            planner.commit_tensor(item, target)
        return _completed(None)
