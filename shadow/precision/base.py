"""The interface every precision backend implements, and the BF16 path they share.

A backend builds the model's GEMM layers (`linear`) and owns the run-time precision mode. The mode is
switched between steps (`set_mode`), never by rebuilding the model or the optimizer, so a switch lands
on an exact step boundary and keeps every tensor in place.

BF16 numerics: on GPU, real `torch.autocast(dtype=bfloat16)`. On CPU (no fast bf16 here) the same
numbers are produced over fp32 GEMMs: operands rounded to bf16, fp32 GEMM, result rounded to bf16, as
a bf16 tensor-core GEMM with fp32 accumulation does. Non-GEMM ops stay fp32 in both, as under autocast.
The output projection (lm head) always runs in BF16: standard FP8 practice keeps the last layer out of
FP8.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from shadow.config.job import PrecisionConfig, PrecisionMode
from shadow.precision.formats import round_to_bf16

class BackendUnavailable(RuntimeError):
    """The selected backend cannot run here; the message says what to install or use instead."""


AmaxReducer = Callable[[torch.Tensor], torch.Tensor]  # max-reduces amax across ranks, in place


class _Bf16EmulatedLinear(torch.autograd.Function):
    """y = bf16(bf16(x) @ bf16(w).T); gradients rounded the way autocast's bf16 GEMMs round them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x_bf16, w_bf16 = round_to_bf16(x), round_to_bf16(weight)
        ctx.save_for_backward(x_bf16, w_bf16)
        return round_to_bf16(F.linear(x_bf16, w_bf16))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x_bf16, w_bf16 = ctx.saved_tensors
        grad_bf16 = round_to_bf16(grad_out)
        grad_x = round_to_bf16(grad_bf16 @ w_bf16)
        grad_w = round_to_bf16(grad_bf16.reshape(-1, grad_bf16.shape[-1]).T @ x_bf16.reshape(-1, x_bf16.shape[-1]))
        return grad_x, grad_w


def bf16_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A BF16 GEMM: emulated on CPU, real under the caller's autocast on GPU."""
    if x.device.type == "cpu":
        return _Bf16EmulatedLinear.apply(x, weight)
    return F.linear(x, weight)


class Bf16Linear(nn.Module):
    """A bias-free linear layer that is always BF16 (the lm head)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bf16_linear(x, self.weight)


class PrecisionBackend(ABC):
    """Base of all backends: mode, step, the shared BF16 pieces; subclasses add FP8 GEMM layers."""

    name = "base"
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
    def linear(self, in_features: int, out_features: int) -> nn.Module:
        """A bias-free GEMM layer that runs in the current mode (FP8 or BF16)."""

    def output_linear(self, in_features: int, out_features: int) -> nn.Module:
        return Bf16Linear(in_features, out_features)

    def round_activation(self, x: torch.Tensor) -> torch.Tensor:
        """Round a tensor that autocast would hold in bf16 (attention inputs/outputs) on CPU."""
        return round_to_bf16(x) if self.device.type == "cpu" else x

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for the forward pass of a step."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

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
