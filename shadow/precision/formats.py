"""Floating-point formats ExMy and exact round-to-nearest-even quantization into them.

E4M3 follows the OCP/NVIDIA `e4m3fn` convention (no infinities, max 448) and E5M2 the IEEE-like one
(max 57344); both are cast through torch's float8 dtypes. Any other eXmY (e.g. e8m3, as in "To FP8 and
Back Again") is IEEE-like (top exponent reserved) and rounded exactly by arithmetic on fp32:
`round(x / ulp(x)) * ulp(x)` with ulp a power of two, so the division is exact and torch.round is
round-half-to-even. Quantization saturates at ±max (as Transformer Engine's casts do); NaN and ±inf
pass through unchanged so that a diverged step is visible, not clipped into plausible numbers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FPFormat:
    name: str
    exp_bits: int
    man_bits: int
    max_value: float
    min_normal_exp: int  # exponent of the smallest normal number: 2**min_normal_exp
    torch_dtype: torch.dtype | None = None  # native float8 dtype for the fast exact cast

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.min_normal_exp - self.man_bits)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Round fp32 `x` to the nearest value of this format (ties to even), saturating at ±max."""
        clamped = x.clamp(-self.max_value, self.max_value)
        if self.torch_dtype is not None:
            rounded = clamped.to(self.torch_dtype).to(x.dtype)
        else:
            rounded = _round_to_grid(clamped, self.man_bits, self.min_normal_exp)
        return torch.where(torch.isinf(x), x, rounded)


def _round_to_grid(x: torch.Tensor, man_bits: int, min_normal_exp: int) -> torch.Tensor:
    # frexp: x = m * 2**e with 0.5 <= |m| < 1, so floor(log2|x|) = e - 1 exactly.
    _, exponent = torch.frexp(x)
    exponent = torch.clamp(exponent - 1, min=min_normal_exp)  # below min normal: fixed subnormal spacing
    ulp = torch.ldexp(torch.ones_like(x), exponent - man_bits)
    return torch.round(x / ulp) * ulp


def ieee_like(exp_bits: int, man_bits: int) -> FPFormat:
    """An IEEE-754-style format: bias 2**(E-1)-1, top exponent reserved for inf/NaN."""
    bias = 2 ** (exp_bits - 1) - 1
    max_exp = bias if exp_bits > 1 else 0
    max_value = (2.0 - 2.0 ** (-man_bits)) * 2.0**max_exp
    return FPFormat(f"e{exp_bits}m{man_bits}", exp_bits, man_bits, max_value, 1 - bias)


E4M3 = FPFormat("e4m3", 4, 3, 448.0, -6, torch.float8_e4m3fn)
E5M2 = FPFormat("e5m2", 5, 2, 57344.0, -14, torch.float8_e5m2)
_NAMED = {"e4m3": E4M3, "e5m2": E5M2}


def parse_format(name: str) -> FPFormat:
    if name in _NAMED:
        return _NAMED[name]
    match = re.fullmatch(r"e(\d+)m(\d+)", name)
    if not match:
        raise ValueError(f"unknown FP format {name!r}: expected e4m3, e5m2 or eXmY")
    exp_bits, man_bits = int(match.group(1)), int(match.group(2))
    if not (1 <= exp_bits <= 8 and 0 <= man_bits <= 22):
        raise ValueError(f"FP format {name!r}: emulation supports 1<=X<=8 exponent and 0<=Y<=22 mantissa bits")
    fmt = ieee_like(exp_bits, man_bits)
    assert math.isfinite(fmt.max_value)
    return fmt


@dataclass(frozen=True)
class FormatRecipe:
    """Which format each GEMM operand role uses."""

    forward: FPFormat  # activations and weights
    backward: FPFormat  # gradients of outputs


def recipe_for(name: str) -> FormatRecipe:
    """`hybrid` = E4M3 forward, E5M2 backward (Transformer Engine's HYBRID); otherwise one format for all."""
    if name == "hybrid":
        return FormatRecipe(E4M3, E5M2)
    fmt = parse_format(name)
    return FormatRecipe(fmt, fmt)


def round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values to bf16 (ties to even) and back: bf16 numerics without bf16 arithmetic."""
    return x.to(torch.bfloat16).to(x.dtype)
