"""Checkpoints: a storage-neutral format (`format`) and stores that commit it (`store`)."""

from shadow.checkpoint.format import CheckpointError
from shadow.checkpoint.store import CheckpointStore, CommitInfo, locate_checkpoint, open_store

__all__ = ["CheckpointError", "CheckpointStore", "CommitInfo", "locate_checkpoint", "open_store"]
