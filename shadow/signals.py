"""Names of the training signals: the telemetry keys of a step record, and what a trigger may watch.

Pure (no torch): shared by the trainer's telemetry, which produces the keys, and the policy schema,
which checks that a trigger names a signal that exists. A key is `<group>/<where>/<stat>`; MLflow
shows it as `telemetry/<key>`.

| key | meaning |
| --- | --- |
| `act/blocks.<i>/amax` | largest \\|value\\| of block i's output (the residual stream) |
| `act/blocks.<i>/kurtosis` | kurtosis across the hidden dimension of block i's output, averaged over tokens (3 for a Gaussian; outlier channels raise it) |
| `swiglu/blocks.<i>/amax` | largest \\|value\\| of block i's SwiGLU output, the input of w_down |
| `swiglu/blocks.<i>/crest` | that amax over the output's RMS: how far the outliers stand out |
| `fp8/<layer>/<role>/underflow` | share of the operand's non-zero values that FP8 quantization flushed to zero (FP8 steps) |
| `fp8/<layer>/<role>/saturation` | share of the operand's values clipped at the format's max (FP8 steps) |
| `fp8/<layer>/<role>/amax` | the operand's amax this step, as it enters the amax history |
| `fp8/<layer>/<role>/scale` | the scale applied this step (from the amax history, delayed scaling) |
| `act/amax_max`, `act/kurtosis_max`, `swiglu/amax_max`, `swiglu/crest_max`, `fp8/underflow_max`, `fp8/saturation_max` | the largest value of that statistic over all blocks, layers and roles |

`<layer>` is the module path of a GEMM (`blocks.0.ffn.w_down`), `<role>` one of `input`, `weight`,
`grad_output`. The fp8 keys come from the emulated backend, which sees every quantized operand.
"""

from __future__ import annotations

import re

AGGREGATES = ("act/amax_max", "act/kurtosis_max", "swiglu/amax_max", "swiglu/crest_max", "fp8/underflow_max",
              "fp8/saturation_max")
RECORD_FIELDS = ("loss", "grad_norm")  # step-record fields a trigger may watch besides telemetry
_PER_BLOCK = re.compile(r"^(act/blocks\.\d+/(amax|kurtosis)|swiglu/blocks\.\d+/(amax|crest))$")
_PER_OPERAND = re.compile(r"^fp8/[A-Za-z0-9_.]+/(input|weight|grad_output)/(underflow|saturation|amax|scale)$")


def is_signal(name: str) -> bool:
    """Whether a trigger can watch `name` (a record field or a telemetry key)."""
    return (name in AGGREGATES or name in RECORD_FIELDS or bool(_PER_BLOCK.match(name))
            or bool(_PER_OPERAND.match(name)))


def block_key(group: str, index: int, stat: str) -> str:
    return f"{group}/blocks.{index}/{stat}"


def operand_key(layer: str, role: str, stat: str) -> str:
    return f"fp8/{layer}/{role}/{stat}"


def why_never_produced(name: str, *, telemetry_every_steps: int, backend: str, scaling: str,
                       num_layers: int) -> str | None:
    """Why a job with these settings never produces signal `name` (a trigger on it could never fire),
    or None when it does."""
    if name in RECORD_FIELDS:
        return None
    if telemetry_every_steps <= 0:
        return "telemetry is off (telemetry.every_steps: 0)"
    block = re.match(r"^(act|swiglu)/blocks\.(\d+)/", name)
    if block and int(block.group(2)) >= num_layers:
        return f"the model has blocks 0..{num_layers - 1} (model.num_layers: {num_layers})"
    if name.startswith("fp8/"):
        if backend != "emulated":
            return f"only the emulated backend observes FP8 operands (precision.backend: {backend})"
        if name.endswith(("/amax", "/scale")) and scaling != "delayed":
            return f"per-operand amax and scale are recorded under delayed scaling only (precision.scaling: {scaling})"
    return None

