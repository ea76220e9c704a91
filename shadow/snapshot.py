"""A trainer's complete state at a step boundary, in a storage-neutral form, and the layout it must have.

`tensors` are CPU copies (model weights and FP8 scaling buffers under `model.`, optimizer moments
under `optim.`, backend scaling state kept outside the model under `precision.`, RNG states under
`rng.`); `meta` is JSON-serializable (step, precision, optimizer
hyperparameters, job hash). Nothing in it is pickled, so a checkpoint can be loaded without running
code from it.

`SnapshotLayout` is what a snapshot of one job must hold (names, shapes, dtypes, finiteness), known from
the job's model and optimizer before any training (`shadow/layout.py`). It lives here, next to the
snapshot, so the checkpoint store can check a checkpoint against a job without importing the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Snapshot:
    step: int  # number of completed optimizer steps: the next step to run is `step`
    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors under `prefix.`, with the prefix removed."""
        start = len(prefix) + 1
        return {k[start:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    # Float values must be finite. False for tensors that record observations: an amax history holds the
    # NaN/Inf amax of a step whose gradients overflowed, and the scale formula skips such entries.
    finite: bool = True
    # For uint8 bit patterns of another dtype (FP8 optimizer moments): finiteness is read through it.
    bits_of: torch.dtype | None = None
    # For RNG states: the device type whose generator must accept the state ("cpu", "cuda").
    generator: str | None = None


@dataclass(frozen=True)
class SnapshotLayout:
    """What a snapshot of one job holds, by full tensor name (`model.<key>`, `optim.<param>.<key>`, ...)."""

    required: dict[str, TensorSpec]  # model state and the CPU RNG state: always present
    optional: dict[str, TensorSpec]  # present on some devices only (the CUDA RNG state)
    # per parameter (`optim.<param name>`), its optimizer state: all of it, or none before its first update
    optim_state: dict[str, dict[str, TensorSpec]]
    # groups whose tensors only the backend can check when it loads them (TE creates its FP8 scaling
    # state at the first FP8 forward, so its names are not known before training)
    unchecked_groups: tuple[str, ...]
    # the optimizer's param groups as meta.json stores them; every value but the scheduled `lr` is fixed
    param_groups: list[dict]
