"""How much memory one rank of a job needs at a world size, known before anything is allocated.

Counted from the job's model built on the meta device (no memory) and the optimizer's own statement of
its state (`optim.state_layout`):
- parameters, gradients and optimizer state: fp32, sharded over the ranks by FSDP2 (1/N each), plus the
  unsharded weights and gradients of the largest block while it computes (FSDP2 gathers one block at a
  time; with prefetch, two);
- activations: what backward keeps for one micro-batch, an estimate after Korthikanti et al. 2022
  ("Reducing activation recomputation", eq. 1: s*b*h*(34 + 5*a*s/h) bytes per layer at 2 bytes a value)
  scaled to this job's activation width (4 bytes on CPU, where BF16 and FP8 are emulated over fp32), plus
  the fp32 logits and their gradient. For a plug-in model (`model.factory`) h is the input width of its
  first block's first linear layer, and the attention-score term is left out (its head count is unknown;
  fused attention keeps no scores).

`check` refuses a plan that does not fit the device with a message that says what to change.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch

from shadow.config.job import Fp8Backend, JobConfig
from shadow.optim import build_optimizer, state_layout
from shadow.precision import build_backend
from shadow.precision.convert import prepare_model

GIB = 2**30


class MemoryPlanError(RuntimeError):
    """The job cannot fit the device at this world size; the message says by how much and what to change."""


@dataclass(frozen=True)
class MemoryPlan:
    world_size: int
    num_params: int
    params_bytes: int  # this rank's shard, plus one gathered block
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int  # one micro-batch, estimated

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes

    def describe(self) -> str:
        parts = [("parameters", self.params_bytes), ("gradients", self.grads_bytes),
                 ("optimizer", self.optimizer_bytes), ("activations", self.activations_bytes)]
        table = "  ".join(f"{name} {num_bytes / GIB:.2f}" for name, num_bytes in parts)
        return (f"memory per rank at {self.world_size} rank(s), {self.num_params / 1e6:.1f}M parameters (GiB): "
                f"{table}  total {self.total_bytes / GIB:.2f}")

    def to_event(self) -> dict:
        return {"world_size": self.world_size, "num_params": self.num_params, "params_bytes": self.params_bytes,
                "grads_bytes": self.grads_bytes, "optimizer_bytes": self.optimizer_bytes,
                "activations_bytes": self.activations_bytes, "total_bytes": self.total_bytes}

    def check(self, capacity_bytes: int, device: str, setting: str = "resources.num_ranks") -> None:
        if self.total_bytes > capacity_bytes:
            raise MemoryPlanError(
                f"{self.describe()}: more than the {capacity_bytes / GIB:.1f} GiB of {device}; raise {setting}, "
                "make micro-batches smaller (more of them: resources.grad_accum) or shrink the model")


def plan_memory(job: JobConfig, world_size: int, num_micro_batches: int, device: torch.device) -> MemoryPlan:
    # shapes do not depend on the FP8 backend: plan with the emulated one, which builds anywhere
    backend = build_backend(dataclasses.replace(job.precision, backend=Fp8Backend.EMULATED), torch.device("cpu"))
    with torch.device("meta"):
        prepared = prepare_model(job, backend)
    model, blocks = prepared.model, [block.module for block in prepared.structure.blocks]
    optimizer = build_optimizer(job.optim, model)
    params = list(model.parameters())
    num_params = sum(p.numel() for p in params)
    block_params = max(sum(p.numel() for p in block.parameters()) for block in blocks)
    gathered = 0 if world_size == 1 else 2 * block_params  # the block computing and the one prefetched
    optimizer_bytes = sum(
        math.prod(spec.shape) * spec.dtype.itemsize for p in params for spec in state_layout(optimizer, p).values())
    config = job.model
    tokens = (job.batch_size // num_micro_batches) * config.seq_len
    value_bytes = 4 if device.type == "cpu" else 2
    if config.factory:
        width = next(m.weight.shape[1] for m in blocks[0].modules() if hasattr(m, "weight") and m.weight.dim() == 2)
        per_layer = tokens * width * 34 / 2
    else:
        per_layer = tokens * config.d_model * (34 + 5 * config.num_heads * config.seq_len / config.d_model) / 2
    logits = tokens * config.vocab_size * 4 * 2
    activations = int(per_layer * value_bytes * len(blocks) + logits)
    return MemoryPlan(
        world_size=world_size,
        num_params=num_params,
        params_bytes=4 * (num_params // world_size + gathered),
        grads_bytes=4 * (num_params // world_size + gathered),
        optimizer_bytes=optimizer_bytes // world_size,
        activations_bytes=activations,
    )


def device_capacity(device: torch.device, ranks_on_host: int) -> tuple[int, str]:
    """Bytes one rank may use, and the device's name for messages. On a CPU the host's memory is shared by
    the ranks on it (all of them, for local ranks)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.total_memory, f"the GPU ({props.name})"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // max(1, ranks_on_host), f"host memory / {ranks_on_host} rank(s)"
