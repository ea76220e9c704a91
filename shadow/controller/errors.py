"""How the controller fails a run, and how it quotes an error from an actor in an event."""

from __future__ import annotations


class ControllerError(RuntimeError):
    """The run cannot go on; the message says why."""


def first_line(error: Exception) -> str:
    """Ray wraps remote errors in long tracebacks; the event keeps the line that says what happened."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    cause = next((line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1] if lines else "")
    return f"{type(error).__name__}: {cause}"[:500]
