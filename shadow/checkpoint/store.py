"""Checkpoint stores: the same commit protocol over a local directory (and, later, S3).

`save` writes every file of the checkpoint and then the manifest; `load` reads the manifest, reads
each listed file and checks its size and sha256 before decoding. The layout is
`<root>/<run>/step-<NNNNNNNNN>/<file>`.
"""

from __future__ import annotations

import os
import shutil
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from shadow.checkpoint.format import (
    MANIFEST,
    CheckpointError,
    build_manifest,
    decode,
    encode,
    parse_manifest,
    parse_step_dirname,
    step_dirname,
    verify_file,
)
from shadow.snapshot import Snapshot


@dataclass(frozen=True)
class CommitInfo:
    step: int
    uri: str
    num_bytes: int
    seconds: float


class CheckpointStore(ABC):
    def __init__(self, root: str, run: str):
        self.root = root.rstrip("/")
        self.run = run

    @property
    def run_uri(self) -> str:
        return f"{self.root}/{self.run}"

    def step_uri(self, step: int) -> str:
        return f"{self.run_uri}/{step_dirname(step)}"

    @abstractmethod
    def _write(self, step: int, name: str, data: bytes) -> None: ...

    @abstractmethod
    def _read(self, step: int, name: str) -> bytes:
        """Raise FileNotFoundError when absent."""

    @abstractmethod
    def _step_dirs(self) -> list[str]: ...

    @abstractmethod
    def _delete(self, step: int) -> None: ...

    def save(self, snapshot: Snapshot) -> CommitInfo:
        start = time.perf_counter()
        files = encode(snapshot)
        self._delete(snapshot.step)  # an earlier, possibly partial, save of this step
        for name, data in files.items():
            self._write(snapshot.step, name, data)
        manifest = build_manifest(files, run=self.run, step=snapshot.step, job_hash=snapshot.meta.get("job_hash", ""))
        self._write(snapshot.step, MANIFEST, manifest)
        num_bytes = sum(len(d) for d in files.values()) + len(manifest)
        return CommitInfo(snapshot.step, self.step_uri(snapshot.step), num_bytes, time.perf_counter() - start)

    def _manifest(self, step: int) -> dict:
        where = self.step_uri(step)
        try:
            data = self._read(step, MANIFEST)
        except FileNotFoundError:
            raise CheckpointError(f"{where}/{MANIFEST}: missing (the save was interrupted)") from None
        return parse_manifest(data, where)

    def list_committed(self) -> list[int]:
        """Steps whose checkpoint has a well-formed manifest, ascending."""
        steps = []
        for name in self._step_dirs():
            step = parse_step_dirname(name)
            if step is None:
                continue
            try:
                self._manifest(step)
            except CheckpointError:
                continue
            steps.append(step)
        return sorted(steps)

    def latest_committed(self) -> int | None:
        steps = self.list_committed()
        return steps[-1] if steps else None

    def load(self, step: int, expected_job_hash: str | None = None) -> Snapshot:
        where = self.step_uri(step)
        manifest = self._manifest(step)
        if manifest.get("step") != step:
            raise CheckpointError(f"{where}/{MANIFEST}: records step {manifest.get('step')}, expected {step}")
        if expected_job_hash is not None and manifest.get("job_hash") != expected_job_hash:
            raise CheckpointError(
                f"{where}/{MANIFEST}: written by job {manifest.get('job_hash')!r}, this job is {expected_job_hash!r}"
            )
        files = {}
        for entry in manifest["files"]:
            try:
                data = self._read(step, entry["path"])
            except FileNotFoundError:
                raise CheckpointError(f"{where}/{entry['path']}: listed in the manifest but missing") from None
            verify_file(entry, data, where)
            files[entry["path"]] = data
        return decode(files, where)


class LocalStore(CheckpointStore):
    """A directory on a local or mounted file system; files are fsynced before the manifest."""

    def __init__(self, root: str, run: str):
        super().__init__(str(Path(root).expanduser().absolute()), run)

    def _dir(self, step: int) -> Path:
        return Path(self.run_uri) / step_dirname(step)

    def _write(self, step: int, name: str, data: bytes) -> None:
        directory = self._dir(step)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{name}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / name)
        if name == MANIFEST:
            _fsync_dir(directory)

    def _read(self, step: int, name: str) -> bytes:
        return (self._dir(step) / name).read_bytes()

    def _step_dirs(self) -> list[str]:
        run_dir = Path(self.run_uri)
        return [p.name for p in run_dir.iterdir() if p.is_dir()] if run_dir.is_dir() else []

    def _delete(self, step: int) -> None:
        shutil.rmtree(self._dir(step), ignore_errors=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_store(uri: str, run: str) -> CheckpointStore:
    """A store for `uri`: a path or file:// URI (s3:// arrives with the S3 store)."""
    if uri.startswith("file://"):
        return LocalStore(uri[len("file://") :], run)
    if "://" in uri:
        raise CheckpointError(f"checkpoint.uri: {uri!r} has an unsupported scheme; use a path or file://")
    return LocalStore(uri, run)


def locate_checkpoint(uri: str) -> tuple[CheckpointStore, int]:
    """Split `<root>/<run>/step-<N>` (a path or URI) into its store and step."""
    trimmed = uri.rstrip("/")
    head, _, name = trimmed.rpartition("/")
    root, _, run = head.rpartition("/")
    step = parse_step_dirname(name)
    if step is None or not run:
        raise CheckpointError(f"{uri}: expected a checkpoint directory named like <root>/<run>/step-000000050")
    return open_store(root or "/", run), step
