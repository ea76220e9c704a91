"""The error a job's model raises when it cannot be built or used as configured (no torch import, so
the command line can catch it cheaply)."""


class ModelError(ValueError):
    """The factory cannot be imported or fails, its output is not logits, or its blocks cannot be found;
    the message names the setting to fix (`model.factory`, `model.kwargs`, `model.block_class`)."""
