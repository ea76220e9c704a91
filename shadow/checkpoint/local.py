"""A checkpoint store in a local or mounted directory.

Each file is written to a temporary name, fsynced and renamed into place, and the directory is fsynced
after every rename, so after a crash the manifest is never durable before the files it lists.

Reading never follows a symbolic link below the run directory and reads regular files only: a step
directory or a file replaced by a link (to `/etc/passwd`, to another run) or by a FIFO or device is a
damaged checkpoint, refused with its path, not something to open.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from pathlib import Path

from shadow.checkpoint.errors import CheckpointError, StorageError
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

    @contextlib.contextmanager
    def _open_writer(self, path: str):
        target = self._path(path)
        tmp = target.with_name(f".{target.name}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            out = open(tmp, "wb")
        except OSError as exc:
            raise StorageError(f"{target}: cannot write ({exc.strerror})") from None
        try:
            with out:
                yield out
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
            _fsync_dir(target.parent)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise StorageError(f"{target}: cannot write ({exc.strerror})") from None
            raise

    def _get(self, path: str) -> bytes:
        with self._open_regular_file(path) as f:
            try:
                return f.read()
            except OSError as exc:
                raise StorageError(f"{self._path(path)}: cannot read ({exc.strerror})") from None

    def _read_range(self, path: str, offset: int, length: int) -> bytes:
        with self._open_regular_file(path) as f:
            try:
                parts, done = [], 0
                while done < length:
                    part = os.pread(f.fileno(), length - done, offset + done)
                    if not part:
                        break
                    parts.append(part)
                    done += len(part)
                return b"".join(parts) if len(parts) != 1 else parts[0]
            except OSError as exc:
                raise StorageError(f"{self._path(path)}: cannot read ({exc.strerror})") from None

    def _size(self, path: str) -> int:
        with self._open_regular_file(path) as f:
            return os.fstat(f.fileno()).st_size

    @contextlib.contextmanager
    def _open_regular_file(self, path: str):
        """The file at `path`, opened without following links, and refused unless it is a regular file."""
        target = self._path(path)
        try:
            fd = _open_regular(Path(self.run_uri), path)
        except FileNotFoundError:
            raise
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CheckpointError(f"{target}: a symbolic link, not a regular file inside the checkpoint "
                                      "directory; links are not followed") from None
            if exc.errno == errno.ENOTDIR:
                raise CheckpointError(f"{target}: its directory is a symbolic link or not a directory; links are "
                                      "not followed") from None
            raise StorageError(f"{target}: cannot read ({exc.strerror})") from None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise CheckpointError(f"{target}: not a regular file (a FIFO, device or directory); a checkpoint "
                                      "holds regular files only")
            yield f

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


def _open_regular(root: Path, path: str) -> int:
    """A read descriptor for `root/path`, with no symbolic link followed in `path` (O_NOFOLLOW at every
    component, each opened relative to its parent, so a link swapped in meanwhile is not followed either).
    Non-blocking, so that a FIFO planted in place of a file cannot hang the reader; the caller checks the
    file type on the open descriptor."""
    *directories, name = path.split("/")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for directory in directories:
            parent, fd = fd, -1
            try:
                fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
            finally:
                os.close(parent)
        return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    finally:
        if fd >= 0:
            os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
