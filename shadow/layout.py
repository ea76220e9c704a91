"""The layout a job's snapshots have, known without training: what a checkpoint is checked against.

`layout_of` reads it off a built model and optimizer (a trainer's own), `expected_layout` builds the
job's model on the meta device (shapes and dtypes, no memory, no weights) for callers that hold no
trainer, such as `shadow run --resume` choosing the checkpoint to continue from. Both give the same
answer: names and shapes come from the model, the optimizer state from `optim.state_layout`.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from shadow.config.job import JobConfig
from shadow.optim import build_optimizer, state_layout
from shadow.precision import PrecisionBackend, build_backend
from shadow.precision.convert import prepare_model
from shadow.snapshot import SnapshotLayout, TensorSpec

# Transformer Engine pickles its FP8 metadata into `_extra_state`; snapshots leave it out (the backend
# exports that state as tensors instead).
PICKLED_EXTRA_STATE = "_extra_state"
# Buffers that record what steps observed rather than state a step computes with (see TensorSpec.finite).
_OBSERVATIONS = ("amax_history",)
# torch's CUDA (Philox) generator state: an 8-byte seed and an 8-byte offset.
_CUDA_RNG_STATE_BYTES = 16


def layout_of(model: nn.Module, optimizer: torch.optim.Optimizer, backend: PrecisionBackend) -> SnapshotLayout:
    """The layout of snapshots of this model and optimizer (what `Trainer.snapshot` writes)."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(PICKLED_EXTRA_STATE)}
    required = _specs("model", state)
    unchecked: tuple[str, ...] = ()
    if backend.extra_state_known_before_training:
        required.update(_specs("precision", backend.extra_state(model)))
    else:
        unchecked = ("precision",)
    required["rng.torch_cpu"] = TensorSpec(tuple(torch.get_rng_state().shape), torch.uint8, generator="cpu")
    required["rng.trainer"] = TensorSpec(tuple(torch.Generator().get_state().shape), torch.uint8, generator="cpu")
    optional = {"rng.torch_cuda": TensorSpec((_CUDA_RNG_STATE_BYTES,), torch.uint8, generator="cuda")}
    optim_state = {f"optim.{name}": state_layout(optimizer, param) for name, param in model.named_parameters()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.state_dict()["param_groups"]]
    return SnapshotLayout(required, optional, optim_state, unchecked, json.loads(json.dumps(groups)))


def _specs(group: str, tensors: dict[str, torch.Tensor]) -> dict[str, TensorSpec]:
    return {f"{group}.{name}": TensorSpec(tuple(t.shape), t.dtype, finite=not name.endswith(_OBSERVATIONS))
            for name, t in tensors.items()}


def expected_layout(job: JobConfig) -> SnapshotLayout:
    """The layout of `job`'s snapshots, from its model built on the meta device: no weights, no step.

    Raises `BackendUnavailable` when the job's precision backend cannot be built on this machine (TE
    without a GPU).
    """
    backend = build_backend(job.precision, torch.device("cpu"))
    with torch.device("meta"):
        model = prepare_model(job, backend).model
    return layout_of(model, build_optimizer(job.optim, model), backend)
