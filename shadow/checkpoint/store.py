"""The checkpoint store: one commit protocol over any storage (a directory, an S3 prefix).

Layout: `<root>/<run>/step-<NNNNNNNNN>/<file>` and `<root>/<run>/pins/<pin>`; the files of a step are
described in `format.py`.
- `save` is collective: every rank of the group calls it with its staged snapshot (plain tensors, or
  DTensors holding its shards); torch.distributed.checkpoint plans who writes what, each rank streams
  its chunks to its own data file, and the coordinator writes `tensors.json`, `meta.json` and last
  `MANIFEST.json` (sizes and sha256 of all of them). The manifest is the commit: a step directory
  without one is an interrupted save, invisible to readers.
- `open` reads the manifest and the small files (checked by size and sha256), the data files' sizes,
  and with the job's layout checks names, shapes and dtypes before any tensor byte is read; the
  returned `StoredCheckpoint` reads chunks, each checked against its own sha256. Files the manifest
  does not list are never opened.
- `latest_committed` is the newest checkpoint that verifies (every file's size and sha256, streamed);
  damaged or foreign ones are skipped (and logged once), storage errors are raised. Verification
  results, and damage that `open` or a chunk read finds, are cached per (step, manifest bytes).
- Retention deletes all but the newest `keep_last` committed checkpoints, except pinned ones and the
  latest; deletion removes the manifest first, so a half-deleted checkpoint is never readable.

Subclasses implement the storage primitives on paths relative to the run directory; they raise
FileNotFoundError for an absent file and StorageError for storage that cannot be used.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
import warnings
from abc import ABC, abstractmethod

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.api import CheckpointException

from shadow.checkpoint.dcp_storage import ShardWriter
from shadow.checkpoint.errors import CheckpointError, StorageError
from shadow.checkpoint.events import CheckpointDeleted, CommitInfo
from shadow.checkpoint.format import (
    MANIFEST,
    MAX_JSON_BYTES,
    build_manifest,
    check_identity,
    parse_manifest,
    parse_step_dirname,
    step_dirname,
    verify_file,
)
from shadow.checkpoint.retention import PINS_DIR, parse_pin_name, pin_name, select_for_deletion
from shadow.checkpoint.stored import StoredCheckpoint, first_checkpoint_error
from shadow.checkpoint.strict_json import parse_object
from shadow.checkpoint.tensor_index import INDEX, StoredTensor, parse_index
from shadow.checkpoint.validate import META, check_layout, check_meta
from shadow.snapshot import Snapshot, SnapshotLayout

_HASH_BLOCK_BYTES = 16 * 2**20  # data files are hashed in blocks of this size, never read whole
# DCP warns on every save and load of a single process (no process group) that it assumes one process:
# that is what a one-rank trainer, a tool or a test means.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

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
    def _open_writer(self, path: str) -> contextlib.AbstractContextManager:
        """A file written in pieces (`.write(bytes)`), complete for readers only when the context exits
        cleanly; on an exception nothing of it is visible."""

    @abstractmethod
    def _read_range(self, path: str, offset: int, length: int) -> bytes:
        """`length` bytes from `offset` (fewer only if the file is shorter)."""

    @abstractmethod
    def _size(self, path: str) -> int: ...

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

    # -- commit ------------------------------------------------------------------------------------

    def save(self, snapshot: Snapshot, process_group=None) -> CommitInfo:
        """Commit `snapshot` (collective: every rank of `process_group` calls it with its own shards)."""
        start = time.perf_counter()
        writer = ShardWriter(self, snapshot.step, snapshot.meta)
        distributed = dist.is_available() and dist.is_initialized()
        try:
            dcp.save(snapshot.tensors, storage_writer=writer, planner=DefaultSavePlanner(flatten_state_dict=False),
                     process_group=process_group, no_dist=not distributed)
        except CheckpointException as exc:  # a rank's error, raised on every rank of the group
            raise first_checkpoint_error(exc) from None
        return CommitInfo(snapshot.step, self.step_uri(snapshot.step), writer.num_bytes, time.perf_counter() - start)

    def discard_step(self, step: int) -> None:
        """Remove an earlier, possibly partial, save of `step` before it is written again."""
        self._delete_step(step)

    def open_writer(self, step: int, name: str) -> contextlib.AbstractContextManager:
        return self._open_writer(f"{step_dirname(step)}/{name}")

    def commit_step(self, step: int, data_files: dict[str, tuple[int, str]], index: bytes, meta: bytes,
                    job_hash: str) -> int:
        """Write the descriptions and then the manifest of a step whose data files are durable; returns
        the checkpoint's size in bytes."""
        files = dict(data_files)
        for name, data in ((INDEX, index), (META, meta)):
            self._put(f"{step_dirname(step)}/{name}", data)
            files[name] = (len(data), hashlib.sha256(data).hexdigest())
        manifest = build_manifest(files, run=self.run, step=step, job_hash=job_hash)
        self._put(f"{step_dirname(step)}/{MANIFEST}", manifest)
        # these are the bytes just hashed: a later latest_committed() need not read them again
        self.remember(step, manifest, "")
        return sum(size for size, _ in files.values()) + len(manifest)

    # -- read ----------------------------------------------------------------------------------------

    def open(self, step: int, expected_job_hash: str | None = None, layout: SnapshotLayout | None = None,
             allow_nonfinite: bool = False) -> StoredCheckpoint:
        """A committed checkpoint, its small files verified and, with the job's `layout`, its tensors'
        names, shapes and dtypes checked against the job; tensor values are checked as they are read."""
        where = self.step_uri(step)
        raw, manifest = self._manifest(step, expected_job_hash)
        meta, index = self._checked_descriptions(step, raw, manifest, hash_data=False)
        if layout is not None:
            check_meta(meta, where, step=step, job_hash=manifest["job_hash"], layout=layout)
            check_layout({name: (t.dtype, t.shape) for name, t in index.items()}, where, layout)
        return StoredCheckpoint(self, step, where, raw, meta, index, layout, allow_nonfinite)

    def load(self, step: int, expected_job_hash: str | None = None, layout: SnapshotLayout | None = None,
             allow_nonfinite: bool = False) -> Snapshot:
        """The whole checkpoint as plain tensors in this process (tools and tests; trainers read their own
        shards with `open(...).read_into`)."""
        return self.open(step, expected_job_hash, layout, allow_nonfinite).read_full()

    def read_range(self, step: int, name: str, offset: int, length: int) -> bytes:
        return self._read_range(f"{step_dirname(step)}/{name}", offset, length)

    def verify(self, step: int, expected_job_hash: str | None = None, layout: SnapshotLayout | None = None) -> None:
        """Check a checkpoint: manifest, identity, every file's size and sha256, `meta.json` and the index.

        With a `layout`, also everything a trainer's load checks against the job, reading every chunk (a
        non-finite checkpoint fails). Without one no tensor is decoded and the result is cached per manifest.
        """
        if layout is not None:
            self.open(step, expected_job_hash, layout).scan()
            return
        raw, manifest = self._manifest(step, expected_job_hash)
        with self._verified_lock:
            known = self._verified.get((step, hashlib.sha256(raw).hexdigest()))
        if known is not None:
            if known:
                raise CheckpointError(known)
            return
        try:
            self._verify_files(step, raw, manifest)
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

    def _listed(self, step: int, entry: dict, primitive):
        """`primitive(path)` on a file the manifest lists; its absence is damage, not a storage error."""
        try:
            return primitive(f"{step_dirname(step)}/{entry['path']}")
        except FileNotFoundError:
            raise CheckpointError(f"{self.step_uri(step)}/{entry['path']}: listed in the manifest but missing") from None

    def _verified_file(self, step: int, entry: dict) -> bytes:
        data = self._listed(step, entry, self._get)
        verify_file(entry, data, self.step_uri(step))
        return data

    def _check_size(self, step: int, entry: dict) -> None:
        where = self.step_uri(step)
        size = self._listed(step, entry, self._size)
        if size != entry["bytes"]:
            raise CheckpointError(f"{where}/{entry['path']}: {size} bytes, manifest says {entry['bytes']} "
                                  "(truncated or replaced)")

    def _verify_files(self, step: int, raw: bytes, manifest: dict) -> None:
        """Every listed file against the manifest (data files hashed block by block), `meta.json`'s own
        fields and the index's structure; the outcome is remembered per manifest."""
        self._checked_descriptions(step, raw, manifest, hash_data=True)
        self.remember(step, raw, "")

    def _checked_descriptions(self, step: int, raw: bytes, manifest: dict, *,
                              hash_data: bool) -> tuple[dict, dict[str, StoredTensor]]:
        """`meta.json` (its own fields) and the index of the checkpoint whose manifest is `raw`, after checking
        every listed file against the manifest: the small ones by sha256, the data files by size (and with
        `hash_data`, by sha256 too). Damage found is remembered per manifest."""
        where = self.step_uri(step)
        try:
            small, data_sizes = {}, {}
            for entry in manifest["files"]:
                if entry["path"] in (INDEX, META):
                    small[entry["path"]] = self._verified_file(step, entry)
                    continue
                self._check_size(step, entry)
                if hash_data:
                    self._check_hash(step, entry)
                data_sizes[entry["path"]] = entry["bytes"]
            meta = parse_object(small[META], f"{where}/{META}", max_bytes=MAX_JSON_BYTES)
            check_meta(meta, where, step=step, job_hash=manifest["job_hash"], layout=None)
            return meta, parse_index(small[INDEX], where, data_sizes)
        except StorageError:
            raise
        except CheckpointError as exc:
            self.remember(step, raw, str(exc))
            raise

    def _check_hash(self, step: int, entry: dict) -> None:
        digest = hashlib.sha256()
        for offset in range(0, entry["bytes"], _HASH_BLOCK_BYTES):
            digest.update(self.read_range(step, entry["path"], offset, _HASH_BLOCK_BYTES))
        if digest.hexdigest() != entry["sha256"]:
            raise CheckpointError(f"{self.step_uri(step)}/{entry['path']}: sha256 does not match the manifest "
                                  "(corrupted)")

    def remember(self, step: int, manifest: bytes, error: str) -> None:
        """Record what checking the checkpoint with this manifest found ("" when sound): `verify` and
        `latest_committed` answer from it until the manifest changes."""
        with self._verified_lock:
            self._verified[(step, hashlib.sha256(manifest).hexdigest())] = error

    def _delete_step(self, step: int) -> None:
        with self._verified_lock:
            self._verified = {k: v for k, v in self._verified.items() if k[0] != step}
        self._remove(f"{step_dirname(step)}/{MANIFEST}")  # first: from here on nobody can load it
        self._remove_tree(step_dirname(step))
