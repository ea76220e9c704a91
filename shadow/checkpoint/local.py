"""A checkpoint store in a local or mounted directory.

Each file is written to a temporary name, fsynced and renamed into place, and the directory is fsynced
after every rename, so after a crash the manifest is never durable before the files it lists.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from shadow.checkpoint.format import StorageError
from shadow.checkpoint.store import CheckpointStore


class LocalStore(CheckpointStore):
    def __init__(self, root: str, run: str, keep_last: int = 0):
        super().__init__(str(Path(root).expanduser().absolute()), run, keep_last)

    def _path(self, path: str) -> Path:
        return Path(self.run_uri) / path

    def check(self) -> None:
        run_dir = Path(self.run_uri)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"{run_dir}: cannot create the checkpoint directory ({exc.strerror}); "
                               "fix checkpoint.uri or its permissions") from None
        if not os.access(run_dir, os.W_OK):
            raise StorageError(f"{run_dir}: not writable; fix checkpoint.uri or its permissions")

    def _put(self, path: str, data: bytes) -> None:
        target = self._path(path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
            _fsync_dir(target.parent)
        except OSError as exc:
            raise StorageError(f"{target}: cannot write ({exc.strerror})") from None

    def _get(self, path: str) -> bytes:
        target = self._path(path)
        try:
            return target.read_bytes()
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise StorageError(f"{target}: cannot read ({exc.strerror})") from None

    def _list(self, directory: str) -> tuple[list[str], list[str]]:
        try:
            entries = list(self._path(directory).iterdir())
        except (FileNotFoundError, NotADirectoryError):  # absent, or deleted while we looked
            return [], []
        return [p.name for p in entries if p.is_dir()], [p.name for p in entries if p.is_file()]

    def _remove(self, path: str) -> None:
        self._path(path).unlink(missing_ok=True)

    def _remove_tree(self, directory: str) -> None:
        shutil.rmtree(self._path(directory), ignore_errors=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
