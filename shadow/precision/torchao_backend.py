"""torchao float8 training: real FP8 GEMMs (torch._scaled_mm) on Hopper GPUs, emulated on CPU.

Each layer is a torchao `Float8Linear` whose forward falls back to the shared BF16 path while the job
runs in BF16, so a precision switch needs no module swap. torchao scales dynamically (per tensor for
`tensorwise`, per row for `rowwise`), so there is no scaling state to checkpoint.

With `precision.fsdp_float8_all_gather` (tensorwise, more than one rank) FSDP2 all-gathers the FP8 layers'
weights in FP8 while the job is in FP8 mode and as they are in BF16 mode (`shadow/precision/fsdp_float8.py`);
a mode switch makes FSDP2 drop the weights it gathered in the other mode.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from shadow.config.job import PrecisionConfig, PrecisionMode
from shadow.precision.base import BackendUnavailable, PrecisionBackend, bf16_linear
from shadow.precision.formats import round_to_bf16
from shadow.precision.fsdp_float8 import drop_gathered_weights, wrap_weights


def _import_torchao():
    try:
        from torchao.float8.config import Float8LinearConfig
        from torchao.float8.float8_linear import Float8Linear
    except ImportError as exc:
        raise BackendUnavailable(
            f"precision.backend 'torchao' needs torchao ({exc}); install it with `pip install shadow[torchao]` "
            "or use precision.backend=emulated"
        ) from None
    return Float8LinearConfig, Float8Linear


class TorchaoBackend(PrecisionBackend):
    name = "torchao"

    def __init__(self, config: PrecisionConfig, device: torch.device):
        super().__init__(config, device)
        float8_config_cls, float8_linear_cls = _import_torchao()
        emulate = device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9)
        base = float8_config_cls.from_recipe_name(config.torchao_recipe)
        fields = dict(emulate=emulate)
        if config.format == "e4m3" and config.torchao_recipe == "tensorwise":
            fields["cast_config_grad_output"] = type(base.cast_config_grad_output)(target_dtype=torch.float8_e4m3fn)
        self.float8_config = dataclasses.replace(base, **fields)
        self.emulate = emulate
        self._layer_cls = _make_layer_class(float8_linear_cls)
        self._float8_all_gather_model: nn.Module | None = None  # the sharded model whose weights follow the mode

    def fp8_linear(self, linear: nn.Linear) -> nn.Module:
        """torchao's own swap (`Float8Linear.from_float`): the new layer takes over the parameters."""
        with torch.device("meta"):
            layer = self._layer_cls(linear.in_features, linear.out_features, bias=False, config=self.float8_config,
                                    backend=self)
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer

    def before_sharding(self, model: nn.Module) -> None:
        if self.config.fsdp_float8_all_gather:
            wrap_weights(model, self._layer_cls, self)
            self._float8_all_gather_model = model

    def set_mode(self, mode: PrecisionMode) -> None:
        previous = self.mode
        super().set_mode(mode)
        if self._float8_all_gather_model is not None and self.mode is not previous:
            drop_gathered_weights(self._float8_all_gather_model)

    def describe(self) -> dict:
        return {**super().describe(), "torchao_recipe": self.config.torchao_recipe, "emulate": self.emulate}


def _make_layer_class(float8_linear_cls):
    class TorchaoFp8Linear(float8_linear_cls):
        def __init__(self, *args, backend: TorchaoBackend, **kwargs):
            super().__init__(*args, **kwargs)
            self.backend = backend

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.backend.mode is PrecisionMode.BF16:
                return bf16_linear(x, self.weight, self.bias)
            out = super().forward(x)
            # On CPU torchao emulates in fp32; round to bf16 like the GPU GEMM's bf16 output.
            return round_to_bf16(out) if x.device.type == "cpu" else out

    return TorchaoFp8Linear
