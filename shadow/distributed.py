"""Data parallelism for one group of ranks (the main job, or a replay): how a step's global batch is
cut into micro-batches, and the collectives that make N ranks compute what one rank would.

Every rank holds a full replica (replicated data parallel, like DDP without bucketing). A step's
global batch is cut into K = world_size x micro_batches_per_rank equal micro-batches, in order; rank r
takes micro-batches [r * A, (r + 1) * A). Each micro-batch's loss is scaled by 1/K before backward,
gradients accumulate locally, then one all-reduce (sum) per step. So a main job of 2 ranks x 1
micro-batch and a replay of 1 rank x 2 micro-batches add the same two scaled gradients: a two-operand
sum is exact whichever way round, so their losses agree bit for bit. With more than two operands per
reduction the order of additions (gloo's ring vs local accumulation) may differ at the level of fp32
rounding; see docs/scale-out.md.

Checkpoints are world-size independent: rank 0 writes its (complete) replica; any layout restores it.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RankLayout:
    rank: int = 0
    world_size: int = 1
    micro_batches_per_rank: int = 1
    master_addr: str = ""  # host:port of rank 0's rendezvous, when world_size > 1

    @property
    def num_micro_batches(self) -> int:
        return self.world_size * self.micro_batches_per_rank

    @property
    def first_micro_batch(self) -> int:
        """Index in the global batch of this rank's first micro-batch."""
        return self.rank * self.micro_batches_per_rank

    def my_micro_batches(self, inputs: torch.Tensor, targets: torch.Tensor):
        """This rank's micro-batches of the global batch, in order."""
        k = self.num_micro_batches
        if inputs.shape[0] % k:
            raise ValueError(f"batch_size {inputs.shape[0]} is not divisible into {k} micro-batches")
        chunks = list(zip(inputs.chunk(k), targets.chunk(k)))
        first = self.first_micro_batch
        return chunks[first : first + self.micro_batches_per_rank]


def layout_for(total_micro_batches: int, world_size: int, rank: int, master_addr: str = "") -> RankLayout:
    """The layout that gives `world_size` ranks the same K micro-batches as the main job."""
    if total_micro_batches % world_size:
        raise ValueError(f"{world_size} ranks cannot share {total_micro_batches} micro-batches evenly")
    return RankLayout(rank, world_size, total_micro_batches // world_size, master_addr)


def free_address() -> str:
    """host:port for a rank-0 rendezvous on this node."""
    import ray

    host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    with socket.socket() as s:
        s.bind(("", 0))
        return f"{host}:{s.getsockname()[1]}"


def init_group(layout: RankLayout, device: torch.device) -> None:
    if layout.world_size == 1 or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{layout.master_addr}", rank=layout.rank,
                            world_size=layout.world_size)


def sum_across_ranks(tensors: list[torch.Tensor]) -> None:
    """In-place sum over ranks of a list of tensors, as one flat all-reduce."""
    if not dist.is_initialized() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def max_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """In-place max over ranks (FP8 amax: the scale must see the whole global batch)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor
