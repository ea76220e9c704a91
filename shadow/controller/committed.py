"""The main job's committed checkpoints on its current lineage, as a sorted list of steps.

Steps arrive in increasing order (an append) and leave by retention or a rollback; lookups bisect, so
scheduling a replay costs the same at any run length (`checkpoint.keep: 0` keeps every checkpoint).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Iterable, Iterator, Sequence


class CommittedSteps:
    def __init__(self, steps: Iterable[int] = ()):
        self._steps = sorted(set(steps))

    @property
    def ascending(self) -> Sequence[int]:
        """The steps, oldest first (a view: do not modify)."""
        return self._steps

    def add(self, step: int) -> None:
        index = bisect_left(self._steps, step)
        if index == len(self._steps) or self._steps[index] != step:
            self._steps.insert(index, step)

    def discard(self, step: int) -> None:
        index = bisect_left(self._steps, step)
        if index < len(self._steps) and self._steps[index] == step:
            del self._steps[index]

    def drop_after(self, step: int) -> list[int]:
        """Remove and return the steps after `step` (a rollback abandons them)."""
        index = bisect_right(self._steps, step)
        dropped, self._steps = self._steps[index:], self._steps[:index]
        return dropped

    def newest(self, at_or_before: int | None = None) -> int | None:
        """The latest step (at or before `at_or_before` when given), or None."""
        index = len(self._steps) if at_or_before is None else bisect_right(self._steps, at_or_before)
        return self._steps[index - 1] if index else None

    def __contains__(self, step: object) -> bool:
        if not isinstance(step, int):  # None: no rollback target yet
            return False
        index = bisect_left(self._steps, step)
        return index < len(self._steps) and self._steps[index] == step

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._steps))

    def __len__(self) -> int:
        return len(self._steps)
