"""Step telemetry: signals that show FP8 trouble before the loss does (names in `shadow.signals`).

Activation outliers and their kurtosis predict FP8 divergence ("Towards Fully FP8 GEMM LLM Training
at Scale", 2025); SwiGLU outputs grow outliers late in training ("Scaling FP8 training to trillion-
token LLMs", 2024); the share of each quantized operand that underflows to zero or saturates is what
Transformer Engine's FP8 debug statistics report; the amax and scale show the delayed-scaling state.

A collector reads tensors the step computes anyway, through forward hooks and the emulated backend's
quantization observer, all detached: it never changes a number of the step. It is active only on the
steps that record telemetry. Statistics are accumulated as tensors (sums and maxima over the
micro-batches) and reduced across data-parallel ranks once, at the end of the step, so every rank
reports the statistics of the whole global batch.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from shadow.architecture import ModelStructure
from shadow.config.job import Scaling
from shadow.distributed import all_reduce_sum, max_across_ranks
from shadow.precision.base import PrecisionBackend
from shadow.precision.emulated import ROLE_NAMES, EmulatedBackend, EmulatedFp8Linear
from shadow.precision.formats import FPFormat
from shadow.signals import block_key, operand_key


class TelemetryCollector:
    """Per block: activation amax and kurtosis of the block's output; where the block has a SwiGLU MLP
    (`shadow/architecture.py`), the amax and crest factor of the SwiGLU output (its down projection's
    input). A model without SwiGLU has no `swiglu/*` values at all, not zeros."""

    def __init__(self, model: nn.Module, backend: PrecisionBackend, structure: ModelStructure):
        self.model = model
        self.backend = backend
        self.structure = structure
        self.quantized_layers = {module: name for name, module in model.named_modules()
                                 if isinstance(module, EmulatedFp8Linear)}
        # the amax history and scales are the scaling state only under delayed scaling
        self.delayed_scaling = isinstance(backend, EmulatedBackend) and backend.config.scaling is Scaling.DELAYED
        self._maxes: dict[str, torch.Tensor] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self._scales_used: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def recording(self):
        """Observe the forward and backward passes run inside this block."""
        self._maxes, self._sums = {}, {}
        self._scales_used = {name: layer.scale.detach().clone() for layer, name in self.quantized_layers.items()}
        handles = []
        for index, block in enumerate(self.structure.blocks):
            handles.append(block.module.register_forward_hook(self._block_hook(index)))
            if block.swiglu_down is not None:
                down = self.model.get_submodule(block.swiglu_down)
                handles.append(down.register_forward_pre_hook(self._swiglu_hook(index)))
        observe = isinstance(self.backend, EmulatedBackend)
        if observe:
            self.backend.quantization_observer = self._on_quantization
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            if observe:
                self.backend.quantization_observer = None

    def finish(self) -> dict[str, float]:
        """The step's telemetry; call after the backend's `end_step` (it reads the amax just recorded)."""
        for layer, name in self.quantized_layers.items() if self.delayed_scaling else ():
            for role, role_name in enumerate(ROLE_NAMES):
                self._max(operand_key(name, role_name, "amax"), layer.amax_history[role, 0])
                self._max(operand_key(name, role_name, "scale"), self._scales_used[name][role])
        maxes, sums = self._reduced()
        values: dict[str, float] = {}
        for index, block in enumerate(self.structure.blocks):
            act, swiglu = block_key("act", index, ""), block_key("swiglu", index, "")
            values[act + "amax"] = maxes[act + "amax"]
            values[act + "kurtosis"] = sums[act + "kurtosis_sum"] / sums[act + "tokens"]
            if block.swiglu_down is None:
                continue
            values[swiglu + "amax"] = maxes[swiglu + "amax"]
            rms = (sums[swiglu + "sumsq"] / sums[swiglu + "count"]) ** 0.5
            # an all-zero output has no outliers (0); a NaN rms stays NaN: non-finite activations are
            # what triggers watch for, and must not read as calm
            values[swiglu + "crest"] = 0.0 if rms == 0 else maxes[swiglu + "amax"] / rms
        for key in [k for k in sums if k.endswith("/nonzero")]:
            stem = key[: -len("nonzero")]
            values[stem + "underflow"] = sums[stem + "flushed"] / max(sums[key], 1.0)
            values[stem + "saturation"] = sums[stem + "clipped"] / sums[stem + "count"]
        values.update({k: v for k, v in maxes.items() if k.startswith("fp8/")})
        for group, stat in (("act", "amax"), ("act", "kurtosis"), ("swiglu", "amax"), ("swiglu", "crest"),
                            ("fp8", "underflow"), ("fp8", "saturation")):
            found = [v for k, v in values.items() if k.startswith(group + "/") and k.endswith("/" + stat)]
            if found:
                values[f"{group}/{stat}_max"] = _max_or_nan(found)
        return values

    # ----------------------------------------------------------------------------- accumulation
    def _max(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().double()
        self._maxes[key] = torch.maximum(self._maxes[key], value) if key in self._maxes else value

    def _add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().double()
        self._sums[key] = self._sums[key] + value if key in self._sums else value

    def _reduced(self) -> tuple[dict[str, float], dict[str, float]]:
        """Maxima and sums over every micro-batch of every rank, as floats (one collective each)."""
        result = []
        for table, reduce in ((self._maxes, max_across_ranks), (self._sums, all_reduce_sum)):
            keys = sorted(table)  # the same order on every rank
            stacked = torch.stack([table[k] for k in keys]) if keys else torch.zeros(0, dtype=torch.float64)
            reduce(stacked)
            result.append(dict(zip(keys, stacked.tolist())))
        return result[0], result[1]

    def _block_hook(self, index: int):
        prefix = block_key("act", index, "")

        def hook(_module, _inputs, output) -> None:
            hidden = output[0] if isinstance(output, tuple) else output  # Hugging Face layers return tuples
            with torch.no_grad():
                x = hidden.detach().float()
                self._max(prefix + "amax", x.abs().amax())
                self._add(prefix + "kurtosis_sum", token_kurtosis(x).sum())
                self._add(prefix + "tokens", x.new_tensor(x.numel() // x.shape[-1], dtype=torch.float64))
        return hook

    def _swiglu_hook(self, index: int):
        prefix = block_key("swiglu", index, "")

        def hook(_module, inputs: tuple) -> None:
            with torch.no_grad():
                x = inputs[0].detach().float()
                self._max(prefix + "amax", x.abs().amax())
                self._add(prefix + "sumsq", x.pow(2).sum())
                self._add(prefix + "count", x.new_tensor(x.numel(), dtype=torch.float64))
        return hook

    def _on_quantization(self, layer: EmulatedFp8Linear, role: int, scaled: torch.Tensor, quantized: torch.Tensor,
                         fmt: FPFormat) -> None:
        with torch.no_grad():
            stem = operand_key(self.quantized_layers[layer], ROLE_NAMES[role], "")
            nonzero = scaled != 0
            self._add(stem + "nonzero", nonzero.sum())
            self._add(stem + "flushed", (nonzero & (quantized == 0)).sum())
            self._add(stem + "clipped", (scaled.abs() > fmt.max_value).sum())
            self._add(stem + "count", scaled.new_tensor(scaled.numel(), dtype=torch.float64))


def _max_or_nan(values: list[float]) -> float:
    """The largest value, or NaN if any is NaN (Python's `max` keeps or drops a NaN by its position)."""
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def token_kurtosis(x: torch.Tensor) -> torch.Tensor:
    """Kurtosis E[(x - mean)^4] / var^2 across the last dimension, one value per token: 0 if the token is
    constant, NaN if it holds a NaN (a NaN variance must not read as a constant token)."""
    centered = x - x.mean(dim=-1, keepdim=True)
    variance = centered.pow(2).mean(dim=-1)
    fourth = centered.pow(4).mean(dim=-1)
    return torch.where(variance == 0, torch.zeros_like(variance),
                       fourth / variance.clamp_min(torch.finfo(x.dtype).tiny).pow(2))
