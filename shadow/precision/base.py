"""The interface every precision backend implements, and the BF16 path they share.

A backend converts a model's linear layers (`convert`: the selected ones into its FP8 layer, every
other one into `Bf16Linear`) and owns the run-time precision mode. The mode is switched between steps
(`set_mode`), never by rebuilding the model or the optimizer, so a switch lands on an exact step
boundary and keeps every tensor in place. An FP8 layer in BF16 mode runs the shared BF16 path.

BF16 numerics: on GPU, real `torch.autocast(dtype=bfloat16)`. On CPU (no fast bf16 here) the same
numbers are produced over fp32 GEMMs: operands rounded to bf16, fp32 GEMM, result rounded to bf16, as
a bf16 tensor-core GEMM with fp32 accumulation does. Non-GEMM ops stay fp32 in both, as under autocast.
Linear layers outside the model's blocks (the lm head) always run in BF16: standard FP8 practice
keeps the last layer out of FP8.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from shadow.config.job import PrecisionConfig, PrecisionMode
from shadow.model_errors import ModelError
from shadow.precision.formats import round_to_bf16
from shadow.precision.selection import Fp8Selection

class BackendUnavailable(RuntimeError):
    """The selected backend cannot run here; the message says what to install or use instead."""


AmaxReducer = Callable[[torch.Tensor], torch.Tensor]  # max-reduces amax across ranks, in place


class _Bf16EmulatedLinear(torch.autograd.Function):
    """y = bf16(bf16(x) @ bf16(w).T + bf16(b)); gradients rounded the way autocast's bf16 GEMMs round them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x_bf16, w_bf16 = round_to_bf16(x), round_to_bf16(weight)
        ctx.save_for_backward(x_bf16, w_bf16)
        ctx.has_bias = bias is not None
        return round_to_bf16(F.linear(x_bf16, w_bf16, None if bias is None else round_to_bf16(bias)))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x_bf16, w_bf16 = ctx.saved_tensors
        grad_bf16 = round_to_bf16(grad_out)
        grad_x = round_to_bf16(grad_bf16 @ w_bf16)
        rows = grad_bf16.reshape(-1, grad_bf16.shape[-1])
        grad_w = round_to_bf16(rows.T @ x_bf16.reshape(-1, x_bf16.shape[-1]))
        grad_b = round_to_bf16(rows.sum(dim=0)) if ctx.has_bias else None
        return grad_x, grad_w, grad_b


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A BF16 GEMM: emulated on CPU, real under the caller's autocast on GPU."""
    if x.device.type == "cpu":
        return _Bf16EmulatedLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Bf16Linear(nn.Module):
    """A linear layer that is always BF16 (the lm head, layers not selected for FP8). It takes over the
    parameters of the `nn.Linear` it replaces, so tied weights stay tied."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor, smooth_input: bool = False) -> torch.Tensor:
        # Smooth-SwiGLU's power-of-two channel scales cancel exactly in BF16 (see EmulatedFp8Linear): skip them
        return bf16_linear(x, self.weight, self.bias)


class PrecisionBackend(ABC):
    """Base of all backends: mode, step, the shared BF16 pieces; subclasses add FP8 GEMM layers."""

    name = "base"
    # Whether the backend's FP8 layer holds a copy of the weights it replaces (TE allocates its own), so a
    # weight shared with another module (tied) cannot be converted without untying it.
    fp8_layer_copies_weights = False
    # Whether `extra_state` of a freshly built model already has every key a checkpoint of it will hold.
    # TE creates its FP8 scaling state at the first FP8 forward, so a checkpoint's `precision.` tensors
    # can be checked only by its `load_extra_state`, not against a layout known before training.
    extra_state_known_before_training = True

    def __init__(self, config: PrecisionConfig, device: torch.device):
        self.config = config
        self.device = device
        self.mode = config.mode
        self.step = 0
        self.recording = True  # record amax statistics; off during evaluation (see `not_recording`)

    @abstractmethod
    def fp8_linear(self, linear: nn.Linear) -> nn.Module:
        """The backend's layer replacing `linear`: FP8 GEMMs in FP8 mode, the BF16 path in BF16 mode."""

    def convert(self, model: nn.Module, selection: Fp8Selection) -> None:
        """Swap every linear layer the selection lists: FP8 layers for its FP8 choices, BF16 for the rest."""
        if self.fp8_layer_copies_weights:
            uses: dict[int, int] = {}
            for _, param in model.named_parameters(remove_duplicate=False):
                uses[id(param)] = uses.get(id(param), 0) + 1
            tied = [layer.name for layer in selection.layers
                    if layer.fp8 and uses[id(model.get_submodule(layer.name).weight)] > 1]
            if tied:
                raise ModelError(f"precision.backend '{self.name}' copies a layer's weight into its own FP8 layer, "
                                 f"which would untie the tied weight of {', '.join(tied)}; keep these layers in BF16 "
                                 "(precision.fp8_layers.exclude) or use backend emulated or torchao")
        for layer in selection.layers:
            parent_name, _, attribute = layer.name.rpartition(".")
            linear = model.get_submodule(layer.name)
            replacement = self.fp8_linear(linear) if layer.fp8 else Bf16Linear(linear)
            setattr(model.get_submodule(parent_name), attribute, replacement)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for the forward pass of a step."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def before_sharding(self, model: nn.Module) -> None:
        """Called with the converted model just before FSDP2 shards it (more than one rank)."""

    def set_mode(self, mode: PrecisionMode) -> None:
        """Takes effect from the next forward pass: call between steps only."""
        self.mode = PrecisionMode(mode)

    @contextlib.contextmanager
    def not_recording(self):
        """Evaluation passes must not feed scaling statistics, or replay would depend on eval cadence."""
        previous, self.recording = self.recording, False
        try:
            yield
        finally:
            self.recording = previous

    def begin_step(self, step: int) -> None:
        self.step = step

    def end_step(self, model: nn.Module, reduce_amax: AmaxReducer | None = None) -> None:
        """Update scaling state after the optimizer step (amax of the whole global batch)."""

    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Scaling state that does not live in the model's own (non-pickled) state_dict tensors."""
        return {}

    def load_extra_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Put back what `extra_state` exported."""

    def describe(self) -> dict:
        return {"backend": self.name, "format": self.config.format, "scaling": self.config.scaling.value}
