"""What can be wrong with a checkpoint, as exceptions whose one-line message says where and what.

Every message starts with the checkpoint's URI and the file (`<uri>/<file>: ...`), so the CLI prints it
as it is and the controller logs it as a `checkpoint_rejected` event. Names read from a checkpoint are
printed with repr(), so no byte of a damaged file can break the message into several lines.
"""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the URI and the file."""


class StorageError(CheckpointError):
    """The storage could not be reached or refused access: the checkpoint itself may be fine.

    Kept apart from damaged checkpoints so that a search for the newest usable checkpoint stops on
    it instead of silently falling back to an older one.
    """


class InvalidCheckpoint(CheckpointError):
    """Content that does not fit the format or the job: names the URI, the file, the key, what was
    found and what was expected."""

    def __init__(self, where: str, file: str, key: str, found: str, expected: str):
        self.where, self.file, self.key = where, file, key
        self._fields = (where, file, key, found, expected)
        super().__init__(f"{where}/{file}: {key}: {found}; expected {expected}")

    def __reduce__(self):
        # A rank's error travels to the other ranks of a collective load pickled (DCP gathers them)
        return type(self), self._fields


class NonFiniteCheckpoint(InvalidCheckpoint):
    """Weights or optimizer state holding NaN or Inf: well formed, but training from them is refused
    unless asked for (`shadow replay --allow-nonfinite`)."""
