"""FSDP2 float8 all-gather for torchao tensorwise layers, following the job's precision mode.

Without it FSDP2 all-gathers each FP8 layer's fp32 weight and the layer casts the gathered weight to FP8.
With it (`precision.fsdp_float8_all_gather`) each rank casts its own shard with the weight's global
scale (shard amax max-reduced over the mesh) and the all-gather moves the FP8 bytes: a quarter of fp32's.
Amax is a max (exact) and the cast is elementwise, so the gathered FP8 weight equals the cast of the
full weight bit for bit, and so do the losses.

In BF16 mode the all-gather moves the weight itself and the layer runs the BF16 path on it, so BF16 mode
stays exactly BF16. The weight therefore carries the backend whose mode it follows: `Float8AllGatherWeight`
wraps an FP8 layer's weight and answers FSDP2's all-gather extension hooks (`fsdp_pre_all_gather`,
`fsdp_post_all_gather`) by that mode. torchao's own `WeightWithDynamicFloat8CastTensor` always casts.

FSDP2 keeps, per parameter, the all-gather buffers and the gathered parameter built by the first
all-gather and reuses them, so their dtype stays the one of the mode they were built in; a mode switch
drops them (`drop_gathered_weights`), the only code here that touches FSDP2's private state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_param import ShardedState

from shadow.config.job import PrecisionMode
from shadow.model_errors import ModelError

if TYPE_CHECKING:  # the backend module imports this one
    from shadow.precision.base import PrecisionBackend

aten = torch.ops.aten

# What FSDP2 does to a weight while it shards it and reads its shard (detach for nn.Parameter and
# DTensor, split/new_zeros/slice/view to cut and pad the shard; torch 2.13): results stay wrapped, so the
# shard answers the all-gather hooks. Every other op returns a plain tensor (optimizer state, gradients,
# checkpoint copies); in-place ops (the optimizer's update, a checkpoint load) write into the values.
_KEEP_WRAPPED = {aten.detach.default, aten.split.Tensor, aten.new_zeros.default, aten.slice.Tensor,
                 aten.view.default}


@dataclass(frozen=True, eq=False)
class Float8Cast:
    """How a layer casts its weight to FP8 (torchao's settings for it), and the backend whose mode decides."""

    backend: PrecisionBackend  # its `.mode` is read at every all-gather
    linear_mm_config: object  # the layer's torchao LinearMMConfig (torchao is imported only when used)
    float8_dtype: torch.dtype
    round_scales_to_power_of_2: bool


class Float8AllGatherWeight(torch.Tensor):
    """An FP8 layer's weight (its fp32 values in `hp`) that FSDP2 all-gathers in FP8 in FP8 mode and as
    it is in BF16 mode."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, hp: torch.Tensor, cast: Float8Cast):
        return torch.Tensor._make_wrapper_subclass(cls, hp.size(), strides=hp.stride(),
                                                   storage_offset=hp.storage_offset(), dtype=hp.dtype,
                                                   device=hp.device, requires_grad=hp.requires_grad)

    def __init__(self, hp: torch.Tensor, cast: Float8Cast):
        self.hp = hp
        self.cast = cast

    def __repr__(self):
        return f"Float8AllGatherWeight({self.hp!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args, kwargs=None):
        cast = next(t.cast for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, cls))
        args, kwargs = pytree.tree_map_only(cls, lambda t: t.hp, (args, kwargs or {}))
        out = func(*args, **kwargs)
        if func not in _KEEP_WRAPPED:
            return out
        return pytree.tree_map_only(torch.Tensor, lambda t: cls(t, cast), out)

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """This rank's shard, padded to FSDP2's shard size: as is in BF16 mode, else cast to FP8 with the
        weight's global scale (the FP8 bytes, and the scale as metadata)."""
        rows = -(-outer_size[0] // mesh.size())  # FSDP2 pads every shard to the first one's rows
        shard = self.hp
        if shard.shape[0] < rows:
            shard = torch.cat([shard, shard.new_zeros(rows - shard.shape[0], *shard.shape[1:])])
        if self.cast.backend.mode is PrecisionMode.BF16:
            return (shard,), None
        from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
        from torchao.float8.float8_training_tensor import GemmInputRole

        fp8 = hp_tensor_to_float8_dynamic(shard, self.cast.float8_dtype, self.cast.linear_mm_config,
                                          reduce_amax=True, gemm_input_role=GemmInputRole.WEIGHT, device_mesh=mesh,
                                          round_scales_to_power_of_2=self.cast.round_scales_to_power_of_2)
        return (fp8._data,), fp8._scale

    def fsdp_post_all_gather(self, all_gather_outputs, scale, param_dtype, *, out=None):
        """The gathered weight the layer computes with: a torchao Float8TrainingTensor after an FP8
        all-gather, the weight itself after a BF16 one. From the second all-gather on, FSDP2 hands back the
        weight built the first time (`out`), whose buffers the all-gather has just refilled."""
        from torchao.float8.float8_training_tensor import Float8TrainingTensor, GemmInputRole

        (data,) = all_gather_outputs
        if out is not None:
            if isinstance(out, Float8TrainingTensor) != (scale is not None):
                raise RuntimeError("FSDP2 reused a weight gathered in the other precision mode: switch modes "
                                   "with backend.set_mode, which drops the gathered weights")
            if scale is not None:
                out._scale = scale
            return None
        if scale is None:
            return data, (data,)
        weight = Float8TrainingTensor(data, scale, param_dtype, self.cast.linear_mm_config,
                                      gemm_input_role=GemmInputRole.WEIGHT)
        return weight, (data,)


def wrap_weights(model: nn.Module, layer_cls: type, backend: PrecisionBackend) -> None:
    """Wrap the weight of every `layer_cls` layer of `model` (torchao Float8Linear), before FSDP2 shards it."""
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    for name, layer in model.named_modules():
        if not isinstance(layer, layer_cls):
            continue
        if uses[id(layer.weight)] > 1:
            raise ModelError(f"precision.fsdp_float8_all_gather would untie the tied weight of {name}; keep the "
                             "layer in BF16 (precision.fp8_layers.exclude) or turn the option off")
        cast = Float8Cast(backend, layer.linear_mm_config, layer.config.cast_config_weight.target_dtype,
                          layer.config.round_scales_to_power_of_2)
        layer.weight = nn.Parameter(Float8AllGatherWeight(layer.weight.detach(), cast),
                                    requires_grad=layer.weight.requires_grad)


def drop_gathered_weights(model: nn.Module) -> None:
    """Make FSDP2 forget the all-gather buffers and gathered weight of every wrapped weight, so the next
    all-gather builds them anew in the current mode's dtype. Between steps only (every weight sharded).

    FSDP2 private state (torch 2.13, `_fully_shard/_fsdp_param.py`): `FSDPModule._get_fsdp_state()`,
    `FSDPState._fsdp_param_groups`, `FSDPParam.all_gather_outputs` (sized and typed by the first all-gather,
    reused: `init_all_gather_outputs` returns early when set), `_unsharded_param` (reused through `out=`
    when present) and `_unsharded_inner_tensors`. tests/unit/test_fsdp_float8.py fails if they change.
    """
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        for group in module._get_fsdp_state()._fsdp_param_groups:
            for fsdp_param in group.fsdp_params:
                if not isinstance(fsdp_param._sharded_local_tensor, Float8AllGatherWeight):
                    continue
                assert fsdp_param.sharded_state is ShardedState.SHARDED, "precision switches happen between steps"
                fsdp_param.all_gather_outputs = []
                fsdp_param._unsharded_inner_tensors = []
                if hasattr(fsdp_param, "_unsharded_param"):
                    del fsdp_param._unsharded_param
