"""The on-storage checkpoint format: per-rank data files, JSON descriptions, and a manifest written last.

A checkpoint directory `step-<NNNNNNNNN>/` holds:
- `rank-NNNNN.bin`: the raw bytes of the tensor chunks rank N wrote (its shards of weights and
  optimizer state, and the replicated tensors DCP assigned to it), one after another;
- `tensors.json`: every tensor's global shape and dtype, and for each chunk its box, file, byte range
  and sha256 (`tensor_index.py`): what torch.distributed.checkpoint needs to load at any world size;
- `meta.json`: the step, precision, optimizer hyperparameters and job hash;
- `MANIFEST.json`, written only after all of the above are durable: the size and sha256 of every other
  file, the run, the step and the job hash. A directory without a valid manifest is an interrupted save
  and does not exist for readers. Nothing is pickled anywhere, so loading runs no code.

Reading is strict (`strict_json`, `tensor_index`, `validate`): every way the files can be wrong, even
with a manifest rewritten to match them, is a `CheckpointError` naming the URI and the file.
"""

from __future__ import annotations

import hashlib
import json
import re

from shadow.checkpoint.errors import CheckpointError, InvalidCheckpoint
from shadow.checkpoint.strict_json import describe, parse_object
from shadow.checkpoint.tensor_index import DATA_FILE, INDEX
from shadow.checkpoint.validate import META

FORMAT_VERSION = "shadow-checkpoint/2"
OLD_FORMATS = ("shadow-checkpoint/1",)  # one safetensors file per group, written by rank 0 (before DCP)
MANIFEST = "MANIFEST.json"
DESCRIPTIONS = (INDEX, META)  # the JSON files every checkpoint has once, next to its data files
MAX_JSON_BYTES = 2**20  # the manifest and meta.json are a few KB; more is not a shadow checkpoint
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def step_dirname(step: int) -> str:
    return f"step-{step:09d}"


def parse_step_dirname(name: str) -> int | None:
    if name.startswith("step-") and len(name) == 14 and name[5:].isdigit():
        return int(name[5:])
    return None


def build_manifest(files: dict[str, tuple[int, str]], *, run: str, step: int, job_hash: str) -> bytes:
    """`files`: every file of the checkpoint but the manifest, as (size, sha256)."""
    entries = [{"path": name, "bytes": size, "sha256": digest} for name, (size, digest) in sorted(files.items())]
    manifest = {"format": FORMAT_VERSION, "run": run, "step": step, "job_hash": job_hash, "files": entries}
    return json.dumps(manifest, sort_keys=True, indent=1).encode()


def parse_manifest(data: bytes, where: str) -> dict:
    """Validate a manifest's structure: its JSON files once each, data files, each with size and sha256."""
    manifest = parse_object(data, f"{where}/{MANIFEST}", max_bytes=MAX_JSON_BYTES)
    if manifest.get("format") in OLD_FORMATS:
        raise CheckpointError(f"{where}/{MANIFEST}: a {manifest['format']} checkpoint (written before sharded "
                              f"checkpoints); this version of shadow reads {FORMAT_VERSION}: start the run anew")
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{where}/{MANIFEST}: not a {FORMAT_VERSION} manifest")
    for key, expected in (("run", "a string"), ("job_hash", "a string"), ("step", "an integer")):
        value = manifest.get(key)
        if not (isinstance(value, int) and not isinstance(value, bool) if key == "step" else isinstance(value, str)):
            raise InvalidCheckpoint(where, MANIFEST, repr(key), describe(value) if key in manifest else "missing",
                                    expected)
    entries = manifest.get("files")
    if not isinstance(entries, list) or not entries:
        raise CheckpointError(f"{where}/{MANIFEST}: 'files' must be a non-empty list")
    for index, entry in enumerate(entries):
        _check_entry(entry, f"files[{index}]", where)
    listed = [entry["path"] for entry in entries]
    for name in DESCRIPTIONS:
        if listed.count(name) != 1:
            raise InvalidCheckpoint(where, MANIFEST, "'files'", f"{name} listed {listed.count(name)} times",
                                    f"each of {list(DESCRIPTIONS)} once")
    repeated = sorted({name for name in listed if listed.count(name) > 1})
    if repeated:
        raise InvalidCheckpoint(where, MANIFEST, "'files'", f"{repeated[0]} listed {listed.count(repeated[0])} times",
                                "each file once")
    return manifest


def _check_entry(entry, key: str, where: str) -> None:
    """One manifest entry: a plain file name of the format (never a path), a size, a sha256."""
    if not isinstance(entry, dict):
        raise InvalidCheckpoint(where, MANIFEST, key, describe(entry), "an object with path, bytes and sha256")
    path, size, digest = entry.get("path"), entry.get("bytes"), entry.get("sha256")
    if isinstance(path, str) and (path in ("", ".", "..") or any(c in path for c in "/\\\0")):
        raise CheckpointError(f"{where}/{MANIFEST}: file path {path!r} is outside the checkpoint directory")
    if not (path in DESCRIPTIONS or (isinstance(path, str) and DATA_FILE.match(path))):
        raise InvalidCheckpoint(where, MANIFEST, f"{key}.path", describe(path) if "path" in entry else "missing",
                                f"one of {list(DESCRIPTIONS)} or a data file rank-NNNNN.bin")
    if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0):
        raise InvalidCheckpoint(where, MANIFEST, f"{key}.bytes", describe(size) if "bytes" in entry else "missing",
                                f"the size of {path} (a non-negative integer)")
    if not (isinstance(digest, str) and _SHA256.match(digest)):
        raise InvalidCheckpoint(where, MANIFEST, f"{key}.sha256", describe(digest) if "sha256" in entry
                                else "missing", f"the sha256 of {path} (64 lowercase hex digits)")


def check_identity(manifest: dict, where: str, *, run: str, step: int, job_hash: str | None) -> None:
    """Refuse a manifest written for another run, step or job config (e.g. a directory copied in)."""
    if manifest.get("run") != run:
        raise CheckpointError(f"{where}/{MANIFEST}: written by run {manifest.get('run')!r}, this store is run "
                              f"{run!r}; point --checkpoint at the run that wrote it")
    if manifest.get("step") != step:
        raise CheckpointError(f"{where}/{MANIFEST}: records step {manifest.get('step')}, expected {step}")
    if job_hash is not None and manifest.get("job_hash") != job_hash:
        raise CheckpointError(f"{where}/{MANIFEST}: written by job {manifest.get('job_hash')!r}, this job is "
                              f"{job_hash!r}; use the job config (and --set overrides) of the run that wrote it")


def verify_file(entry: dict, data: bytes, where: str) -> None:
    """A small (JSON) file's size and sha256 as the manifest records them."""
    if len(data) != entry["bytes"]:
        raise CheckpointError(
            f"{where}/{entry['path']}: {len(data)} bytes, manifest says {entry['bytes']} (truncated or replaced)"
        )
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(f"{where}/{entry['path']}: sha256 does not match the manifest (corrupted)")
