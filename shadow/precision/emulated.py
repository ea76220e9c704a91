"""Emulated FP8: every GEMM operand is scaled, rounded into the FP8 format and dequantized.

Forward GEMM operands (input, weight) use the recipe's forward format, the gradient of the output the
backward format (E5M2 for `hybrid`). The GEMM itself is fp32 over the dequantized operands, and its
result is rounded to bf16, as an FP8 tensor-core GEMM with fp32 accumulation and a bf16 output does.
The backward GEMMs reuse the quantized forward operands, as Transformer Engine does.

Scaling is per tensor and per operand role, with TE's formula scale = fp8_max / amax / 2**margin:
- `delayed`: the scale comes from the amax history of earlier steps (updated once per optimizer step
  in `end_step`, with the amax over the whole global batch), so it is part of the checkpoint;
- `current`: the scale comes from the tensor's own amax;
- `none`: scale 1, values cast as they are (saturating at the format's max).
While the job runs in BF16, amax is still recorded (TE's `calibrating` mode), so the history is fresh
when FP8 resumes.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from shadow.config.job import AmaxCompute, Operand, PrecisionConfig, PrecisionMode, Scaling
from shadow.precision.base import AmaxReducer, PrecisionBackend, bf16_linear
from shadow.precision.formats import FPFormat, recipe_for, round_to_bf16

ROLE_INPUT, ROLE_WEIGHT, ROLE_GRAD_OUTPUT = 0, 1, 2
ROLE_NAMES = tuple(operand.value for operand in Operand)  # in the order of the indices above


def power_of_two_channel_amax(x: torch.Tensor) -> torch.Tensor:
    """Per last-dim channel, the smallest power of two above its amax (1 for an all-zero channel)."""
    amax = x.detach().abs().float().amax(dim=tuple(range(x.dim() - 1)))
    _, exponent = torch.frexp(amax)  # amax = m * 2**e with 0.5 <= m < 1, so 2**e > amax
    return torch.where(amax > 0, torch.ldexp(torch.ones_like(amax), exponent), torch.ones_like(amax))


def scale_from_amax(
    amax: torch.Tensor, fmt_max: float | torch.Tensor, margin: int, fallback: torch.Tensor
) -> torch.Tensor:
    """TE's scale formula; keeps `fallback` where amax is zero or not finite."""
    usable = torch.isfinite(amax) & (amax > 0)
    scale = fmt_max / torch.where(usable, amax, torch.ones_like(amax)) / (2.0**margin)
    return torch.where(usable, scale, fallback)


class _Fp8EmulatedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                layer: "EmulatedFp8Linear") -> torch.Tensor:
        backend = layer.backend
        with torch.autocast(x.device.type, enabled=False):
            x32, w32 = x.float(), weight.float()
            x_q = layer.quantize(x32, ROLE_INPUT, backend.recipe.forward)
            w_q = layer.quantize(w32, ROLE_WEIGHT, backend.recipe.forward)
            ctx.save_for_backward(x_q, w_q)
            ctx.layer, ctx.has_bias = layer, bias is not None
            # the bias joins the fp32 accumulation and the one rounding to bf16, as in a fused GEMM epilogue
            return round_to_bf16(F.linear(x_q, w_q, None if bias is None else round_to_bf16(bias.float())))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x_q, w_q = ctx.saved_tensors
        layer = ctx.layer
        g_q = layer.quantize(grad_out.float(), ROLE_GRAD_OUTPUT, layer.backend.recipe.backward)
        grad_x = round_to_bf16(g_q @ w_q)
        rows = g_q.reshape(-1, g_q.shape[-1])
        grad_w = round_to_bf16(rows.T @ x_q.reshape(-1, x_q.shape[-1]))
        # the bias gradient comes from the unquantized gradient, as TE's fused cast + bgrad computes it
        grad_b = round_to_bf16(grad_out.float().reshape(-1, g_q.shape[-1]).sum(dim=0)) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


class EmulatedFp8Linear(nn.Module):
    """A linear layer with per-role FP8 scaling state kept in (checkpointed) buffers. It takes over the
    parameters of the `nn.Linear` it replaces, so tied weights stay tied."""

    def __init__(self, linear: nn.Linear, backend: "EmulatedBackend"):
        super().__init__()
        self.backend = backend
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        history_len = backend.config.amax_history_len
        device = linear.weight.device
        self.register_buffer("amax_history", torch.zeros(len(ROLE_NAMES), history_len, device=device))
        self.register_buffer("scale", torch.ones(len(ROLE_NAMES), device=device))
        # Largest amax seen in the current step, per role; folded into the history by `end_step`.
        self.register_buffer("step_amax", torch.zeros(len(ROLE_NAMES), device=device), persistent=False)

    def _record_amax(self, t: torch.Tensor, role: int) -> torch.Tensor:
        amax = t.detach().abs().amax().float()
        if self.backend.recording:
            self.step_amax[role] = torch.maximum(self.step_amax[role], amax)
        return amax

    def quantize(self, t: torch.Tensor, role: int, fmt: FPFormat) -> torch.Tensor:
        amax = self._record_amax(t, role)
        config = self.backend.config
        if config.scaling is Scaling.DELAYED:
            scale = self.scale[role]
        elif config.scaling is Scaling.CURRENT:
            scale = scale_from_amax(amax, fmt.max_value, config.margin, torch.ones_like(amax))
        else:
            scale = torch.ones((), device=t.device)
        scale = scale * self.backend.fault_factor(role)
        scaled = t * scale
        quantized = fmt.quantize(scaled)
        if self.backend.quantization_observer is not None:
            self.backend.quantization_observer(self, role, scaled, quantized, fmt)
        return quantized / scale

    def forward(self, x: torch.Tensor, smooth_input: bool = False) -> torch.Tensor:
        """`smooth_input` (Smooth-SwiGLU, see shadow/model.py): in FP8 mode each input channel is divided by
        its power-of-two amax and the weight's matching column multiplied by it before quantization, so
        the product is unchanged while no channel's outliers set the input's scale. In BF16 the scales
        cancel exactly (powers of two), so BF16 mode skips them."""
        if self.backend.mode is PrecisionMode.FP8:
            weight = self.weight
            if smooth_input:
                channel_scale = power_of_two_channel_amax(x)
                x, weight = x / channel_scale, weight * channel_scale
            return _Fp8EmulatedLinear.apply(x, weight, self.bias, self)
        if self.backend.calibrating:
            self._record_amax(x, ROLE_INPUT)
            self._record_amax(self.weight, ROLE_WEIGHT)
        out = bf16_linear(x, self.weight, self.bias)
        if self.backend.calibrating and out.requires_grad:
            out.register_hook(self._record_grad_amax)
        return out

    def _record_grad_amax(self, grad: torch.Tensor) -> None:
        self._record_amax(grad, ROLE_GRAD_OUTPUT)

    @torch.no_grad()
    def update_scaling(self) -> None:
        """Push this step's amax into the history and derive the next step's scales."""
        self.amax_history.copy_(torch.roll(self.amax_history, shifts=1, dims=1))
        self.amax_history[:, 0] = self.step_amax
        self.step_amax.zero_()
        config = self.backend.config
        if config.amax_compute is AmaxCompute.MAX:
            amax = self.amax_history.amax(dim=1)
        else:
            amax = self.amax_history[:, 0]
        recipe = self.backend.recipe
        fmt_max = torch.tensor(
            [recipe.forward.max_value, recipe.forward.max_value, recipe.backward.max_value], device=amax.device
        )
        self.scale.copy_(scale_from_amax(amax, fmt_max, config.margin, self.scale))


class EmulatedBackend(PrecisionBackend):
    name = "emulated"

    def __init__(self, config: PrecisionConfig, device: torch.device):
        super().__init__(config, device)
        self.recipe = recipe_for(config.format)
        # called as (layer, role, scaled operand, its quantized value, format) on every quantization
        # while set (telemetry steps); it must only read them
        self.quantization_observer: Callable[[EmulatedFp8Linear, int, torch.Tensor, torch.Tensor, FPFormat],
                                             None] | None = None

    @property
    def calibrating(self) -> bool:
        """Record amax in BF16 mode too, so delayed scaling resumes FP8 with a fresh history."""
        return self.config.scaling is Scaling.DELAYED

    def fault_factor(self, role: int) -> float:
        """The injected fault's multiplier of `role`'s scale at this step (`precision.fault`); only FP8
        quantization calls it, so BF16 steps never see a fault."""
        return self.config.fault.factor(self.step, Operand(ROLE_NAMES[role]))

    def fp8_linear(self, linear: nn.Linear) -> nn.Module:
        return EmulatedFp8Linear(linear, self)

    def end_step(self, model: nn.Module, reduce_amax: AmaxReducer | None = None) -> None:
        layers = [m for m in model.modules() if isinstance(m, EmulatedFp8Linear)]
        if not layers:
            return
        if reduce_amax is not None:
            stacked = torch.stack([layer.step_amax for layer in layers])
            reduce_amax(stacked)
            for layer, amax in zip(layers, stacked):
                layer.step_amax.copy_(amax)
        for layer in layers:
            layer.update_scaling()
