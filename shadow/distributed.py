"""Data parallelism for one group of ranks (the main job, or a replay): how a step's global batch is
cut into micro-batches, FSDP2 sharding, and the collectives that make N ranks compute what one would.

With more than one rank the model is sharded with FSDP2 (`fully_shard` per transformer block and the
root, over a 1-D DeviceMesh: gloo on CPU, NCCL on GPU): each rank keeps 1/N of the parameters,
gradients and optimizer state and all-gathers a block's weights only while it computes. A step's global
batch is cut into K = world_size x micro_batches_per_rank equal micro-batches, in order; rank r takes
micro-batches [r * A, (r + 1) * A). Each micro-batch's loss is scaled by 1/K before backward; a rank
accumulates its A micro-batches locally (no gradient sync until its last one), then one reduce-scatter
*sums* the ranks' gradients into their shards (FSDP2's averaging is turned off: the 1/K is already in
the loss). So a main job of 2 ranks x 1 micro-batch and a replay of 1 rank x 2 micro-batches add the
same two scaled gradients, and a two-operand sum is exact whichever way round: their losses agree bit
for bit. With more than two operands per reduction the order of additions may differ at the level of
fp32 rounding (`exact_across_world_sizes`); see docs/scale-out.md.

Gradient clipping needs the global gradient norm, which torch computes per shard and then combines, so
its rounding would depend on the world size. `clip_grad_norm` computes it independently of sharding:
float64 sums of squares per row, placed at their global rows and summed exactly (`math.fsum`).
"""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard


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


def exact_across_world_sizes(num_micro_batches: int, world_size: int, other_world_size: int) -> bool:
    """Whether two groups computing the same K micro-batches add their gradients in the same order: the
    same world size, or sums of at most two operands (which are exact in any order)."""
    return world_size == other_world_size or num_micro_batches <= 2


_checkpoint_groups: dict[tuple[int, int], object] = {}


def init_group(layout: RankLayout, device: torch.device):
    """Join the rank group; returns the process group checkpoints are saved over (None for one rank).

    Saves run on a background thread while training goes on, so their collectives get a gloo group of
    their own: two threads must never interleave collectives on one group.
    """
    if layout.world_size == 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{layout.master_addr}", rank=layout.rank,
                                world_size=layout.world_size)
    key = (layout.rank, layout.world_size)
    if key not in _checkpoint_groups:  # one per process: every rank creates it in the same order
        _checkpoint_groups[key] = dist.new_group(backend="gloo")
    return _checkpoint_groups[key]


def shard_model(model: nn.Module, blocks: list[nn.Module], layout: RankLayout, device: torch.device) -> None:
    """FSDP2 over all ranks, per block and the root; gradients are summed, not averaged (see above)."""
    if layout.world_size == 1:
        return
    mesh = init_device_mesh(device.type, (layout.world_size,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in [*blocks, model]:
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (the step's loss)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def max_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """In-place max over ranks (FP8 amax: the scale must see the whole global batch)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Scale gradients so their global L2 norm is at most `max_norm`; returns the norm before clipping.

    The norm is the same number at any world size: every row's sum of squares is computed in float64
    over that row alone (squares of float32 values are exact there), placed at the row's global index,
    exchanged by a sum in which every entry has one non-zero contributor (exact), and all rows are added
    with `math.fsum` (correctly rounded, so the order does not matter).
    """
    sizes = [p.shape[0] if p.dim() else 1 for p in params]
    row_sums = torch.zeros(sum(sizes), dtype=torch.float64)
    sharded = False
    start = 0
    for param, size in zip(params, sizes):
        grad = param.grad
        if grad is not None:
            local, first_row = _local_rows(grad)
            sharded = sharded or isinstance(grad, DTensor)
            if local.numel():
                squares = local.detach().double().square().cpu()
                per_row = squares.reshape(local.shape[0], -1).sum(dim=1) if local.dim() else squares.reshape(1)
                row_sums[start + first_row : start + first_row + per_row.numel()] = per_row
        start += size
    if sharded and dist.is_initialized():
        dist.all_reduce(row_sums, op=dist.ReduceOp.SUM)
    norm = math.sqrt(math.fsum(row_sums.tolist()))  # NaN or inf when a gradient is
    coefficient = max_norm / (norm + 1e-6)
    if math.isfinite(norm) and coefficient < 1.0:
        for param in params:
            if param.grad is not None:
                param.grad.mul_(coefficient)
    return norm


def _local_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """This rank's part of a (possibly dim-0 sharded) tensor and the global index of its first row."""
    if not isinstance(tensor, DTensor):
        return tensor, 0
    if tensor.placements != (Shard(0),):
        raise ValueError(f"expected a tensor sharded on dim 0 (FSDP2), got placements {tensor.placements}")
    local = tensor.to_local()
    chunk = -(-tensor.shape[0] // tensor.device_mesh.size())  # FSDP2: torch.chunk sizes, the last may be short
    return local, min(chunk * tensor.device_mesh.get_local_rank(), tensor.shape[0])
