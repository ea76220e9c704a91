"""Precision backends behind one interface, picked by name (`precision.backend` in the job)."""

from __future__ import annotations

import torch

from shadow.config.job import Fp8Backend, PrecisionConfig
from shadow.precision.base import BackendUnavailable, PrecisionBackend


def build_backend(config: PrecisionConfig, device: torch.device) -> PrecisionBackend:
    if config.backend is Fp8Backend.EMULATED:
        from shadow.precision.emulated import EmulatedBackend

        return EmulatedBackend(config, device)
    if config.backend is Fp8Backend.TORCHAO:
        from shadow.precision.torchao_backend import TorchaoBackend

        return TorchaoBackend(config, device)
    from shadow.precision.te_backend import TransformerEngineBackend

    return TransformerEngineBackend(config, device)


__all__ = ["BackendUnavailable", "PrecisionBackend", "build_backend"]
