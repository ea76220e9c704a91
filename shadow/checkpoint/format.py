"""The on-storage checkpoint format: safetensors + JSON, with a manifest written last.

A checkpoint directory `step-<NNNNNNNNN>/` holds `model.safetensors`, `optim.safetensors`,
`precision.safetensors` (backend scaling state kept outside the model, e.g. Transformer Engine's),
`rng.safetensors`, `meta.json` and `MANIFEST.json`. The manifest lists every other file with its
size and sha256 and is written only after all of them: a directory without a valid manifest is an
interrupted save and does not exist for readers. Nothing is pickled, so loading runs no code.

Reading is strict (`strict_json`, `safetensors_header`, `validate`): every way the files can be wrong,
even with a manifest rewritten to match them, is a `CheckpointError` naming the URI and the file.
"""

from __future__ import annotations

import hashlib
import json
import re

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from shadow.checkpoint.errors import CheckpointError, InvalidCheckpoint
from shadow.checkpoint.safetensors_header import read_header
from shadow.checkpoint.strict_json import describe, parse_object
from shadow.checkpoint.validate import META, check_layout, check_meta, check_values
from shadow.snapshot import Snapshot, SnapshotLayout

FORMAT_VERSION = "shadow-checkpoint/1"
MANIFEST = "MANIFEST.json"
TENSOR_GROUPS = ("model", "optim", "precision", "rng")
FILES = tuple(f"{group}.safetensors" for group in TENSOR_GROUPS) + (META,)
MAX_JSON_BYTES = 2**20  # the manifest and meta.json are a few KB; more is not a shadow checkpoint
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def step_dirname(step: int) -> str:
    return f"step-{step:09d}"


def parse_step_dirname(name: str) -> int | None:
    if name.startswith("step-") and len(name) == 14 and name[5:].isdigit():
        return int(name[5:])
    return None


def encode(snapshot: Snapshot) -> dict[str, bytes]:
    """The files of a checkpoint (without the manifest)."""
    files = {}
    for group in TENSOR_GROUPS:
        tensors = {k: v.contiguous() for k, v in snapshot.group(group).items()}
        files[f"{group}.safetensors"] = save_safetensors(tensors)
    files[META] = json.dumps({**snapshot.meta, "step": snapshot.step}, sort_keys=True, indent=1).encode()
    return files


def build_manifest(files: dict[str, bytes], *, run: str, step: int, job_hash: str) -> bytes:
    entries = [
        {"path": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for name, data in sorted(files.items())
    ]
    manifest = {"format": FORMAT_VERSION, "run": run, "step": step, "job_hash": job_hash, "files": entries}
    return json.dumps(manifest, sort_keys=True, indent=1).encode()


def parse_manifest(data: bytes, where: str) -> dict:
    """Validate a manifest's structure: each of the format's files once, with its size and sha256."""
    manifest = parse_object(data, f"{where}/{MANIFEST}", max_bytes=MAX_JSON_BYTES)
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
    for name in FILES:
        if listed.count(name) != 1:
            raise InvalidCheckpoint(where, MANIFEST, "'files'", f"{name} listed {listed.count(name)} times",
                                    f"each of {list(FILES)} once")
    return manifest


def _check_entry(entry, key: str, where: str) -> None:
    """One manifest entry: a plain file name of the format (never a path), a size, a sha256."""
    if not isinstance(entry, dict):
        raise InvalidCheckpoint(where, MANIFEST, key, describe(entry), "an object with path, bytes and sha256")
    path, size, digest = entry.get("path"), entry.get("bytes"), entry.get("sha256")
    if isinstance(path, str) and (path in ("", ".", "..") or any(c in path for c in "/\\\0")):
        raise CheckpointError(f"{where}/{MANIFEST}: file path {path!r} is outside the checkpoint directory")
    if path not in FILES:
        raise InvalidCheckpoint(where, MANIFEST, f"{key}.path", describe(path) if "path" in entry else "missing",
                                f"one of {list(FILES)}")
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
    """Size and sha256 as the manifest records them, then a safetensors file's header (without decoding
    its tensors); meta.json is parsed where its fields are checked (`check_meta`)."""
    if len(data) != entry["bytes"]:
        raise CheckpointError(
            f"{where}/{entry['path']}: {len(data)} bytes, manifest says {entry['bytes']} (truncated or replaced)"
        )
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(f"{where}/{entry['path']}: sha256 does not match the manifest (corrupted)")
    if entry["path"].endswith(".safetensors"):
        read_header(data, where, entry["path"])


def decode(files: dict[str, bytes], where: str, *, step: int | None = None, job_hash: str | None = None,
           layout: SnapshotLayout | None = None, allow_nonfinite: bool = False) -> Snapshot:
    """Rebuild a snapshot from verified files. Only safetensors and JSON are parsed: no code runs.

    With a `layout` (the job about to train from it) everything is checked against the job before any
    tensor is decoded, and the decoded values after (see `validate`).
    """
    meta = parse_object(files[META], f"{where}/{META}", max_bytes=MAX_JSON_BYTES)
    check_meta(meta, where, step=step, job_hash=job_hash, layout=layout)
    if layout is not None:
        check_layout({g: read_header(files[f"{g}.safetensors"], where, f"{g}.safetensors") for g in TENSOR_GROUPS},
                     where, layout)
    tensors = {}
    for group in TENSOR_GROUPS:
        name = f"{group}.safetensors"
        try:
            loaded = load_safetensors(files[name])
        except (SafetensorError, ValueError) as exc:
            raise CheckpointError(f"{where}/{name}: not a valid safetensors file ({exc})") from None
        tensors.update({f"{group}.{k}": v for k, v in loaded.items()})
    if layout is not None:
        check_values(tensors, where, layout, allow_nonfinite=allow_nonfinite)
    return Snapshot(step=meta["step"], tensors=tensors, meta=meta)
