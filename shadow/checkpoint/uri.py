"""From a URI to a store: plain paths and `file://` are local directories, `s3://bucket/prefix` is S3."""

from __future__ import annotations

from shadow.checkpoint.errors import CheckpointError
from shadow.checkpoint.format import parse_step_dirname
from shadow.checkpoint.local import LocalStore
from shadow.checkpoint.store import CheckpointStore


def open_store(uri: str, run: str, keep_last: int = 0, s3_options=None) -> CheckpointStore:
    """The store for checkpoints of `run` under `uri`; `s3_options` (an `S3Options`) tunes retries."""
    if uri.startswith("s3://"):
        from shadow.checkpoint.s3 import S3Store  # boto3 is imported only when S3 is used

        bucket, _, prefix = uri[len("s3://"):].partition("/")
        if not bucket:
            raise CheckpointError(f"checkpoint.uri: {uri!r} names no bucket; expected s3://<bucket>[/<prefix>]")
        return S3Store(bucket, prefix, run, keep_last, s3_options)
    if uri.startswith("file://"):
        return LocalStore(uri[len("file://"):], run, keep_last)
    if "://" in uri:
        raise CheckpointError(f"checkpoint.uri: {uri!r} has an unsupported scheme; use a path, file:// or s3://")
    return LocalStore(uri, run, keep_last)


def locate_checkpoint(uri: str) -> tuple[CheckpointStore, int]:
    """Split `<root>/<run>/step-<N>` (a path, file:// or s3:// URI) into its store and step."""
    head, _, name = uri.rstrip("/").rpartition("/")
    root, _, run = head.rpartition("/")
    step = parse_step_dirname(name)
    if uri.startswith("s3://"):
        if step is None or not run or not root.startswith("s3://"):
            raise CheckpointError(f"{uri}: expected a checkpoint named like "
                                  "s3://<bucket>[/<prefix>]/<run>/step-000000050")
    elif step is None or not run:
        raise CheckpointError(f"{uri}: expected a checkpoint directory named like <root>/<run>/step-000000050")
    return open_store(root or "/", run), step
