"""The on-storage checkpoint format: safetensors + JSON, with a manifest written last.

A checkpoint directory `step-<NNNNNNNNN>/` holds `model.safetensors`, `optim.safetensors`,
`precision.safetensors` (backend scaling state kept outside the model, e.g. Transformer Engine's),
`rng.safetensors`, `meta.json` and `MANIFEST.json`. The manifest lists every other file with its
size and sha256 and is written only after all of them: a directory without a valid manifest is an
interrupted save and does not exist for readers. Nothing is pickled, so loading runs no code.
"""

from __future__ import annotations

import hashlib
import json
import posixpath

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from shadow.snapshot import Snapshot

FORMAT_VERSION = "shadow-checkpoint/1"
MANIFEST = "MANIFEST.json"
META = "meta.json"
TENSOR_GROUPS = ("model", "optim", "precision", "rng")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the URI and the file."""


class StorageError(CheckpointError):
    """The storage could not be reached or refused access: the checkpoint itself may be fine.

    Kept apart from damaged checkpoints so that a search for the newest usable checkpoint stops on
    it instead of silently falling back to an older one.
    """


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
    """Validate a manifest's structure; every path must be a plain file name inside the checkpoint."""
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{where}/{MANIFEST}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{where}/{MANIFEST}: not a {FORMAT_VERSION} manifest")
    entries = manifest.get("files")
    if not isinstance(entries, list) or not entries:
        raise CheckpointError(f"{where}/{MANIFEST}: 'files' must be a non-empty list")
    for entry in entries:
        path = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(path, str) or not _is_plain_name(path):
            raise CheckpointError(f"{where}/{MANIFEST}: file path {path!r} is outside the checkpoint directory")
        if not isinstance(entry.get("bytes"), int) or not isinstance(entry.get("sha256"), str):
            raise CheckpointError(f"{where}/{MANIFEST}: entry for {path} lacks bytes/sha256")
    return manifest


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


def _is_plain_name(path: str) -> bool:
    return path not in ("", ".", "..") and "/" not in path and "\\" not in path and posixpath.basename(path) == path


def verify_file(entry: dict, data: bytes, where: str) -> None:
    """Size and sha256 as the manifest records them, then the file's structure (without decoding it)."""
    if len(data) != entry["bytes"]:
        raise CheckpointError(
            f"{where}/{entry['path']}: {len(data)} bytes, manifest says {entry['bytes']} (truncated or replaced)"
        )
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(f"{where}/{entry['path']}: sha256 does not match the manifest (corrupted)")
    if entry["path"].endswith(".safetensors") and not _is_safetensors(data):
        raise CheckpointError(f"{where}/{entry['path']}: not a valid safetensors file (header does not parse)")


def _is_safetensors(data: bytes) -> bool:
    """The 8-byte header length, a JSON header, and every tensor's byte range inside the file.

    Checks structure only, so verifying a large checkpoint does not materialize its tensors.
    """
    if len(data) < 8:
        return False
    header_len = int.from_bytes(data[:8], "little")
    if header_len > len(data) - 8:
        return False
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    if not isinstance(header, dict):
        return False
    body_len = len(data) - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= body_len):
            return False
    return True


def decode(files: dict[str, bytes], where: str) -> Snapshot:
    """Rebuild a snapshot from verified files. Only safetensors and JSON are parsed: no code runs."""
    tensors = {}
    for group in TENSOR_GROUPS:
        name = f"{group}.safetensors"
        if name not in files:
            raise CheckpointError(f"{where}/{name}: missing from the checkpoint")
        try:
            loaded = load_safetensors(files[name])
        except (SafetensorError, ValueError) as exc:
            raise CheckpointError(f"{where}/{name}: not a valid safetensors file ({exc})") from None
        tensors.update({f"{group}.{k}": v for k, v in loaded.items()})
    if META not in files:
        raise CheckpointError(f"{where}/{META}: missing from the checkpoint")
    try:
        meta = json.loads(files[META])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{where}/{META}: not valid JSON ({exc})") from None
    return Snapshot(step=int(meta["step"]), tensors=tensors, meta=meta)
