"""`tensors.json`: where every tensor of a sharded checkpoint lies, as JSON instead of DCP's pickle.

torch.distributed.checkpoint (DCP) describes a checkpoint with a `Metadata` object (global shape and
dtype of every tensor, the chunks each rank wrote, and where each chunk's bytes are) that its own
file system writer pickles. shadow writes the same facts as JSON and rebuilds the `Metadata` from it,
so reading a checkpoint never unpickles anything:

    {"format": "shadow-tensors/1",
     "tensors": {"model.blocks.0.attn.wq.weight": {"dtype": "float32", "shape": [128, 128],
                 "chunks": [{"offsets": [0, 0], "sizes": [64, 128], "file": "rank-00000.bin",
                             "offset": 0, "bytes": 32768, "sha256": "..."}, ...]}, ...}}

A chunk is a box of the global tensor (`offsets`, `sizes`), stored as `bytes` contiguous bytes at
`offset` in a rank's data file, with the sha256 of exactly those bytes: a reader checks the bytes it
reads, and nothing else of the (possibly huge) file needs to be hashed to load. `parse_index` checks
all of it before any byte of a data file is read: dtypes, shapes, chunks that tile each tensor with no
gap or overlap, byte ranges that hold exactly their chunk and lie inside the files the manifest lists.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import torch

from shadow.checkpoint.errors import CheckpointError, InvalidCheckpoint
from shadow.checkpoint.strict_json import describe, parse_object

INDEX = "tensors.json"
INDEX_FORMAT = "shadow-tensors/1"
MAX_INDEX_BYTES = 64 * 2**20  # a few KB per tensor; a 70B model's index is a few MB
MAX_DIMS = 8
DATA_FILE = re.compile(r"^rank-\d{5}\.bin$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# the dtypes shadow's checkpoints hold, by torch name
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


def data_file(rank: int) -> str:
    return f"rank-{rank:05d}.bin"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Chunk:
    """One stored box of a tensor and where its bytes are."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int  # byte offset in `file`
    num_bytes: int
    sha256: str

    def to_json(self) -> dict:
        return {"offsets": list(self.offsets), "sizes": list(self.sizes), "file": self.file, "offset": self.offset,
                "bytes": self.num_bytes, "sha256": self.sha256}


@dataclass(frozen=True)
class StoredTensor:
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]


def build_index(tensors: dict[str, StoredTensor]) -> bytes:
    body = {name: {"dtype": dtype_name(t.dtype), "shape": list(t.shape),
                   "chunks": [c.to_json() for c in sorted(t.chunks, key=lambda c: c.offsets)]}
            for name, t in sorted(tensors.items())}
    return json.dumps({"format": INDEX_FORMAT, "tensors": body}, sort_keys=True, indent=1).encode()


def parse_index(data: bytes, where: str, file_sizes: dict[str, int]) -> dict[str, StoredTensor]:
    """The index of the checkpoint at `where`; `file_sizes` are the data files the manifest lists."""
    index = parse_object(data, f"{where}/{INDEX}", max_bytes=MAX_INDEX_BYTES)
    unknown = sorted(set(index) - {"format", "tensors"})
    if unknown:
        raise InvalidCheckpoint(where, INDEX, repr(unknown[0]), "unknown key", "only 'format' and 'tensors'")
    if index.get("format") != INDEX_FORMAT:
        raise InvalidCheckpoint(where, INDEX, "'format'", describe(index.get("format")) if "format" in index
                                else "missing", repr(INDEX_FORMAT))
    entries = index.get("tensors")
    if not isinstance(entries, dict) or not entries:
        raise InvalidCheckpoint(where, INDEX, "'tensors'", describe(entries) if "tensors" in index else "missing",
                                "a non-empty object of tensors by name")
    return {name: _tensor(where, name, entry, file_sizes) for name, entry in entries.items()}


def _tensor(where: str, name: str, entry, file_sizes: dict[str, int]) -> StoredTensor:
    key = f"tensor {name!r}"

    def refuse(field: str, found, expected: str):
        raise InvalidCheckpoint(where, INDEX, f"{key}{field}", found, expected)

    if not isinstance(entry, dict):
        refuse("", describe(entry), "an object with dtype, shape and chunks")
    unknown = sorted(set(entry) - {"dtype", "shape", "chunks"})
    if unknown:
        refuse(f" {unknown[0]!r}", "unknown key", "only 'dtype', 'shape' and 'chunks'")
    dtype = DTYPES.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
    if dtype is None:
        refuse(" dtype", describe(entry.get("dtype")) if "dtype" in entry else "missing", f"one of {sorted(DTYPES)}")
    shape = entry.get("shape")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_is_count(d) for d in shape)):
        refuse(" shape", describe(shape) if "shape" in entry else "missing",
               f"a list of at most {MAX_DIMS} non-negative integers")
    shape = tuple(shape)
    chunks = entry.get("chunks")
    if not isinstance(chunks, list) or not chunks:
        refuse(" chunks", describe(chunks) if "chunks" in entry else "missing", "a non-empty list of chunks")
    parsed = tuple(_chunk(where, f"{key} chunks[{i}]", c, shape, dtype, file_sizes) for i, c in enumerate(chunks))
    _check_tiling(where, key, parsed, shape)
    return StoredTensor(dtype, shape, parsed)


def _chunk(where: str, key: str, entry, shape: tuple[int, ...], dtype: torch.dtype,
           file_sizes: dict[str, int]) -> Chunk:
    def refuse(field: str, found, expected: str):
        raise InvalidCheckpoint(where, INDEX, f"{key}{field}", found, expected)

    if not isinstance(entry, dict):
        refuse("", describe(entry), "an object with offsets, sizes, file, offset, bytes and sha256")
    unknown = sorted(set(entry) - {"offsets", "sizes", "file", "offset", "bytes", "sha256"})
    if unknown:
        refuse(f" {unknown[0]!r}", "unknown key", "only 'offsets', 'sizes', 'file', 'offset', 'bytes' and 'sha256'")
    for field in ("offsets", "sizes"):
        value = entry.get(field)
        if not (isinstance(value, list) and len(value) == len(shape) and all(_is_count(v) for v in value)):
            refuse(f".{field}", describe(value) if field in entry else "missing",
                   f"{len(shape)} non-negative integers (one per dimension)")
    offsets, sizes = tuple(entry["offsets"]), tuple(entry["sizes"])
    if any(o + s > d for o, s, d in zip(offsets, sizes, shape)):
        refuse("", f"the box at {list(offsets)} of size {list(sizes)}", f"a box inside the shape {list(shape)}")
    file = entry.get("file")
    if not (isinstance(file, str) and file in file_sizes):
        refuse(".file", describe(file) if "file" in entry else "missing",
               f"a data file the manifest lists ({sorted(file_sizes)})")
    offset, num_bytes, digest = entry.get("offset"), entry.get("bytes"), entry.get("sha256")
    if not _is_count(offset):
        refuse(".offset", describe(offset) if "offset" in entry else "missing", "a non-negative integer")
    expected_bytes = math.prod(sizes) * dtype.itemsize
    if num_bytes != expected_bytes or not _is_count(num_bytes):
        refuse(".bytes", describe(num_bytes) if "bytes" in entry else "missing",
               f"{expected_bytes} (the chunk's {math.prod(sizes)} values of {dtype_name(dtype)})")
    if offset + num_bytes > file_sizes[file]:
        refuse("", f"bytes [{offset}, {offset + num_bytes}) of {file}", f"a range inside its {file_sizes[file]} bytes")
    if not (isinstance(digest, str) and _SHA256.match(digest)):
        refuse(".sha256", describe(digest) if "sha256" in entry else "missing", "64 lowercase hex digits")
    return Chunk(offsets, sizes, file, offset, num_bytes, digest)


def _check_tiling(where: str, key: str, chunks: tuple[Chunk, ...], shape: tuple[int, ...]) -> None:
    """The chunks cover the tensor exactly once: their volumes add up to it and no two overlap.

    A sweep along dimension 0 compares a chunk only with those whose rows it shares, so FSDP2's row
    shards (one per rank, thousands at scale) cost O(n log n), not every pair."""
    def rows(chunk: Chunk) -> tuple[int, int]:
        return (chunk.offsets[0], chunk.offsets[0] + chunk.sizes[0]) if chunk.offsets else (0, 1)

    live: list[Chunk] = []
    for a in sorted((c for c in chunks if math.prod(c.sizes)), key=rows):
        live = [b for b in live if rows(b)[1] > rows(a)[0]]
        for b in live:
            if all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in zip(a.offsets, a.sizes, b.offsets, b.sizes)):
                raise InvalidCheckpoint(where, INDEX, key, f"chunks at {list(b.offsets)} and {list(a.offsets)} overlap",
                                        "chunks that cover the tensor once")
        live.append(a)
    covered = sum(math.prod(c.sizes) for c in chunks)
    if covered != math.prod(shape):
        raise InvalidCheckpoint(where, INDEX, key, f"chunks cover {covered} of its {math.prod(shape)} values",
                                "chunks that cover the tensor once")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**62


def chunk_tensor(data: bytes | bytearray | memoryview, chunk: Chunk, dtype: torch.dtype, where: str,
                 name: str) -> torch.Tensor:
    """The chunk's values from the bytes read for it, after checking them against its sha256."""
    import hashlib

    if len(data) != chunk.num_bytes:
        raise CheckpointError(f"{where}/{chunk.file}: tensor {name!r}: read {len(data)} bytes at {chunk.offset}, "
                              f"expected {chunk.num_bytes} (truncated)")
    if hashlib.sha256(data).hexdigest() != chunk.sha256:
        raise CheckpointError(f"{where}/{chunk.file}: tensor {name!r}: the bytes of its chunk at "
                              f"{list(chunk.offsets)} do not match their sha256 in {INDEX} (corrupted)")
    if not chunk.num_bytes:
        return torch.empty(chunk.sizes, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(chunk.sizes)
