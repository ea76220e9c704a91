"""The checkpoint store: one commit protocol over any storage (a directory, an S3 prefix).

Layout: `<root>/<run>/step-<NNNNNNNNN>/<file>` and `<root>/<run>/pins/<pin>`.
- `save` writes every file of the checkpoint, then `MANIFEST.json` (sizes and sha256 of all of them).
  The manifest is the commit: a step directory without one is an interrupted save, invisible to readers.
- `load` reads the manifest and every listed file, checks size and sha256, then decodes safetensors and
  JSON only. Files the manifest does not list are never opened. Given the job's layout, it also checks
  the content against the job before returning it (`validate.py`).
- `latest_committed` is the newest checkpoint that verifies; damaged or foreign ones are skipped (and
  logged once), storage errors are raised. Verification results are cached per (step, manifest bytes).
- Retention deletes all but the newest `keep_last` committed checkpoints, except pinned ones and the
  latest; deletion removes the manifest first, so a half-deleted checkpoint is never readable.

Subclasses implement six primitives on paths relative to the run directory; they raise
FileNotFoundError for an absent file and StorageError for storage that cannot be used.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from abc import ABC, abstractmethod

from shadow.checkpoint.errors import CheckpointError, StorageError
from shadow.checkpoint.events import CheckpointDeleted, CommitInfo
from shadow.checkpoint.format import (
    MANIFEST,
    MAX_JSON_BYTES,
    build_manifest,
    check_identity,
    decode,
    encode,
    parse_manifest,
    parse_step_dirname,
    step_dirname,
    verify_file,
)
from shadow.checkpoint.retention import PINS_DIR, parse_pin_name, pin_name, select_for_deletion
from shadow.checkpoint.strict_json import parse_object
from shadow.checkpoint.validate import META, check_meta
from shadow.snapshot import Snapshot, SnapshotLayout

log = logging.getLogger(__name__)


class CheckpointStore(ABC):
    def __init__(self, root: str, run: str, keep_last: int = 0):
        self.root = root.rstrip("/")
        self.run = run
        self.keep_last = keep_last  # job `checkpoint.keep`: 0 keeps every checkpoint
        # (step, sha256 of the manifest) -> "" when every file matched, else the error text
        self._verified: dict[tuple[int, str], str] = {}
        self._verified_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.run_uri!r})"

    @property
    def run_uri(self) -> str:
        return f"{self.root}/{self.run}"

    def step_uri(self, step: int) -> str:
        return f"{self.run_uri}/{step_dirname(step)}"

    # -- storage primitives: paths are relative to the run directory, '/'-separated -----------------

    @abstractmethod
    def _put(self, path: str, data: bytes) -> None:
        """Write a whole file; readers see the old content, nothing, or all of the new one."""

    @abstractmethod
    def _get(self, path: str) -> bytes: ...

    @abstractmethod
    def _list(self, directory: str) -> tuple[list[str], list[str]]:
        """(subdirectory names, file names) directly under `directory` ("" is the run directory)."""

    @abstractmethod
    def _remove(self, path: str) -> None:
        """Delete one file; an absent file is not an error."""

    @abstractmethod
    def _remove_tree(self, directory: str) -> None:
        """Delete a directory and everything under it; an absent one is not an error."""

    @abstractmethod
    def check(self) -> None:
        """Fail fast, before training, if the storage is unreachable or refuses access (StorageError)."""

    # -- commit and read ----------------------------------------------------------------------------

    def save(self, snapshot: Snapshot) -> CommitInfo:
        start = time.perf_counter()
        step = snapshot.step
        files = encode(snapshot)
        self._delete_step(step)  # an earlier, possibly partial, save of this step
        for name, data in files.items():
            self._put(f"{step_dirname(step)}/{name}", data)
        manifest = build_manifest(files, run=self.run, step=step, job_hash=snapshot.meta.get("job_hash", ""))
        self._put(f"{step_dirname(step)}/{MANIFEST}", manifest)
        # these are the bytes just hashed: a later latest_committed() need not download them again
        self._remember(step, manifest, "")
        num_bytes = sum(len(d) for d in files.values()) + len(manifest)
        return CommitInfo(step, self.step_uri(step), num_bytes, time.perf_counter() - start)

    def load(self, step: int, expected_job_hash: str | None = None, layout: SnapshotLayout | None = None,
             allow_nonfinite: bool = False) -> Snapshot:
        """Read, verify (size and sha256 of every file, always) and decode a committed checkpoint.

        Callers that train from it pass the job's `layout`: the checkpoint is then checked against the
        job (meta.json, tensor names, shapes, dtypes, finite values unless `allow_nonfinite`) before the
        trainer sees it.
        """
        raw, manifest = self._manifest(step, expected_job_hash)
        files = self._verified_files(step, raw, manifest)
        return decode(files, self.step_uri(step), step=step, job_hash=manifest["job_hash"], layout=layout,
                      allow_nonfinite=allow_nonfinite)

    def verify(self, step: int, expected_job_hash: str | None = None, layout: SnapshotLayout | None = None) -> None:
        """Check a checkpoint: manifest, identity, every file's size, sha256 and structure, meta.json's fields.

        With a `layout`, also everything `load` checks against the job (which decodes the tensors; a
        non-finite checkpoint fails). Without one no tensor is decoded and the result is cached per manifest.
        """
        if layout is not None:
            self.load(step, expected_job_hash, layout)
            return
        raw, manifest = self._manifest(step, expected_job_hash)
        with self._verified_lock:
            known = self._verified.get((step, hashlib.sha256(raw).hexdigest()))
        if known is not None:
            if known:
                raise CheckpointError(known)
            return
        try:
            self._verified_files(step, raw, manifest)
        except StorageError:
            raise
        except CheckpointError as exc:
            log.warning("skipping damaged checkpoint: %s", exc)
            raise

    def list_committed(self) -> list[int]:
        """Steps with a well-formed manifest of this run, ascending (files are not hashed here)."""
        steps = []
        for step in self._step_dirs():
            try:
                self._manifest(step, None)
            except StorageError:
                raise
            except CheckpointError:
                continue
            steps.append(step)
        return steps

    def latest_committed(self, expected_job_hash: str | None = None) -> int | None:
        """The newest checkpoint that verifies (and belongs to `expected_job_hash` when given)."""
        for step in reversed(self._step_dirs()):
            try:
                self.verify(step, expected_job_hash)
            except StorageError:
                raise
            except CheckpointError:
                continue
            return step
        return None

    # -- pins and retention -------------------------------------------------------------------------

    def pin(self, step: int, reason: str) -> None:
        """Protect a committed checkpoint from retention until `unpin(step, reason)`."""
        name = pin_name(step, reason)
        self._manifest(step, None)  # only a committed checkpoint can be pinned
        self._put(f"{PINS_DIR}/{name}", b"")

    def unpin(self, step: int, reason: str) -> None:
        self._remove(f"{PINS_DIR}/{pin_name(step, reason)}")

    def pins(self) -> dict[int, set[str]]:
        """Pinned steps and the reasons each is held for."""
        held: dict[int, set[str]] = {}
        for name in self._list(PINS_DIR)[1]:
            parsed = parse_pin_name(name)
            if parsed is not None:
                held.setdefault(parsed[0], set()).add(parsed[1])
        return held

    def delete(self, step: int) -> None:
        """Delete one checkpoint (e.g. on an abandoned branch after a rollback); refused while pinned."""
        held = self.pins().get(step)
        if held:
            raise CheckpointError(f"{self.step_uri(step)}: pinned by {sorted(held)}; unpin it before deleting")
        self._delete_step(step)

    def prune(self) -> list[CheckpointDeleted]:
        """Apply `keep_last`: never a pinned checkpoint, never the latest committed or latest valid one."""
        if self.keep_last == 0:
            return []
        committed = self.list_committed()
        protected = set(self.pins()) | set(committed[-1:]) | {self.latest_committed()}
        deleted = []
        for step in select_for_deletion(committed, self.keep_last, protected):
            if step in self.pins():  # pinned while this pass ran (pins come from another process)
                continue
            self._delete_step(step)
            deleted.append(CheckpointDeleted(step, self.step_uri(step), f"retention: keep_last={self.keep_last}"))
        return deleted

    # -- internals ----------------------------------------------------------------------------------

    def _step_dirs(self) -> list[int]:
        steps = (parse_step_dirname(name) for name in self._list("")[0])
        return sorted(step for step in steps if step is not None)

    def _manifest(self, step: int, expected_job_hash: str | None) -> tuple[bytes, dict]:
        where = self.step_uri(step)
        try:
            raw = self._get(f"{step_dirname(step)}/{MANIFEST}")
        except FileNotFoundError:
            raise CheckpointError(f"{where}/{MANIFEST}: missing (not committed: the save was interrupted "
                                  "or is still running)") from None
        manifest = parse_manifest(raw, where)
        check_identity(manifest, where, run=self.run, step=step, job_hash=expected_job_hash)
        return raw, manifest

    def _verified_file(self, step: int, entry: dict) -> bytes:
        where = self.step_uri(step)
        try:
            data = self._get(f"{step_dirname(step)}/{entry['path']}")
        except FileNotFoundError:
            raise CheckpointError(f"{where}/{entry['path']}: listed in the manifest but missing") from None
        verify_file(entry, data, where)
        return data

    def _verified_files(self, step: int, raw: bytes, manifest: dict) -> dict[str, bytes]:
        """Every listed file, checked against the manifest, and meta.json's own fields; the outcome is
        remembered per manifest (whether the checkpoint fits a job is checked by `decode`, not here)."""
        try:
            files = {entry["path"]: self._verified_file(step, entry) for entry in manifest["files"]}
            meta = parse_object(files[META], f"{self.step_uri(step)}/{META}", max_bytes=MAX_JSON_BYTES)
            check_meta(meta, self.step_uri(step), step=step, job_hash=manifest["job_hash"], layout=None)
        except StorageError:
            raise
        except CheckpointError as exc:
            self._remember(step, raw, str(exc))
            raise
        self._remember(step, raw, "")
        return files

    def _remember(self, step: int, manifest: bytes, error: str) -> None:
        with self._verified_lock:
            self._verified[(step, hashlib.sha256(manifest).hexdigest())] = error

    def _delete_step(self, step: int) -> None:
        with self._verified_lock:
            self._verified = {k: v for k, v in self._verified.items() if k[0] != step}
        self._remove(f"{step_dirname(step)}/{MANIFEST}")  # first: from here on nobody can load it
        self._remove_tree(step_dirname(step))
