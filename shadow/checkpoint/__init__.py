"""Checkpoints: the storage-neutral format (`format`), stores that commit it (`store`: `local`, `s3`),
retention and pins (`retention`), background persistence (`persist`) and what they report (`events`)."""

from shadow.checkpoint.events import CheckpointDeleted, CheckpointEvent, CheckpointFailed, CommitInfo
from shadow.checkpoint.errors import CheckpointError, InvalidCheckpoint, NonFiniteCheckpoint, StorageError
from shadow.checkpoint.persist import AsyncPersister, SyncPersister
from shadow.checkpoint.store import CheckpointStore
from shadow.checkpoint.uri import locate_checkpoint, open_store

__all__ = [
    "AsyncPersister",
    "CheckpointDeleted",
    "CheckpointError",
    "CheckpointEvent",
    "CheckpointFailed",
    "CheckpointStore",
    "CommitInfo",
    "InvalidCheckpoint",
    "NonFiniteCheckpoint",
    "StorageError",
    "SyncPersister",
    "locate_checkpoint",
    "open_store",
]
