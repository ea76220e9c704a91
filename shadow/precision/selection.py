"""Which linear layers run in FP8 (`precision.fp8_layers`): a pure choice made once, before training.

Candidates are the `nn.Linear` layers inside the model's blocks; every linear layer outside them (the
output head, projections between embedding and blocks) stays BF16. A candidate is then kept in BF16,
in this order, when its block is one of the first `bf16_first_layers` or last `bf16_last_layers`
blocks (Megatron's `--first-last-layers-bf16`), when `include` is set and no pattern matches its name,
when an `exclude` pattern matches, when FP8 hardware cannot run its GEMM (torchao and TE: both
dimensions must be multiples of 16), or, with `auto`, when its GEMM is too small for FP8 to gain.

The `auto` rule is torchao's auto-filter (torchao 0.18, `float8_linear_utils.py`), thresholds from
its H100 benchmarks on the weight shape (N = out_features, K = in_features):
- per-tensor scaling (torchao `tensorwise`, TE, and the emulated backend, which stands in for them):
  FP8 when a dimension is a multiple of 16 and not (K <= 4096 and N <= 1024);
- torchao `rowwise`: FP8 unless N <= 2048, K <= 1024, or (N <= 4096 and K <= 2048).
The token dimension M is not part of the rule (it is the batch's, not the layer's).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Callable

from torch import nn

from shadow.architecture import ModelStructure
from shadow.config.job import Fp8Backend, PrecisionConfig

FP8 = "fp8"


@dataclass(frozen=True)
class LayerChoice:
    name: str  # module name in the model
    in_features: int  # K
    out_features: int  # N
    reason: str  # "fp8", or why the layer stays BF16

    @property
    def fp8(self) -> bool:
        return self.reason == FP8


@dataclass(frozen=True)
class Fp8Selection:
    layers: tuple[LayerChoice, ...]  # every linear layer of the model, in module order

    @property
    def fp8_names(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.fp8]

    def describe(self) -> str:
        """One line for the console: how many layers run in FP8 and the BF16 ones' reasons, counted."""
        reasons: dict[str, int] = {}
        for layer in self.layers:
            if not layer.fp8:
                reason = layer.reason.split(" (")[0].split(":")[0]
                reasons[reason] = reasons.get(reason, 0) + 1
        kept = ", ".join(f"{count} {reason}" for reason, count in reasons.items())
        counted = f"FP8 layers: {len(self.fp8_names)} of {len(self.layers)} linear layers"
        return f"{counted}; BF16: {kept}" if kept else counted

    def to_event(self) -> dict:
        """What the run logs at start (events.jsonl `fp8_layers`, MLflow params)."""
        return {"num_fp8": len(self.fp8_names), "num_linear": len(self.layers), "fp8": self.fp8_names,
                "bf16": {layer.name: layer.reason for layer in self.layers if not layer.fp8}}


def select_fp8_layers(model: nn.Module, structure: ModelStructure, config: PrecisionConfig) -> Fp8Selection:
    rules = config.fp8_layers
    num_blocks = len(structure.blocks)
    first_fp8_block, end_fp8_block = rules.bf16_first_layers, num_blocks - rules.bf16_last_layers
    auto_rule = auto_rule_for(config)
    choices = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        n, k = module.out_features, module.in_features
        block = structure.block_of(name)
        if block is None:
            reason = "outside the blocks (the output head and other projections stay BF16)"
        elif block < first_fp8_block:
            reason = f"bf16_first_layers: block {block}"
        elif block >= end_fp8_block:
            reason = f"bf16_last_layers: block {block}"
        elif rules.include and not any(fnmatchcase(name, p) for p in rules.include):
            reason = "matches no include pattern"
        elif excluded_by := next((p for p in rules.exclude if fnmatchcase(name, p)), None):
            reason = f"exclude: {excluded_by}"
        elif (config.backend is not Fp8Backend.EMULATED or rules.auto) and (k % 16 or n % 16):
            reason = f"FP8 GEMMs need dimensions in multiples of 16 (K={k}, N={n})"
        elif rules.auto and auto_rule.too_small(k, n):
            reason = f"auto: GEMM too small to gain ({auto_rule.text}; K={k}, N={n})"
        else:
            reason = FP8
        choices.append(LayerChoice(name, k, n, reason))
    return Fp8Selection(tuple(choices))


@dataclass(frozen=True)
class AutoRule:
    text: str  # the condition under which a layer stays BF16, for the reason logged with it
    too_small: Callable[[int, int], bool]  # (K, N) -> whether the GEMM is too small for FP8 to gain


PER_TENSOR = AutoRule("per-tensor scaling: K <= 4096 and N <= 1024", lambda k, n: k <= 4096 and n <= 1024)
ROWWISE = AutoRule("torchao rowwise: N <= 2048 or K <= 1024 or (N <= 4096 and K <= 2048)",
                   lambda k, n: n <= 2048 or k <= 1024 or (n <= 4096 and k <= 2048))


def auto_rule_for(config: PrecisionConfig) -> AutoRule:
    """The `auto` rule for the job's backend and recipe."""
    return ROWWISE if config.backend is Fp8Backend.TORCHAO and config.torchao_recipe == "rowwise" else PER_TENSOR
