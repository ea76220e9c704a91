"""A trainer's complete state at a step boundary, in a storage-neutral form.

`tensors` are CPU copies (model weights and FP8 scaling buffers under `model.`, optimizer moments
under `optim.`, backend scaling state kept outside the model under `precision.`, RNG states under
`rng.`); `meta` is JSON-serializable (step, precision, optimizer
hyperparameters, job hash). Nothing in it is pickled, so a checkpoint can be loaded without running
code from it.
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
