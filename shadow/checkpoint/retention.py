"""Which checkpoints retention may delete, and how pins are named. Pure: no storage here.

A pin is a small marker object `<run>/pins/step-<NNNNNNNNN>.<reason>` that says "someone still needs
this checkpoint": a running replay its start, the policy its rollback target. Pins live in the store,
not in memory, so they hold across processes (the controller pins, the trainer's persister prunes)
and survive a controller restart.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

from shadow.checkpoint.errors import CheckpointError
from shadow.checkpoint.format import parse_step_dirname, step_dirname

PINS_DIR = "pins"
_REASON = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def select_for_deletion(committed: Sequence[int], keep_last: int, protected: Collection[int]) -> list[int]:
    """Steps to delete: all but the newest `keep_last`, never a protected one; `keep_last` 0 keeps all."""
    if keep_last < 0:
        raise ValueError(f"checkpoint.keep: {keep_last} must be 0 (keep all) or a positive integer")
    if keep_last == 0:
        return []
    newest_first = sorted(set(committed), reverse=True)
    return sorted(step for step in newest_first[keep_last:] if step not in protected)


def pin_name(step: int, reason: str) -> str:
    if not _REASON.match(reason):
        raise CheckpointError(f"pin reason {reason!r}: expected a short tag of letters, digits, '_', '.', '-' "
                              "(at most 64), e.g. 'replay-3' or 'rollback'")
    return f"{step_dirname(step)}.{reason}"


def parse_pin_name(name: str) -> tuple[int, str] | None:
    """(step, reason) of a pin object's name, or None for anything else."""
    step = parse_step_dirname(name[:14])
    reason = name[15:]
    if step is None or name[14:15] != "." or not _REASON.match(reason):
        return None
    return step, reason
