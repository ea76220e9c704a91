"""NVIDIA Transformer Engine: `te.Linear` layers under TE's FP8 autocast. GPU only, imported lazily.

FP8 mode runs the forward under `fp8_autocast(enabled=True, fp8_recipe=...)`; BF16 mode under
`fp8_autocast(enabled=False, calibrating=True)` for delayed scaling, so TE keeps recording amax while
the job is in BF16 and the scales are fresh when FP8 resumes (TE's calibration mode).

TE serialises its FP8 metadata (`_extra_state`) with pickle. shadow never stores or loads that: the
scaling state is exported as plain tensors (`scale`, `amax_history` per forward/backward meta) and put
back by copying into TE's own tensors, so loading a checkpoint runs no code.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from shadow.config.job import AmaxCompute, PrecisionConfig, PrecisionMode, Scaling
from shadow.precision.base import BackendUnavailable, PrecisionBackend

_META_KEYS = ("scaling_fwd", "scaling_bwd")
_META_TENSORS = ("scale", "amax_history")


def _import_te():
    try:
        import transformer_engine.pytorch as te
        from transformer_engine.common import recipe
    except (ImportError, OSError) as exc:
        raise BackendUnavailable(
            f"precision.backend 'te' needs NVIDIA Transformer Engine, which did not import ({exc}). Install "
            "`shadow[te]` on a machine with an NVIDIA driver, or use precision.backend=emulated (any machine) "
            "or torchao"
        ) from None
    return te, recipe


class TransformerEngineBackend(PrecisionBackend):
    name = "te"
    fp8_layer_copies_weights = True
    extra_state_known_before_training = False  # fp8_meta appears at the first FP8 forward

    def __init__(self, config: PrecisionConfig, device: torch.device):
        super().__init__(config, device)
        if device.type != "cuda":
            raise BackendUnavailable(
                "precision.backend 'te' needs a CUDA GPU and this run is on the CPU; "
                "use precision.backend=emulated to emulate FP8 numerics on CPU"
            )
        self.te, recipe = _import_te()
        fp8_format = recipe.Format.HYBRID if config.format == "hybrid" else recipe.Format.E4M3
        if config.scaling is Scaling.DELAYED:
            self.recipe = recipe.DelayedScaling(
                margin=config.margin,
                fp8_format=fp8_format,
                amax_history_len=config.amax_history_len,
                amax_compute_algo="max" if config.amax_compute is AmaxCompute.MAX else "most_recent",
            )
        else:
            self.recipe = recipe.Float8CurrentScaling(fp8_format=fp8_format)

    def fp8_linear(self, linear: nn.Linear) -> nn.Module:
        """A `te.Linear` holding a copy of the layer's weights (TE allocates its own parameters, on the GPU)."""
        layer = self.te.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                               params_dtype=torch.float32, device=self.device)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def autocast(self) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
        fp8 = self.mode is PrecisionMode.FP8
        calibrating = not fp8 and self.config.scaling is Scaling.DELAYED
        stack.enter_context(self.te.fp8_autocast(enabled=fp8, calibrating=calibrating, fp8_recipe=self.recipe))
        return stack

    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, module in self._te_modules(model):
            for meta_key in _META_KEYS:
                meta = module.fp8_meta.get(meta_key)
                for attr in _META_TENSORS:
                    value = getattr(meta, attr, None) if meta is not None else None
                    if isinstance(value, torch.Tensor):
                        tensors[f"{name}.{meta_key}.{attr}"] = value.detach().to("cpu", copy=True)
        return tensors

    def load_extra_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved scaling tensors into the modules' FP8 metadata. Every saved tensor must find its
        place and, once any was saved, every module's must be there: a scale left at its default would
        change the next steps' numbers, so a mismatch is an error naming the tensor, never a skip."""
        placed: set[str] = set()
        for name, module in self._te_modules(model):
            if tensors and not module.fp8_meta.get("scaling_fwd"):
                # TE creates its FP8 metadata lazily, at the first FP8 forward; create it now to fill it.
                with self.te.fp8_autocast(enabled=True, fp8_recipe=self.recipe):
                    module.init_fp8_metadata()
            for meta_key in _META_KEYS:
                meta = module.fp8_meta.get(meta_key)
                for attr in _META_TENSORS:
                    key = f"{name}.{meta_key}.{attr}"
                    target = getattr(meta, attr, None) if meta is not None else None
                    if not isinstance(target, torch.Tensor):
                        continue  # this module has no such tensor; a saved one is reported below
                    if key not in tensors:
                        if tensors:
                            raise ValueError(f"TE scaling state {key}: not in the checkpoint, which holds the "
                                             f"scaling state of other layers ({sorted(tensors)[0]}, ...)")
                        continue
                    if tensors[key].shape != target.shape:
                        raise ValueError(f"TE scaling state {key}: shape {tuple(tensors[key].shape)}, "
                                         f"expected {tuple(target.shape)}")
                    with torch.no_grad():
                        target.copy_(tensors[key].to(target.device))
                    placed.add(key)
        unplaced = sorted(set(tensors) - placed)
        if unplaced:
            raise ValueError(f"TE scaling state {', '.join(unplaced)}: no matching Transformer Engine layer in "
                             "this model (was the checkpoint written by another model or layer selection?)")

    def _te_modules(self, model: nn.Module):
        return [(n, m) for n, m in model.named_modules() if isinstance(m, self.te.Linear)]
