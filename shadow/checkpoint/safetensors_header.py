"""Read a safetensors file's header without decoding its tensors: names, dtypes, shapes, byte ranges.

The checks are those the safetensors loader makes (and a few it leaves to its callers), done here first
so that every way a header can be wrong is a `CheckpointError` naming the file and the tensor, and so
that a checkpoint's names, shapes and dtypes can be checked against the job before torch sees a byte
of it: a known dtype, a shape of non-negative integers, a byte range that holds exactly that shape,
and ranges that tile the data section with no gap or overlap.
"""

from __future__ import annotations

import math

import torch

from shadow.checkpoint.errors import CheckpointError, InvalidCheckpoint
from shadow.checkpoint.strict_json import describe, parse_object

# the dtypes shadow's snapshots use, by safetensors name
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors loader's own limit
MAX_DIMS = 8
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def read_header(data: bytes, where: str, file: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) of the safetensors file `file` (its bytes: `data`) in checkpoint `where`."""
    if len(data) < 8:
        raise CheckpointError(f"{where}/{file}: not a valid safetensors file ({len(data)} bytes, shorter than "
                              "the 8-byte header length)")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8 or header_len > MAX_HEADER_BYTES:
        raise CheckpointError(f"{where}/{file}: not a valid safetensors file (header length {header_len} "
                              f"exceeds the file's {len(data) - 8} bytes after it)")
    header = parse_object(data[8 : 8 + header_len], f"{where}/{file}", max_bytes=MAX_HEADER_BYTES, part="header")
    body_len = len(data) - 8 - header_len
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidCheckpoint(where, file, "'__metadata__'", describe(metadata), "an object of strings")
    tensors, ranges = {}, []
    for name, entry in header.items():
        dtype, shape, (begin, end) = _entry(where, file, name, entry, body_len)
        tensors[name] = (dtype, shape)
        ranges.append((begin, end, name))
    _check_tiling(where, file, sorted(ranges), body_len)
    return tensors


def _entry(where: str, file: str, name: str, entry, body_len: int):
    key = f"tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        found = sorted(entry) if isinstance(entry, dict) else describe(entry)
        raise InvalidCheckpoint(where, file, key, f"header entry {found}", f"an object with keys {sorted(_ENTRY_KEYS)}")
    dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise InvalidCheckpoint(where, file, key, f"dtype {describe(dtype_name)}", f"one of {sorted(DTYPES)}")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_is_count(d) for d in shape)):
        raise InvalidCheckpoint(where, file, key, f"shape {describe(shape)}",
                                f"a list of at most {MAX_DIMS} non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1] <= body_len):
        raise InvalidCheckpoint(where, file, key, f"data_offsets {describe(offsets)}",
                                f"[begin, end] with 0 <= begin <= end <= {body_len} (the data section)")
    dtype = DTYPES[dtype_name]
    num_bytes = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != num_bytes:
        raise InvalidCheckpoint(where, file, key, f"data_offsets {offsets} span {offsets[1] - offsets[0]} bytes",
                                f"{num_bytes} (shape {shape} of {dtype_name})")
    return dtype, tuple(shape), tuple(offsets)


def _check_tiling(where: str, file: str, ranges: list[tuple[int, int, str]], body_len: int) -> None:
    position = 0
    for begin, end, name in ranges:
        if begin != position:
            raise InvalidCheckpoint(where, file, f"tensor {name!r}", f"data starts at byte {begin}",
                                    f"{position} (tensor data back to back, no gap or overlap)")
        position = end
    if position != body_len:
        raise CheckpointError(f"{where}/{file}: not a valid safetensors file ({body_len - position} bytes after "
                              "the last tensor's data)")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
